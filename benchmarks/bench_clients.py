"""Many clients, one server (hosl.clients): rounds per second, the server's time per client, the
wait for stragglers, and each client's bytes per round split into activations and synchronisation,
for N clients in {1, 2, 4, 8} over both transports; the synchronisation bytes against the model's
size; and the memory of one client process against a one-client run's.

Each point is one `python -m hosl.train` run (local: one process, the server and clients as
threads; dist: `torchrun --nproc-per-node N+1`, one torch thread per process), read back from its
summary.json. Setting: hosl's defaults on the built-in model and task (the records in
benchmarks/README.md ran with cut-grad, Q = 8, the defaults then), batch 16,
every client sampled each round (K = N), --steps rounds. On this machine's two cores the N + 1
processes of a dist run share the cores, so its rounds per second say what the protocol costs when
compute is scarce, not what N devices would do in parallel.

Parts (--parts; all by default):
* rounds: the grid above. Synchronisation is what REPORT (up) and ROUND (down) frames carry: g
  and the row lists; activations are the rest of the link's bytes.
* sync: bytes of synchronisation per client per round at K = 8, Q = 1 with --zo-embedding all (no
  row lists), on models of different sizes: the target is under 1 KB, whatever the size.
* memory: the client process's peak RSS (dist, so the client is alone in its process) for one
  client (--clients 1, in-place probes) against the lead of --clients 4 (scratch probes, ROUND
  frames): the target is within 5%.
* accuracy (not in the default parts: --parts accuracy): the built-in model on --task (synthetic,
  the built-in task; or sst2 from ../shared/data or $HOSL_DATA, which the built-in model does not
  learn at this budget), N in {1, 2, 4, 8} at the same number of training examples seen (--examples
  in all: N clients of batch 16 take examples / (16 N) rounds), IID and Dirichlet(0.1) shards,
  --seeds seeds. It resumes: a point already in bench_clients_accuracy.jsonl is kept.

    python benchmarks/bench_clients.py --quick     # N in {1, 2}, a few rounds: a minute
    python benchmarks/bench_clients.py             # the whole grid, about 15 minutes on 2 cores

Writes benchmarks/results/bench_clients.jsonl (--quick: bench_clients_quick.jsonl) and prints the tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import Recorder, bench_parser, environment, fmt_bytes, free_port, log, print_table

PARTS = ("rounds", "sync", "memory", "accuracy")
DEFAULT_PARTS = ["rounds", "sync", "memory"]
REPO = Path(__file__).resolve().parent.parent


def _run(flags: list[str], transport: str, clients: int, out: Path, timeout: float = 1800) -> dict:
    """One training run; its summary."""
    base = [*flags, "--clients", str(clients), "--out", str(out), "--log-every", "1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1") if transport == "dist" else dict(os.environ)
    if transport == "dist":
        cmd = [
            "torchrun",
            "--nproc-per-node",
            str(clients + 1),
            "--master-port",
            str(free_port()),
            "-m",
            "hosl.train",
            *base,
            "--transport",
            "dist",
            "--insecure",
        ]  # fmt: skip  (loopback)
    else:
        cmd = [sys.executable, "-m", "hosl.train", *base]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in steps if "bytes_up" in r][-1]  # logged before the final evaluation
    summary["training_bytes"] = last["bytes_up"] + last["bytes_down"]
    return summary


def _per_round(summary: dict, rounds: int) -> dict:
    """Per round, of the lead client: its synchronisation, the rest of its training traffic (the
    activations: the evaluation's are left out), and the server's mean times per client step."""
    sync = (summary.get("sync_bytes_per_client") or [0])[0]
    stats = summary.get("server_stats") or []
    return {
        "rounds_per_s": rounds / summary["train_seconds"],
        "sync_bytes_per_round": sync / rounds,
        "activation_bytes_per_round": (summary["training_bytes"] - sync) / rounds,
        "server_step_s": sum(s["step_s"] for s in stats) / max(sum(s["steps"] for s in stats), 1) if stats else None,
        "straggler_wait_s": sum(s["wait_s"] for s in stats) / max(sum(s["steps"] for s in stats), 1)
        if stats
        else None,
    }


def main(argv=None) -> int:
    parser = bench_parser(__doc__, quick="N in {1, 2} and a few rounds")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=DEFAULT_PARTS)
    parser.add_argument("--examples", type=int, default=7680, help="accuracy: training examples seen per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="accuracy: run seeds")
    parser.add_argument("--task", choices=("synthetic", "sst2"), default="synthetic", help="accuracy: the task")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="N (default 1 2 4 8; --quick 1 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default 30; --quick 4)")
    parser.add_argument("--transports", nargs="+", choices=("local", "dist"), default=["local", "dist"])
    args = parser.parse_args(argv)
    for n in args.clients or []:
        if n < 1:
            parser.error(f"--clients must be >= 1, got {n}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    ns = args.clients or ([1, 2] if args.quick else [1, 2, 4, 8])
    rounds = args.rounds or (4 if args.quick else 30)
    name = "bench_clients_quick.jsonl" if args.quick else "bench_clients.jsonl"
    # The other parts' file is rewritten only when one of them runs.
    rec = Recorder(args.out / name, environment()) if set(args.parts) - {"accuracy"} else None
    cpu = torch.device("cpu")
    work = Path(tempfile.mkdtemp(prefix="hosl_bench_clients_"))
    common = ["--steps", str(rounds), "--batch-size", "16", "--eval-examples", "32"]
    at = 0

    def out_dir():
        nonlocal at
        at += 1
        return work / f"run{at}"

    if "rounds" in args.parts:
        rows = []
        for transport in args.transports:
            for n in ns:
                log(f"rounds: {transport}, N = {n}")
                summary = _run(common, transport, n, out_dir())
                r = rec.add(cpu, part="rounds", transport=transport, clients=n, rounds=rounds,
                            **_per_round(summary, rounds))  # fmt: skip
                rows.append([transport, n, f"{r['rounds_per_s']:.2f}", f"{r['rounds_per_s'] * n:.2f}",
                             "n/a" if r["server_step_s"] is None else f"{1e3 * r['server_step_s']:.1f}",
                             "n/a" if r["straggler_wait_s"] is None else f"{1e3 * r['straggler_wait_s']:.1f}",
                             fmt_bytes(round(r["activation_bytes_per_round"])),
                             fmt_bytes(round(r["sync_bytes_per_round"]))])  # fmt: skip
        print("\nRounds (K = N, cut-grad Q = 8, batch 16): the lead client's bytes per round")
        print_table(["transport", "N", "rounds/s", "client steps/s", "server ms/client", "straggler wait ms",
                     "activations", "sync"], rows, [False] + [True] * 7)  # fmt: skip

    if "sync" in args.parts:
        rows = []
        models = ["builtin:tiny"] if args.quick else ["builtin:tiny", "builtin:tiny-opt", "builtin:opt-125m"]
        n = 2 if args.quick else 8
        for model in models:
            log(f"sync: {model}, N = {n}")
            flags = ["--model", model, "--steps", "3", "--batch-size", "4", "--q", "1", "--zo-embedding", "all",
                     "--eval-examples", "8", "--train-examples", "64", "--max-length", "32"]  # fmt: skip
            summary = _run(flags, "local", n, out_dir())
            per = _per_round(summary, 3)
            r = rec.add(cpu, part="sync", model=model, clients=n, q=1, client_trainable_params=summary[
                "client_trainable_params"], **per)  # fmt: skip
            rows.append([model, f"{r['client_trainable_params']:,}", n, round(r["sync_bytes_per_round"])])
        print(f"\nSynchronisation per client per round (K = {n}, Q = 1, no row lists), bytes")
        print_table(["model", "client parameters", "K", "sync bytes"], rows)

    if "memory" in args.parts:
        rows = []
        for n in (1, 4):
            log(f"memory: dist, N = {n}")
            flags = ["--model", "builtin:opt-125m", "--split-layer", "3", "--steps", "4", "--batch-size", "8",
                     "--eval-examples", "16", "--train-examples", "256"]  # fmt: skip
            summary = _run(flags, "dist", n, out_dir())
            r = rec.add(cpu, part="memory", model="builtin:opt-125m", clients=n,
                        client_peak_memory_bytes=summary["client_peak_memory_bytes"])  # fmt: skip
            rows.append([n, fmt_bytes(r["client_peak_memory_bytes"])])
        base = rec.records[-2]["client_peak_memory_bytes"]
        print("\nThe client process's peak RSS (dist, OPT-125M shape cut at 3, batch 8)")
        print_table(["N", "peak RSS"], rows)
        print(f"N = 4 / N = 1: {rec.records[-1]['client_peak_memory_bytes'] / base:.3f}")
    if "accuracy" in args.parts:  # its own file, which it extends
        _accuracy(args, [n for n in ns if args.examples % (16 * n) == 0], out_dir, cpu)
    if rec is not None:
        log(f"wrote {rec.path}")
    return 0


def _accuracy(args, ns, out_dir, cpu) -> None:
    path = args.out / "bench_clients_accuracy.jsonl"
    done = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    key = ("task", "clients", "partition", "seed", "examples")
    have = {tuple(r[k] for k in key): r for r in done}
    rec = Recorder(path, environment())
    rec.records = list(done)
    path.write_text("".join(json.dumps(r) + "\n" for r in done))
    data = os.environ.get("HOSL_DATA", str(REPO.parent / "shared" / "data"))
    for seed in args.seeds:
        for partition in ("iid", "dirichlet"):
            for n in ns:
                if n == 1 and partition == "dirichlet":
                    continue  # one client holds every example either way
                point = (args.task, n, partition if n > 1 else "iid", seed, args.examples)
                if point in have:
                    log(f"accuracy: N = {n}, {partition}, seed {seed}: done before, kept")
                    continue
                log(f"accuracy: N = {n}, {partition}, seed {seed}")
                flags = ["--task", args.task, "--batch-size", "16", "--seed", str(seed),
                         "--steps", str(args.examples // (16 * n))]  # fmt: skip
                flags += ["--data-dir", data] if args.task == "sst2" else []
                if n > 1:
                    flags += ["--partition", partition] + (["--alpha", "0.1"] if partition == "dirichlet" else [])
                summary = _run(flags, "local", n, out_dir(), timeout=3600)
                rec.add(
                    cpu,
                    part="accuracy",
                    task=args.task,
                    clients=n,
                    partition=point[2],
                    seed=seed,
                    examples=args.examples,
                    rounds=args.examples // (16 * n),
                    accuracy=summary["final_eval_accuracy"],
                    shard_examples=summary.get("shard_examples"),
                    train_seconds=summary["train_seconds"],
                )
    rows = []
    for partition in ("iid", "dirichlet"):
        for n in ns:
            want = (args.task, n, partition if n > 1 else "iid", args.examples)
            got = [
                r["accuracy"]
                for r in rec.records
                if (r["task"], r["clients"], r["partition"], r["examples"]) == want and r["seed"] in args.seeds
            ]
            if got:
                mean = sum(got) / len(got)
                rows.append([partition, n, args.examples // (16 * n), f"{mean:.3f}", len(got)])
    print(f"\n{args.task} accuracy at {args.examples} training examples seen (built-in model, hosl defaults)")
    print_table(["shards", "N", "rounds", "accuracy (mean)", "seeds"], rows, [False] + [True] * 4)
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
