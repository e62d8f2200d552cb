"""Step time against the network: where fo, hosl with a cut-gradient estimator (one activation up,
dL/dh down) and hosl with loss differences (1 + 2Q activations up, a loss each down) each win, as
the link's round-trip time and bandwidth change.

Each measurement is bench_step's local run (one process, the server in a thread, one torch thread a
side, an OPT model with random weights; --model small or opt-125m) with an emulated network between
the two sides (hosl.transport.Network, the trainer's --link-rtt-ms and --link-mbit): a frame arrives
half a round trip after its last byte left, and each direction sends its bytes at the bandwidth, one
frame after another. Networks (--networks RTT_MS:MBIT ...): by default 1 ms / 1000 Mbit/s (a LAN),
10 ms / 100 Mbit/s, 50 ms / 10 Mbit/s (a mobile uplink), and the two corners 1 ms / 10 Mbit/s and
50 ms / 1000 Mbit/s. --warmup steps, then the median of --steps timed steps.

    python benchmarks/bench_network.py             # the small model: a few minutes on 2 cores
    python benchmarks/bench_network.py --model opt-125m

Writes benchmarks/results/bench_network[_MODEL].jsonl and prints step time per variant and network.
"""

from __future__ import annotations

import time
from pathlib import Path

import bench_step
from _common import Recorder, bench_parser, cpu_name, environment, log, print_table, run_workers

# name: (method, estimator, Q)
VARIANTS = {
    "fo": ("fo", "central", 1),
    "hosl (cut-grad-one-sided, Q = 8)": ("hosl", "cut-grad-one-sided", 8),
    "hosl (cut-grad, Q = 8)": ("hosl", "cut-grad", 8),
    "hosl (central, Q = 1)": ("hosl", "central", 1),
    "hosl (central, Q = 8)": ("hosl", "central", 8),
}
NETWORKS = ["1:1000", "10:100", "50:10", "1:10", "50:1000"]


def network(text: str) -> tuple[float, float]:
    rtt, _, mbit = text.partition(":")
    try:
        value = float(rtt), float(mbit)
    except ValueError:
        raise SystemExit(f"bench_network: a network is RTT_MS:MBIT, got {text!r}") from None
    if value[0] < 0 or value[1] <= 0:
        raise SystemExit(f"bench_network: need RTT_MS >= 0 and MBIT > 0, got {text!r}")
    return value


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--model", default="small", choices=list(bench_step.MODELS))
    parser.add_argument("--networks", nargs="+", default=NETWORKS, help="RTT_MS:MBIT each")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    networks = [network(n) for n in args.networks]
    base = dict(model=args.model, k=bench_step.MODELS[args.model]["k"], batch=args.batch, seq=args.seq,
                steps=args.steps, warmup=args.warmup, threads=[1, 1], server_micro_batch=0, embedding="rows",
                sync=False, stacked=False)  # fmt: skip
    suffix = "" if args.model == "small" else f"_{args.model}"
    rec = Recorder(Path(args.out) / f"bench_network{suffix}.jsonl", environment())
    import torch

    records = []
    for rtt, mbit in networks:
        for name in args.variants:
            method, estimator, q = VARIANTS[name]
            spec = dict(base, method=method, estimator=estimator, q=q, rtt_ms=rtt, mbit=mbit)
            start = time.perf_counter()
            out = run_workers(bench_step.__file__, spec, ["local"])[0]
            records.append(rec.add(torch.device("cpu"), bench="network", variant=name, **spec, **out))
            took = time.perf_counter() - start
            log(f"{rtt:g} ms {mbit:g} Mbit/s  {name:34s} step {out['wall_s']:.3f} s ({took:.0f} s)")
    print(f"\nOPT {args.model} cut at {base['k']}, batch {args.batch} x {args.seq}, one torch thread a side, "
          f"{cpu_name()}; step time (s), median of {args.steps} steps, by network (RTT / bandwidth)\n")  # fmt: skip
    header = ["variant", "KiB up / step", *(f"{r:g} ms / {m:g} Mbit/s" for r, m in networks)]
    table = []
    for name in args.variants:
        rows = {(r["rtt_ms"], r["mbit"]): r for r in records if r["variant"] == name}
        first = next(iter(rows.values()))
        cells = []
        for key in networks:
            best = min(r["wall_s"] for r in records if (r["rtt_ms"], r["mbit"]) == key)
            wall = rows[key]["wall_s"]
            cells.append(f"**{wall:.2f}**" if wall == best else f"{wall:.2f}")
        table.append([name, f"{first['bytes_up'] / 1024:.0f}", *cells])
    print_table(header, table)


if __name__ == "__main__":
    main()
