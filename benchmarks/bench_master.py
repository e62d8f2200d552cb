"""The ZO update with and without a float32 master: the update pass (estimators.end_terms) on one buffer of n weights.

A float32 master takes one noise pass (hosl.noise.add_ with Q terms). A bfloat16 or float16
buffer without a master (--zo-master none) takes, a chunk at a time, the float32 copy, the same
noise pass, the seeded uniform (two normals per weight), the stochastic rounding and the copy
back. Both run cut-grad's update of Q probes on a random buffer (weights ~ N(0, 0.02^2)); the
time is the median of --repeats after one warm-up, on torch's threads.

    python benchmarks/bench_master.py                  # n = 123M (SmolLM2-135M's client at k = 27), Q = 1 and 8
    python benchmarks/bench_master.py --quick          # n = 1M

Writes benchmarks/results/bench_master.jsonl (--quick: bench_master_quick.jsonl) and prints the table.
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import Recorder, bench_parser, cpu_name, environment, given, print_table

from hosl import estimators, zo

CUT_GRAD = estimators.ESTIMATORS["cut-grad"]
DTYPES = {"float32 master": None, "bfloat16, no master": torch.bfloat16, "float16, no master": torch.float16}


def timed_update(params: zo.ZOParams, seeds, grads, repeats: int) -> float:
    """The median time of cut-grad's update of len(seeds) probes, after one warm-up."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        params.add_(*estimators.end_terms(seeds, 1e-3, CUT_GRAD, 6e-5, grads, restore=False))
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = bench_parser(__doc__, "n = 1M (seconds)")
    parser.add_argument("--n", type=int, default=None, help="weights in the buffer (123M; --quick: 1M)")
    parser.add_argument("--qs", type=int, nargs="+", default=[1, 8], help="probes per update (1 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed updates per setting (3)")
    args = parser.parse_args(argv)
    n = given(args.n, 1 << 20 if args.quick else 123_000_000)
    if n < 1 or args.repeats < 1 or any(q < 1 or q > 64 for q in args.qs):
        parser.error("--n and --repeats must be >= 1 and each --qs in [1, 64]")
    env, device = environment(), torch.device("cpu")
    print(f"bench_master: the update pass on {n:,} weights; CPU {cpu_name()}, {env['threads']} torch threads")
    rec = Recorder(args.out / ("bench_master_quick.jsonl" if args.quick else "bench_master.jsonl"), env)
    rows = []
    for q in args.qs:
        seeds, grads = estimators.step_seeds(0, 1, q), [0.1 * (i + 1) for i in range(q)]
        base = None
        for name, dtype in DTYPES.items():
            torch.manual_seed(0)
            w = torch.nn.Parameter(torch.randn(n) * 0.02 if dtype is None else (torch.randn(n) * 0.02).to(dtype))
            params = zo.ZOParams([("w", w)], probes="scratch", master=dtype is None)
            seconds = timed_update(params, seeds, grads, args.repeats)
            base = base or seconds
            del params, w
            r = rec.add(device, bench="zo_update", weights=n, q=q, variant=name, seconds=seconds,
                        over_master=seconds / base, repeats=args.repeats)  # fmt: skip
            rows.append([q, name, f"{r['seconds']:.3f}", f"{r['over_master']:.2f}x"])
    print_table(["Q", "weights", "update (s)", "over the master's"], rows, numeric=[True, False, True, True])


if __name__ == "__main__":
    main()
