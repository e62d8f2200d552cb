"""`python -m hosl.plot RUN_DIR [OUT.png]`: a run's loss, evaluation score (accuracy, or a generation
task's eval loss) and step time against the step, from its metrics.jsonl, as one PNG (default
RUN_DIR/metrics.png). `python -m hosl.plot RUN_DIR RUN_DIR ... OUT.png`: several runs' curves on the
same axes, each named by its directory, to compare them. Needs matplotlib (`pip install 'hosl[plot]'`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, evaluation records) of a run's metrics.jsonl; ValueError naming a bad line."""
    path = Path(run_dir) / "metrics.jsonl"
    steps, evals = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        (evals if "eval_accuracy" in record or "eval_loss" in record else steps).append(record)
    if not steps:
        raise ValueError(f"{path}: no step was logged")
    return steps, evals


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("hosl.plot needs matplotlib: pip install 'hosl[plot]'") from None
    return plt


def curves(run_dir: str | Path) -> dict:
    """A run's curves from its metrics.jsonl: steps done, loss (nan where non-finite), the evaluations'
    steps and score (its name too: eval_accuracy, or eval_loss for a generation task), and each
    step's time (client, link and server together)."""
    steps, evals = read_metrics(Path(run_dir))
    score = "eval_loss" if evals and "eval_loss" in evals[0] else "eval_accuracy"
    return {
        "x": [r["step"] + 1 for r in steps],  # steps done, as the console counts (older logs lack steps_done)
        "loss": [math.nan if r["loss"] is None else r["loss"] for r in steps],  # null: non-finite
        "eval_x": [r["step"] + 1 for r in evals],
        "score_name": score,
        "score": [r[score] for r in evals],
        "times": {k.removesuffix("_s"): [r.get(k, 0.0) for r in steps] for k in ("client_s", "link_s", "server_s")},
    }


def compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Several runs' loss, evaluation score and step time on shared axes, one line per run (named by
    its directory), into out; returns the path. ValueError for runs of different scores."""
    names = [Path(d).name for d in run_dirs]
    labels = names if len(set(names)) == len(names) else [str(d) for d in run_dirs]  # the path where names clash
    runs = {label: curves(d) for label, d in zip(labels, run_dirs)}
    scores = {c["score_name"] for c in runs.values() if c["eval_x"]}
    if len(scores) > 1:
        raise ValueError(f"the runs are scored differently ({' and '.join(sorted(scores))}): compare like with like")
    plt = _pyplot()
    fig, (loss_ax, score_ax, time_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for name, c in runs.items():
        (line,) = loss_ax.plot(c["x"], c["loss"], lw=1, label=name)
        score_ax.plot(c["eval_x"], c["score"], "o-", color=line.get_color())
        time_ax.plot(c["x"], [sum(t) for t in zip(*c["times"].values())], lw=1, color=line.get_color())
    loss_ax.set_ylabel("training loss")
    loss_ax.legend(fontsize="small")
    score_ax.set_ylabel((scores.pop() if scores else "eval_accuracy").replace("_", " "))
    time_ax.set_ylabel("step time (s)")
    time_ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves into out (default RUN_DIR/metrics.png); returns the path."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    c = curves(run_dir)
    out = Path(out) if out is not None else run_dir / "metrics.png"
    fig, (loss_ax, acc_ax, time_ax) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    loss_ax.plot(c["x"], c["loss"], lw=1)
    loss_ax.set_ylabel("training loss")
    acc_ax.plot(c["eval_x"], c["score"], "o-")
    acc_ax.set_ylabel(c["score_name"].replace("_", " "))
    bottom = [0.0] * len(c["x"])
    for key, values in c["times"].items():
        time_ax.bar(c["x"], values, bottom=bottom, width=1.0, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    time_ax.set_ylabel("step time (s)")
    time_ax.set_xlabel("step")
    time_ax.legend(loc="upper right")
    loss_ax.set_title(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runs, out = (argv[:-1], argv[-1]) if argv and argv[-1].endswith(".png") else (argv, None)
    if not runs or (len(runs) > 1 and out is None):
        print("usage: python -m hosl.plot RUN_DIR [OUT.png], or RUN_DIR RUN_DIR ... OUT.png", file=sys.stderr)
        return 2
    try:
        out = plot(runs[0], out) if len(runs) == 1 else compare(runs, out)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
