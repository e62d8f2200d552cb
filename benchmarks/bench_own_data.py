"""Your own data on a real model: SmolLM2-135M-Instruct fine-tuned from a prompt/completion JSONL
(generation) and from a CSV of labelled texts (classification), each one `python -m hosl.train
--train-file ... --eval-file ...` run, then exported and reloaded with transformers.

The two files are written at run time into --out-root from ../shared/data (or $HOSL_DATA):
  * rte-sft.jsonl: RTE's entailed pairs as instruction data, prompt "<premise>\\nWhat follows from
    this text?\\n" and completion "<hypothesis>" (rows of at most --max-chars characters, so that
    each fits --max-length). Evaluation: the eval completions' loss per token. Rows: the untrained
    model (--steps 0), a frozen client (client rate 0: the server alone trains), fo and hosl
    (cut-grad-one-sided, Q = 8), seeds --seeds. The hosl run of the first seed is exported, reloaded
    with AutoModelForCausalLM and greedy-generates the first eval prompts; its loss per token on the
    eval completions, computed by transformers, must equal the run's.
  * sst2.csv: SST-2 as text,label with --template "{text} It was" --verbalizers "0: terrible,
    1: great" (the sst2 preset's task, as a user would write it). The untrained model must score
    exactly what the preset scores on the same rows; then hosl trains on it, and the exported model,
    reloaded with transformers, classifies the eval rows with the run's accuracy.

Runs are kept under --out-root; a finished run is not run again. The records:
benchmarks/results/bench_own_data.jsonl.

    python benchmarks/bench_own_data.py            # about an hour on 2 cores
    python benchmarks/bench_own_data.py --report   # the tables of the finished runs
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _common import REPO, Recorder, bench_parser, environment, print_table, train_run
from bench_accuracy import smollm2

# The runs: SmolLM2 cut after block 27 (where the client matters on SST-2), the server first-order
# (AdamW 1e-5, bench_client's), the ZO client at bench_client's rate for SmolLM2.
BASE = ["--split-layer", "27", "--server-lr", "1e-5", "--optimizer", "adamw", "--batch-size", "8", "--mu", "1e-3",
        "--log-every", "5"]  # fmt: skip
VARIANTS = {
    "untrained": ["--method", "hosl", "--steps", "0"],
    "frozen-client": ["--method", "hosl", "--client-lr", "0", "--zo-estimator", "cut-grad", "--q", "1"],
    "fo": ["--method", "fo", "--client-lr", "1e-5"],
    "hosl": [
        "--method",
        "hosl",
        "--zo-step",
        "sgd",
        "--client-lr",
        "6e-5",
        "--zo-estimator",
        "cut-grad-one-sided",
        "--q",
        "8",
    ],
}
PROMPT = "{premise}\nWhat follows from this text?\n"


def write_files(data: Path, out: Path, max_chars: int) -> dict[str, tuple[Path, Path]]:
    """The two tasks' train and eval files, from the shared RTE and SST-2 files."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, name in (("train", "train.jsonl"), ("eval", "val.jsonl")):
        rows = [json.loads(line) for line in (data / "rte" / name).read_text().splitlines() if line.strip()]
        kept = [r for r in rows if r["label"] == "entailment" and len(r["premise"] + r["hypothesis"]) <= max_chars]
        path = out / f"rte-sft-{split}.jsonl"
        path.write_text("".join(json.dumps({"prompt": PROMPT.format(**r), "completion": r["hypothesis"]}) + "\n"
                                for r in kept))  # fmt: skip
        files.setdefault("rte-sft", []).append(path)
    for split, name in (("train", "train.tsv"), ("eval", "dev.tsv")):
        lines = (data / "sst2" / name).read_text().splitlines()[1:]
        path = out / f"sst2-{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for line in lines:  # GLUE's sentences end in a space, which the preset strips
                text, label = line.split("\t")
                writer.writerow([text.strip(), label])
        files.setdefault("sst2-csv", []).append(path)
    return {k: tuple(v) for k, v in files.items()}


def task_flags(task: str, files, args) -> list[str]:
    train, evals = files[task]
    flags = ["--train-file", str(train), "--eval-file", str(evals)]
    if task == "sst2-csv":
        flags += ["--template", "{text} It was", "--verbalizers", "0: terrible, 1: great", "--max-length", "64",
                  "--train-examples", "1000", "--eval-examples", str(args.eval_examples)]  # fmt: skip
    else:
        flags += ["--max-length", str(args.max_length)]
    return flags


def run_one(args, name: str, flags: list[str]) -> Path | None:
    return train_run(args.out_root, name, flags, args.report, "bench_own_data")


def exported_check(run_dir: Path, out: Path, task: str, n_generate: int) -> dict:
    """Export the run, reload it with transformers, and score the eval rows there: the loss per
    completion token (generation) or the rank-classification accuracy (classification); and greedy
    generations of the first eval prompts."""
    import torch
    import transformers

    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "hosl.export", str(run_dir), str(out)], check=True, cwd=REPO)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    config = json.loads((run_dir / "config.json").read_text())
    sys.path.insert(0, str(REPO))
    from hosl.config import TrainConfig
    from hosl.scoring import accuracy, candidate_scores, rank_classify
    from hosl.tasks import encode_candidates, encode_for_training, load_run_data
    from hosl.tokenizers import HFTokenizer

    cfg = TrainConfig.from_json(json.dumps(config))
    _, evals = load_run_data(cfg)
    tokenizer = HFTokenizer(tok)
    result = {}
    with torch.no_grad():
        if task == "rte-sft":
            total, tokens = 0.0, 0
            for start in range(0, len(evals), 16):
                batch = encode_for_training(tokenizer, evals[start : start + 16], cfg.max_length)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                counts = (batch["labels"] != -100).sum(dim=1)
                total += float((candidate_scores(logits, batch["labels"]).double() * counts).sum())
                tokens += int(counts.sum())
            result["reloaded_eval_loss"] = -total / tokens
            generations = []
            for ex in list(evals)[:n_generate]:
                ids = tok(ex.context, return_tensors="pt").input_ids
                new = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
                generations.append({"prompt": ex.context, "reference": ex.candidates[0],
                                    "generated": tok.decode(new, skip_special_tokens=True)})  # fmt: skip
            result["generations"] = generations
        else:
            predictions = []
            for start in range(0, len(evals), 16):
                chunk = evals[start : start + 16]
                batch, index = encode_candidates(tokenizer, chunk, cfg.max_length)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                predictions.append(rank_classify(candidate_scores(logits, batch["labels"]), index, len(chunk)))
            result["reloaded_eval_accuracy"] = accuracy(torch.cat(predictions), evals)
    return result


def main(argv=None):
    parser = bench_parser(__doc__, out="directory for the records")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--report", action="store_true", help="only the tables of the finished runs")
    parser.add_argument("--out-root", default="runs/bench_own_data", help="run directories and the task files")
    parser.add_argument("--max-chars", type=int, default=300, help="longest RTE premise + hypothesis kept")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-examples", type=int, default=300, help="SST-2 eval rows")
    parser.add_argument("--generate", type=int, default=3, help="eval prompts the reloaded model completes")
    args = parser.parse_args(argv)
    model_dir, gguf = smollm2()
    data = Path(os.environ.get("HOSL_DATA", str(REPO.parent / "shared" / "data")))
    root = Path(args.out_root).resolve()
    args.out_root = root
    files = write_files(data, root / "files", args.max_chars)
    model = ["--model", model_dir, "--gguf-file", gguf]
    recorder = Recorder(args.out / "bench_own_data.jsonl", environment())
    import torch

    device = torch.device("cpu")
    rows = []
    for task in ("rte-sft", "sst2-csv"):
        variants = VARIANTS if task == "rte-sft" else {k: VARIANTS[k] for k in ("untrained", "hosl")}
        for variant, flags in variants.items():
            for seed in args.seeds if variant != "untrained" else args.seeds[:1]:
                steps = [] if variant == "untrained" else ["--steps", str(args.steps)]
                name = f"{task}-{variant}-s{seed}"
                run_dir = run_one(args, name, [*model, *task_flags(task, files, args), *BASE, *flags, *steps,
                                               "--seed", str(seed)])  # fmt: skip
                if run_dir is None:
                    continue
                summary = json.loads((run_dir / "summary.json").read_text())
                score = {k: summary[k] for k in ("final_eval_loss", "final_eval_accuracy") if k in summary}
                extra = {}
                if variant == "hosl" and seed == args.seeds[0]:
                    extra = exported_check(run_dir, root / f"{name}-hf", task, args.generate)
                rows.append(recorder.add(device, task=task, variant=variant, seed=seed, steps=summary["steps"],
                                         wall_seconds=summary["wall_seconds"], **score, **extra))  # fmt: skip
    if any(r["task"] == "sst2-csv" and r["variant"] == "untrained" for r in rows):
        # The preset on the same rows: its untrained score must be the CSV's.
        train, evals = files["sst2-csv"]
        name = "sst2-preset-untrained-s0"
        flags = [*model, "--task", "sst2", "--data-dir", str(data), "--max-length", "64", "--train-examples", "1000",
                 "--eval-examples", str(args.eval_examples), *BASE, *VARIANTS["untrained"], "--seed", "0"]  # fmt: skip
        run_dir = run_one(args, name, flags)
        if run_dir is not None:
            acc = json.loads((run_dir / "summary.json").read_text())["final_eval_accuracy"]
            rows.append(recorder.add(device, task="sst2-preset", variant="untrained", seed=0, steps=0,
                                     final_eval_accuracy=acc))  # fmt: skip
    report(rows)


def report(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    table = []
    for (task, variant), rs in groups.items():
        key = "final_eval_loss" if "final_eval_loss" in rs[0] else "final_eval_accuracy"
        values = [r[key] for r in rs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        check = rs[0].get("reloaded_eval_loss", rs[0].get("reloaded_eval_accuracy"))
        wall = statistics.fmean(r.get("wall_seconds", 0) for r in rs)
        table.append([task, variant, len(rs), key.removeprefix("final_eval_"),
                      f"{statistics.fmean(values):.4f} +- {spread:.4f}", "-" if check is None else f"{check:.4f}",
                      f"{wall:.0f}"])  # fmt: skip
    print_table(["task", "variant", "seeds", "metric", "mean +- std", "reloaded (transformers)", "wall (s)"], table,
                numeric=[False, False, True, False, True, True, True])  # fmt: skip
    for r in rows:
        for g in r.get("generations", []):
            print(f"\n{r['task']} {r['variant']} s{r['seed']}:\n  prompt: {g['prompt']!r}\n  reference: "
                  f"{g['reference']!r}\n  generated: {g['generated']!r}")  # fmt: skip


if __name__ == "__main__":
    main()
