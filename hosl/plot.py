"""`python -m hosl.plot RUN_DIR [OUT.png]`: a run's loss, evaluation score (accuracy, or a generation
task's eval loss) and step time against
the step, from its metrics.jsonl, as one PNG (default RUN_DIR/metrics.png). Needs matplotlib
(`pip install 'hosl[plot]'`)."""

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


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves into out (default RUN_DIR/metrics.png); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("hosl.plot needs matplotlib: pip install 'hosl[plot]'") from None
    run_dir = Path(run_dir)
    steps, evals = read_metrics(run_dir)
    out = Path(out) if out is not None else run_dir / "metrics.png"
    x = [r["step"] + 1 for r in steps]  # steps done, as the console counts (older logs lack steps_done)
    fig, (loss_ax, acc_ax, time_ax) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    loss_ax.plot(x, [math.nan if r["loss"] is None else r["loss"] for r in steps], lw=1)  # null: non-finite
    loss_ax.set_ylabel("training loss")
    score = "eval_loss" if evals and "eval_loss" in evals[0] else "eval_accuracy"
    acc_ax.plot([r["step"] + 1 for r in evals], [r[score] for r in evals], "o-")
    acc_ax.set_ylabel(score.replace("_", " "))
    bottom = [0.0] * len(steps)
    for key in ("client_s", "link_s", "server_s"):
        values = [r.get(key, 0.0) for r in steps]
        time_ax.bar(x, values, bottom=bottom, width=1.0, label=key.removesuffix("_s"))
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
    if len(argv) not in (1, 2):
        print("usage: python -m hosl.plot RUN_DIR [OUT.png]", file=sys.stderr)
        return 2
    try:
        out = plot(*argv)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
