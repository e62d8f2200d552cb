"""Noise passes: hosl.noise.add_ against the MeZO way of regenerating the noise with torch.normal.

What is measured (bench field of each record):

* pass: one in-place noise pass, x += scale * z(seed), one term.
    - hosl-cpp: hosl.noise.add_ on the C++ CPU backend with torch.get_num_threads() threads;
    - hosl-triton: hosl.noise.add_ on the Triton backend, on CUDA when a GPU is present;
    - mezo: the baseline, `mezo_perturb_` below: torch.manual_seed(seed), then for each tensor
      z = torch.normal(...) and p.data.add_(z, alpha=scale), as MeZO (Malladi et al., 2023) does.
  Cases: one flat float32 buffer of 1M, 16M and 64M floats (--quick: 1M and 4M), and the weights of
  an OPT-125M-shaped client: embed_tokens, embed_positions and the first 3 decoder layers of a randomly
  initialised transformers.OPTForCausalLM(OPTConfig()) (--quick: hidden 256, 4 heads, ffn 1024,
  vocab 8192). hosl runs on them packed into one buffer by hosl.FlatParams; MeZO loops over the
  individual parameters.
* zo_step: the noise cost of one whole ZO-SGD step with Q=1 probe on the client, forward passes left
  out. MeZO: 4 regenerating passes (+mu, -2mu, +mu to restore, -lr*g to update). hosl: 3 add_ calls
  (+mu, -2mu, then mu - lr*g: the restore and the update merged into one pass).
* zo_step_rows: the same ZO step (Q=1) through the library's own schedule (StepPlan.probes and
  StepPlan.end) on the OPT client, with the token embedding dense (all) and row-sparse (rows:
  the distinct ids of a batch of --rows-tokens uniformly random tokens, about as many rows as a
  batch of 16 x 64 real tokens touches at most), the rest of the client dense in both.
* dists: one add_ pass of 1 and of 9 terms (a Q = 8 step's update) on the largest flat buffer, with
  Gaussian z and with Rademacher r (dist="rademacher"), against the pass a memory-bound op makes over
  the same buffer, x.add_(c): one read and one write, what a pass of r can at best cost.
* copy (CUDA only): dst.copy_(src) on a large buffer, the device's copy bandwidth; the GPU rows report
  the fraction of it that each method reaches.

Timing. CPU: time.perf_counter around single calls after 2 warm-up calls, one method after the
other (time_cpu says why they are not alternated); median and min of --repeats. CUDA:
triton.testing.do_bench (it picks its own number of runs and clears the L2 cache before each;
--repeats does not apply); median and min. GB/s counts the bytes of x alone, one read and one
write per pass, for both methods, so MeZO's extra traffic (writing z, reading it back) shows as
lower GB/s.

Memory, beyond x itself (peak_extra_bytes, peak_extra_source says how it was obtained):

* measured, CPU: in a fresh subprocess (this script with a hidden flag) per case, method and bench,
  the tensors are built and touched and a tiny warm-up runs; then the peak-RSS counter is reset
  (writing 5 to /proc/self/clear_refs), one pass or step runs, and VmHWM minus the RSS before it is
  recorded. Page-granular: a few KiB (thread stacks, small tensors) is noise. None (n/a) where the
  reset is not allowed, since a stale high-water mark would hide the allocation.
* measured, CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before, over one call.
* accounted (peak_extra_accounted_bytes): hosl 0 by design (z lives in registers, never in memory);
  MeZO the z tensors alive at once. `z = torch.normal(...)` inside a loop allocates the next z before
  the name z lets go of the previous one, so that is the largest two consecutive z.

Run from the repository root:

    python benchmarks/bench_noise.py --quick    # small sizes, about a minute on 2 cores
    python benchmarks/bench_noise.py            # full sizes; use an idle machine

Writes one JSON object per measurement to benchmarks/results/bench_noise.jsonl (--quick: _quick,
--device cpu or cuda: _cpu or _cuda before .jsonl; --dists-only: _dists), overwritten each run, and
prints a table to stdout (progress to stderr).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import (
    MIB,
    Recorder,
    bench_parser,
    cpu_name,
    environment,
    fmt_bytes,
    given,
    log,
    print_table,
    proc_status,
    reset_peak,
)

import hosl
from hosl import estimators, noise, zo
from hosl.config import TrainConfig
from hosl.plan import StepPlan

MU = 1e-3  # perturbation scale
LR_G = 1e-6 * 0.37  # lr times a projected gradient, for the update term; its value does not change the cost
SEED = 20240601
CLIENT_LAYERS = 3
WARMUP = 2
# A measured CPU delta under this counts as "no extra memory": page and thread-stack noise, far below
# any z (the smallest case's z is 4 MiB).
NOISE_FLOOR_BYTES = 1 * MIB

METHODS = {"cpu": "hosl-cpp", "cuda": "hosl-triton"}
MEZO = "mezo"


# --------------------------------------------------------------------------------------------------
# The two ways of adding noise.


def mezo_perturb_(tensors, seed, scale):
    """The MeZO way: reseed the global generator, then regenerate z for each tensor in turn with a
    full-size torch.normal and add scale * z in place."""
    torch.manual_seed(seed)
    for p in tensors:
        z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
        p.data.add_(z, alpha=scale)


def mezo_step_(tensors, seed):
    """MeZO's noise for one ZO step with one probe: four passes, each regenerating z from the seed."""
    mezo_perturb_(tensors, seed, MU)  # perturb to theta + mu z
    mezo_perturb_(tensors, seed, -2 * MU)  # to theta - mu z
    mezo_perturb_(tensors, seed, MU)  # restore theta
    mezo_perturb_(tensors, seed, -LR_G)  # update


def hosl_pass_(x, seed, backend):
    noise.add_(x, [seed], [MU], backend=backend)


# hosl's client step with one probe and loss differences, as the trainer plans it (hosl.plan).
STEP_PLAN = StepPlan.of(TrainConfig(method="hosl", zo_estimator="central", q=1, mu=MU))


class _Buffer:
    """A tensor with ZOParams' pass interface, through one noise backend; its probes are written
    into it (in place), as the step plan's passes assume of such a buffer."""

    in_place = True

    def __init__(self, x, backend):
        self.x, self.backend = x, backend

    def add_(self, seeds, scales, rows=None):
        noise.add_(self.x, seeds, scales, backend=self.backend)


def hosl_step_(x, step, backend):
    """hosl's noise for one ZO step with one probe, walked by the step plan: its passes (+mu z, then
    -2mu z), then the final pass, which merges the restore with the update: three passes (its terms
    from estimators.end_terms; StepPlan.end would add the finite check's read of the buffer)."""
    buffer = _Buffer(x, backend)
    for _ in STEP_PLAN.probes(buffer, step):
        pass
    buffer.add_(*estimators.end_terms(STEP_PLAN.seeds(step), MU, STEP_PLAN.estimator, LR_G / 0.37, [0.37]))


def mezo_accounted_bytes(tensors):
    sizes = [t.numel() * t.element_size() for t in tensors]
    return max([sizes[0]] + [a + b for a, b in itertools.pairwise(sizes)])


# --------------------------------------------------------------------------------------------------
# Timing and memory.


def time_cpu(fn, repeats):
    """(median, min) seconds of fn() over `repeats` timed runs after WARMUP untimed ones.

    One method's runs are kept together rather than alternated with the other's: right after a
    parallel torch op, torch's OpenMP workers spin-wait for a while and hold cores that hosl's own
    threads then compete for (on 2 cores this slowed a 1M-float add_ 1.5-2.5x), so alternating would
    charge the baseline's idle threads to hosl."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def time_cuda(fn):
    from triton.testing import do_bench

    times_ms = do_bench(fn, return_mode="all")
    return statistics.median(times_ms) * 1e-3, min(times_ms) * 1e-3


def cuda_peak_extra(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _probe_memory(spec):
    """Child side of the CPU memory measurement; prints {"peak_extra_bytes": int or None}."""
    torch.set_num_threads(spec["threads"])
    tensors = [torch.randn(shape) for shape in spec["shapes"]]
    x = hosl.FlatParams(tensors).flat if spec["pack"] else tensors[0]
    runs = {
        ("hosl", "pass"): lambda: hosl_pass_(x, SEED, "cpp"),
        ("hosl", "zo_step"): lambda: hosl_step_(x, SEED, "cpp"),
        ("mezo", "pass"): lambda: mezo_perturb_(tensors, SEED, MU),
        ("mezo", "zo_step"): lambda: mezo_step_(tensors, SEED),
    }
    run = runs[spec["method"], spec["bench"]]
    # One-off initialisation (thread stacks, generator state, lazy imports) happens here, on a tiny
    # tensor, and is not counted.
    small = torch.zeros(4096)
    hosl_step_(small, SEED, "cpp")
    mezo_step_([small], SEED)
    if not reset_peak():  # a stale high-water mark would hide the allocation
        print(json.dumps({"peak_extra_bytes": None}))
        return
    before = proc_status("VmHWM")
    run()
    print(json.dumps({"peak_extra_bytes": proc_status("VmHWM") - before}))


def cpu_peak_extra(tensors, pack, method, bench):
    """Peak RSS added by one pass or step, measured in a fresh subprocess on tensors of the same shapes."""
    spec = {
        "shapes": [list(t.shape) for t in tensors],
        "pack": pack,
        "method": method,
        "bench": bench,
        "threads": torch.get_num_threads(),
    }
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_memory-probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {method}/{bench} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# --------------------------------------------------------------------------------------------------
# Cases.


def opt_client_params(quick):
    """The client's parameters: embeddings and the first CLIENT_LAYERS decoder layers of a randomly
    initialised OPT (OPT-125M's shape; a small one with --quick), in module order."""
    from transformers import OPTConfig, OPTForCausalLM

    if quick:
        config = OPTConfig(
            hidden_size=256,
            word_embed_proj_dim=256,  # else OPT adds projections and keeps 768-wide embeddings
            num_attention_heads=4,
            ffn_dim=1024,
            vocab_size=8192,
            num_hidden_layers=CLIENT_LAYERS,
        )
        name = "opt-small-client"
    else:
        config = OPTConfig()
        name = "opt125m-client"
    model = OPTForCausalLM(config)
    decoder = model.model.decoder
    del decoder.layers[CLIENT_LAYERS:]
    modules = [decoder.embed_tokens, decoder.embed_positions, *decoder.layers]
    return name, [p for m in modules for p in m.parameters()]


# --------------------------------------------------------------------------------------------------
# Measuring and recording.


def measure(rec, device, bench, case, x, tensors, pack, repeats, copy_gbps):
    """Times hosl on the flat buffer x and MeZO on `tensors` (the same storage: x itself, or the
    parameters packed into x when `pack`), one pass or one ZO step, and records both."""
    numel = x.numel()
    backend = "cpp" if device.type == "cpu" else "triton"
    if bench == "pass":
        fns = {"hosl": lambda: hosl_pass_(x, SEED, backend), "mezo": lambda: mezo_perturb_(tensors, SEED, MU)}
        passes = {"hosl": 1, "mezo": 1}
    else:
        fns = {"hosl": lambda: hosl_step_(x, SEED, backend), "mezo": lambda: mezo_step_(tensors, SEED)}
        passes = {"hosl": 3, "mezo": 4}
    accounted = {"hosl": 0, "mezo": mezo_accounted_bytes(tensors)}
    for method, fn in fns.items():
        log(f"  {device.type} {bench} {case} {method} ...")
        if device.type == "cpu":
            median_s, min_s = time_cpu(fn, repeats)
            extra = cpu_peak_extra(tensors, pack, method, bench)
            source = "measured: VmHWM delta in a fresh subprocess" if extra is not None else "n/a"
        else:
            median_s, min_s = time_cuda(fn)
            extra = cuda_peak_extra(fn, device)
            source = "measured: torch.cuda.max_memory_allocated delta"
        gbps = passes[method] * 2 * numel * x.element_size() / median_s / 1e9
        rec.add(
            device,
            bench=bench,
            case=case,
            method=METHODS[device.type] if method == "hosl" else MEZO,
            numel=numel,
            terms=1,
            passes=passes[method],
            median_s=median_s,
            min_s=min_s,
            gbytes_per_s=gbps,
            fraction_of_copy_bandwidth=gbps / copy_gbps if copy_gbps else None,
            peak_extra_bytes=extra,
            peak_extra_source=source,
            peak_extra_accounted_bytes=accounted[method],
            timer="time.perf_counter" if device.type == "cpu" else "triton.testing.do_bench",
            repeats=repeats if device.type == "cpu" else None,
        )


def measure_rows(rec, device, params, tokens, repeats):
    """One ZO step's noise through hosl.zo on the client, token embedding dense against row-sparse."""
    named = [(f"p{i}", p) for i, p in enumerate(params)]  # p0: embed_tokens.weight (opt_client_params' order)
    vocab = params[0].shape[0]
    rows = [torch.unique(torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0)))]
    for embedding in ("all", "rows"):
        buffer = zo.ZOParams(named, row_sparse=["p0"] if embedding == "rows" else [])
        picked = rows if embedding == "rows" else None

        def step(buffer=buffer, picked=picked):
            for _ in STEP_PLAN.probes(buffer, 0, picked):
                pass
            STEP_PLAN.end(buffer, 0, [(0, [LR_G / 1e-3], picked)], 1e-3, 0.0)

        log(f"  {device.type} zo_step_rows {embedding} ...")
        median_s, min_s = time_cpu(step, repeats) if device.type == "cpu" else time_cuda(step)
        touched = buffer.numel - (params[0].numel() - rows[0].numel() * params[0].shape[1] if picked else 0)
        rec.add(
            device, bench="zo_step_rows", case=embedding, method=METHODS[device.type], numel=buffer.numel,
            touched=touched, rows=rows[0].numel() if picked else vocab, vocab=vocab, tokens=tokens, passes=3,
            median_s=median_s, min_s=min_s,
        )  # fmt: skip


def measure_dists(rec, device, x, repeats):
    """add_ of z and of r, 1 and 9 terms, on x, and x.add_(c) as the memory floor."""
    backend = "cpp" if device.type == "cpu" else "triton"
    timer = (lambda fn: time_cpu(fn, repeats)) if device.type == "cpu" else time_cuda
    log(f"  {device.type} dists floor ...")
    floor, floor_min = timer(lambda: x.add_(1e-7))
    for terms in (1, 9):
        seeds, scales = [SEED + k for k in range(terms)], [MU] * terms
        for dist in noise.DISTRIBUTIONS:
            log(f"  {device.type} dists {dist} {terms} ...")
            median_s, min_s = timer(functools.partial(noise.add_, x, seeds, scales, backend=backend, dist=dist))
            rec.add(
                device, bench="dists", case=dist, method=METHODS[device.type], numel=x.numel(), terms=terms,
                passes=1, median_s=median_s, min_s=min_s, floor_median_s=floor, floor_min_s=floor_min,
                gbytes_per_s=2 * x.numel() * x.element_size() / median_s / 1e9,
            )  # fmt: skip


def copy_bandwidth(rec, device, quick):
    numel = (64 if quick else 256) * MIB
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    median_s, min_s = time_cuda(lambda: dst.copy_(src))
    gbps = 2 * numel * 4 / median_s / 1e9
    rec.add(
        device,
        bench="copy",
        case=f"copy-{numel // MIB}M",
        method="torch.copy_",
        numel=numel,
        terms=0,
        passes=1,
        median_s=median_s,
        min_s=min_s,
        gbytes_per_s=gbps,
        peak_extra_bytes=None,
        peak_extra_source="n/a",
        timer="triton.testing.do_bench",
    )
    return gbps


# --------------------------------------------------------------------------------------------------
# Output.


def fmt_numel(n):
    return f"{n / 1e6:.2f}M"


def report(records):
    rows = []
    header = [
        "device",
        "case",
        "numel",
        "hosl ms/pass",
        "MeZO ms/pass",
        "MeZO/hosl",
        "hosl GB/s",
        "hosl % copy BW",
        "extra mem hosl measured (accounted)",
        "extra mem MeZO measured (accounted)",
        "target met",
    ]
    passes = [r for r in records if r["bench"] == "pass"]
    keys = list(dict.fromkeys((r["device"], r["case"]) for r in passes))
    verdicts = []
    for dev, case in keys:
        h = next(r for r in passes if (r["device"], r["case"]) == (dev, case) and r["method"] != MEZO)
        m = next(r for r in passes if (r["device"], r["case"]) == (dev, case) and r["method"] == MEZO)
        target = "-"
        if dev == "cpu":
            ok = h["median_s"] <= 0.5 * m["median_s"] and (
                h["peak_extra_bytes"] is not None and h["peak_extra_bytes"] < NOISE_FLOOR_BYTES
            )
            target = "yes" if ok else "NO"
            verdicts.append(ok)
        frac = h.get("fraction_of_copy_bandwidth")
        rows.append(
            [
                dev,
                case,
                fmt_numel(h["numel"]),
                f"{h['median_s'] * 1e3:.3f}",
                f"{m['median_s'] * 1e3:.3f}",
                f"{m['median_s'] / h['median_s']:.2f}x",
                f"{h['gbytes_per_s']:.1f}",
                f"{100 * frac:.0f}%" if frac else "-",
                f"{fmt_bytes(h['peak_extra_bytes'])} ({fmt_bytes(h['peak_extra_accounted_bytes'])})",
                f"{fmt_bytes(m['peak_extra_bytes'])} ({fmt_bytes(m['peak_extra_accounted_bytes'])})",
                target,
            ]
        )
    print_table(header, rows, numeric=[False, False] + [True] * 8 + [False])
    print()
    if verdicts:
        print(
            f"Target (cpp add_ at most half the MeZO way's time per pass, measured extra memory under "
            f"{fmt_bytes(NOISE_FLOOR_BYTES)}): met on {sum(verdicts)} of {len(verdicts)} CPU cases."
        )
    for r in records:
        if r["bench"] == "copy":
            print(f"Copy bandwidth ({r['device_name']}, {r['case']}): {r['gbytes_per_s']:.1f} GB/s.")
    dists = [r for r in records if r["bench"] == "dists"]
    for dev, terms in dict.fromkeys((r["device"], r["terms"]) for r in dists):
        z, r = (
            next(d for d in dists if (d["device"], d["terms"], d["case"]) == (dev, terms, c))
            for c in noise.DISTRIBUTIONS
        )
        print(
            f"One pass of {terms} term(s) over {fmt_numel(z['numel'])} floats on {dev}: Gaussian "
            f"{z['median_s'] * 1e3:.1f} ms, Rademacher {r['median_s'] * 1e3:.1f} ms "
            f"({z['median_s'] / r['median_s']:.1f}x faster, {r['gbytes_per_s']:.1f} GB/s); x.add_(c), one read and "
            f"one write: {r['floor_median_s'] * 1e3:.1f} ms (Rademacher at {r['floor_median_s'] / r['median_s']:.0%} "
            "of that speed)."
        )
    steps = [r for r in records if r["bench"] == "zo_step"]
    by_rows = {(r["device"], r["case"]): r for r in records if r["bench"] == "zo_step_rows"}
    for dev in dict.fromkeys(d for d, _ in by_rows):
        a, b = by_rows[dev, "all"], by_rows[dev, "rows"]
        print(
            f"ZO step noise through hosl.zo on {dev}, Q=1: token embedding dense {a['median_s'] * 1e3:.2f} ms "
            f"({fmt_numel(a['touched'])} elements), row-sparse {b['median_s'] * 1e3:.2f} ms ({b['rows']} of "
            f"{b['vocab']} rows for {b['tokens']} tokens; {fmt_numel(b['touched'])} elements): "
            f"{a['median_s'] / b['median_s']:.2f}x."
        )
    for dev, case in dict.fromkeys((r["device"], r["case"]) for r in steps):
        h = next(r for r in steps if (r["device"], r["case"]) == (dev, case) and r["method"] != MEZO)
        m = next(r for r in steps if (r["device"], r["case"]) == (dev, case) and r["method"] == MEZO)
        print(
            f"ZO step noise, Q=1, {case} ({fmt_numel(h['numel'])} params) on {dev}: "
            f"hosl {h['passes']} passes {h['median_s'] * 1e3:.2f} ms (min {h['min_s'] * 1e3:.2f}), "
            f"MeZO {m['passes']} passes {m['median_s'] * 1e3:.2f} ms (min {m['min_s'] * 1e3:.2f}); "
            f"MeZO/hosl = {m['median_s'] / h['median_s']:.2f}x; extra memory measured (accounted): "
            f"hosl {fmt_bytes(h['peak_extra_bytes'])} ({fmt_bytes(h['peak_extra_accounted_bytes'])}), "
            f"MeZO {fmt_bytes(m['peak_extra_bytes'])} ({fmt_bytes(m['peak_extra_accounted_bytes'])})."
        )


def main(argv=None):
    parser = bench_parser(__doc__, "small sizes and a small OPT client (about a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per CPU measurement (5; --quick: 3)")
    parser.add_argument(
        "--device", default="all", choices=["all", "cpu", "cuda"], help="all: the CPU, and CUDA when present (all)"
    )
    parser.add_argument(
        "--rows-tokens", type=int, default=1024, help="zo_step_rows: tokens in the batch (16 x 64 = 1024)"
    )
    parser.add_argument(
        "--dists-only",
        action="store_true",
        help="only the dists bench: the Gaussian and Rademacher passes (to bench_noise[_quick]_dists.jsonl)",
    )
    parser.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        _probe_memory(json.loads(args.memory_probe))
        return
    repeats = given(args.repeats, 3 if args.quick else 5)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1; got {repeats}")
    if args.rows_tokens < 1:
        parser.error(f"--rows-tokens must be >= 1; got {args.rows_tokens}")

    env = environment()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device here")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices = [d for d in devices if args.device in ("all", d.type)]
    print(f"bench_noise{' --quick' if args.quick else ''}: hosl.noise.add_ vs MeZO-style torch.normal regeneration")
    print(f"CPU: {cpu_name()}, {env['threads']} threads (torch.get_num_threads())")
    if devices[-1].type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(devices[-1])}")
    print(
        f"torch {env['torch']}, triton {env['triton']}, hosl {env['hosl']} ({Path(hosl.__file__).parent}), "
        f"git {env['git_sha']}; {repeats} timed runs after {WARMUP} warm-up on CPU, do_bench on CUDA"
    )
    print()

    name = "bench_noise" + ("_quick" if args.quick else "") + ("" if args.device == "all" else f"_{args.device}")
    name += "_dists" if args.dists_only else ""
    path = args.out / f"{name}.jsonl"
    rec = Recorder(path, env)
    sizes = [1 * MIB, 4 * MIB] if args.quick else [1 * MIB, 16 * MIB, 64 * MIB]
    if args.dists_only:
        for device in devices:
            measure_dists(rec, device, torch.randn(sizes[-1], device=device), repeats)
        report(rec.records)
        print(f"\n{len(rec.records)} records written to {path}")
        return
    log(f"building the OPT client ({'small' if args.quick else 'OPT-125M'} config) ...")
    client_name, client = opt_client_params(args.quick)
    for device in devices:
        copy_gbps = copy_bandwidth(rec, device, args.quick) if device.type == "cuda" else None
        for numel in sizes:
            buf = torch.randn(numel, device=device)
            measure(rec, device, "pass", f"flat-{numel // MIB}M", buf, [buf], False, repeats, copy_gbps)
            if numel == sizes[-1]:
                measure_dists(rec, device, buf, repeats)
            del buf
        params = client if device.type == "cpu" else [p.detach().to(device) for p in client]
        flat = hosl.FlatParams(params).flat  # the parameters become views of it
        for bench in ("pass", "zo_step"):
            measure(rec, device, bench, client_name, flat, params, True, repeats, copy_gbps)
        measure_rows(rec, device, params, args.rows_tokens, repeats)
        del params, flat
    report(rec.records)
    print(f"\n{len(rec.records)} records written to {path}")


if __name__ == "__main__":
    main()
