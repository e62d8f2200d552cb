"""`python -m hosl.train`: fine-tune a causal LM split between a zeroth-order client and a
first-order server (HOSL), or with one of the baselines, and evaluate it by rank classification.

With no flags it runs the embedded default: HOSL on a built-in model and the built-in synthetic
task, no network, about a minute on two CPU cores. `--help` lists every flag. Bad input gets one
line on stderr and exit status 2; a broken link one line and exit status 1.

The run directory (--out) receives config.json, metrics.jsonl (one line per logged step),
zo_log.jsonl (the client's projected gradients, for hosl.replay), summary.json, the final weights
as safetensors, manifest.json (their SHA-256 digests), and checkpoint-<step>/ when --save-every is
set (hosl.checkpoint: atomic, verified, the last --save-total-limit kept). `--resume DIR` verifies
the newest checkpoint, continues the run from it and ends with the same bits as a run that never
stopped.

This module is main and the loop (`train`); hosl.session wires the run (which sides this process
holds, over which transport, one client or many) and writes its summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from hosl import checkpoint, scoring
from hosl.config import RESUMABLE, RUN_ONLY, TrainConfig, UsageError, build_parser, parse_config
from hosl.models import ModelError
from hosl.optim import DivergedError, SkipCounter, lr_factor
from hosl.scoring import evaluate  # noqa: F401  (hosl.train.evaluate, as before)
from hosl.session import kept_lines, open_session, peak_memory_bytes
from hosl.split import SplitError
from hosl.tasks import Batches, TaskError, check_fits
from hosl.transport import LinkError

__all__ = ["Batches", "UsageError", "main", "run", "train"]

logger = logging.getLogger("hosl.train")


# -- data ---------------------------------------------------------------------------------------------


# -- the run ---------------------------------------------------------------------------------------------


def _record_eval(state: dict, best_key: str, metrics: dict, step: int) -> None:
    """An evaluation into the run's state: its record, and the best so far."""
    state["evals"].append({"step": step, "steps_done": step + 1, **metrics})
    best = state.get(best_key)
    value = metrics[best_key.removeprefix("best_eval_")]
    if best is None or (value > best if best_key == "best_eval_accuracy" else value < best):
        state[best_key] = value


def _eval_text(metrics: dict) -> str:
    if "accuracy" in metrics:
        return f"eval accuracy {metrics['accuracy']:.4f}"
    return f"eval loss {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f})"


def strict_json(record) -> str:
    """A JSON line any parser reads: a non-finite float (a diverged loss or projected gradient)
    becomes null, where json.dumps would write the bare NaN or Infinity that strict parsers refuse.
    A step with one is a skipped step, whose values nothing replays."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(record), allow_nan=False)


class _Writer:
    """metrics.jsonl (appending), the progress bar, and with --report-to tensorboard the same numbers
    as scalars (train/<key>, eval/<key>) in RUN_DIR/tensorboard. Every record has `step` (from 0, the
    index that resume and replay use) and `steps_done` (from 1, what the console, hosl.plot and
    TensorBoard count). A resumed run purges the events after its checkpoint, as it rewrites
    metrics.jsonl from there."""

    def __init__(self, run_dir: Path, total: int, start: int, report_to: str | None = None):
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.board = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        except ImportError:  # tqdm comes with transformers; without it, log lines only
            self.bar = None

    def write(self, record: dict) -> None:
        self.file.write(strict_json(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key not in ("step", "steps_done") and isinstance(value, (int, float)) and value is not None:
                    tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                    self.board.add_scalar(tag, value, record["steps_done"])
            self.board.flush()

    def tick(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def paused(self, seconds: float) -> None:
        """Leave `seconds` of other work (an evaluation, a checkpoint) out of the bar's step rate."""
        if self.bar is not None:
            self.bar.start_t += seconds
            self.bar.last_print_t += seconds

    def line(self, text: str) -> None:
        """One line on stderr, above the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.board is not None:
            self.board.close()
        self.file.close()


def train(
    cfg: TrainConfig,
    trainer,
    tokenizer,
    train_examples,
    eval_examples,
    run_dir: Path,
    link=None,
    resume=None,
    batches=None,
) -> dict:
    """The loop: steps, logging, evaluation, checkpoints; returns the summary. resume: the verified
    checkpoint (hosl.checkpoint.ResumePoint) to continue from. batches: the batch of each step
    (default: Batches over train_examples)."""
    start_step = 0
    check_fits(tokenizer, train_examples, cfg.max_length, "training data")
    check_fits(tokenizer, eval_examples, cfg.max_length, "evaluation data")
    metric = "loss" if eval_examples[0].generation else "accuracy"  # the one that picks the best evaluation
    best_key = f"best_eval_{metric}"
    state = {best_key: None, "evals": [], "skipped_steps": 0, "wall_seconds": 0.0, "bytes": [0, 0]}
    if resume is not None:
        logs = {name: kept_lines(run_dir / name, resume.step) for name in ("metrics.jsonl", "zo_log.jsonl")}
        checkpoint.load_run(resume, trainer)  # every check before the first file is rewritten
        state = {k: v for k, v in resume.state.items() if k != "step"}
        start_step = resume.step
        for name, keep in logs.items():
            if keep is not None:
                (run_dir / name).write_text("".join(line + "\n" for line in keep))
    batches = batches or Batches(train_examples, tokenizer, cfg)
    writer = _Writer(run_dir, cfg.steps, start_step, cfg.report_to)
    zo_log = open(run_dir / "zo_log.jsonl", "a") if trainer.zo is not None else None
    wall_start = time.perf_counter() - state["wall_seconds"]
    before = state["bytes"]  # counted by the process that ran the steps before a resume

    def traffic() -> list[int]:
        now = getattr(trainer, "link", None) or link  # a client that dialled again counts on its new link
        return [before[0] + (now.bytes_sent if now else 0), before[1] + (now.bytes_received if now else 0)]

    final = None
    skips = SkipCounter(cfg.max_skipped, "client" if trainer.split_client else "model")
    train_s = 0.0  # training steps only: no evaluation, checkpoint or log writing
    try:
        for step in range(start_step, cfg.steps):
            t = time.perf_counter()
            stats = trainer.train_step(step, batches(step))
            train_s += time.perf_counter() - t
            state["skipped_steps"] += stats.skipped
            if zo_log is not None:
                lr = trainer.rate * lr_factor(cfg, step)  # what the step used; replay applies it
                record = {"step": step, "lr": lr, "mu": cfg.mu, "grads": stats.grads, "skipped": stats.skipped}
                if stats.rows is not None:
                    record["rows"] = stats.rows
                if stats.clients is not None:  # a round of many clients: grads and rows per client
                    record["clients"] = stats.clients
                zo_log.write(strict_json(record) + "\n")
                zo_log.flush()  # a killed run's log covers every step it finished
            skips(stats.skipped, step)  # after the log line: the log covers the step that stops the run
            writer.tick(stats.loss)
            last = step + 1 == cfg.steps
            if step % cfg.log_every == 0 or last:
                record = {
                    "step": step,
                    "steps_done": step + 1,
                    "loss": stats.loss,
                    "client_lr": cfg.client_lr * lr_factor(cfg, step),
                    "server_lr": cfg.server_lr * lr_factor(cfg, step),
                    "client_s": stats.client_s,
                    "link_s": stats.link_s,
                    "server_s": stats.server_s,
                    "bytes_up": traffic()[0],
                    "bytes_down": traffic()[1],
                    "client_peak_memory_bytes": peak_memory_bytes(),
                    "skipped_steps": state["skipped_steps"],
                }
                writer.write(record)
                logger.debug(
                    "step %d loss %.4f client %.3fs link %.3fs server %.3fs",
                    step,
                    stats.loss,
                    stats.client_s,
                    stats.link_s,
                    stats.server_s,
                )
            # A round applied late, from the server's log, is not evaluated: the server has moved on.
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not stats.caught_up) or last:
                t = time.perf_counter()
                metrics = scoring.evaluate(trainer, tokenizer, eval_examples, cfg, step)
                writer.paused(time.perf_counter() - t)
                _record_eval(state, best_key, metrics, step)
                writer.write({"step": step, "steps_done": step + 1, **{f"eval_{k}": v for k, v in metrics.items()}})
                up, down = traffic()
                writer.line(
                    f"step {step + 1}/{cfg.steps} | loss {stats.loss:.4f} | {_eval_text(metrics)} "
                    f"(best {state[best_key]:.4f}) | {train_s / (step + 1 - start_step):.3f} s/step | "
                    f"up {up / 2**20:.1f} MiB, down {down / 2**20:.1f} MiB | skipped {state['skipped_steps']}"
                )
                if last:
                    final = metrics
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or (last and cfg.save_every):
                t = time.perf_counter()
                state["wall_seconds"] = time.perf_counter() - wall_start
                state["bytes"] = traffic()
                checkpoint.save_run(run_dir, trainer, cfg.save_total_limit, step + 1, state)
                writer.paused(time.perf_counter() - t)
    finally:
        writer.close()
        if zo_log is not None:
            zo_log.close()
    if final is None:  # no step ran (steps already reached on resume, or --steps 0)
        final = scoring.evaluate(trainer, tokenizer, eval_examples, cfg, cfg.steps)
        best = state.get(best_key)
        _record_eval(state, best_key, final, start_step - 1)
        if best is not None:  # a resumed run's best stays what its steps reached
            state[best_key] = best
        what = "the untrained model" if start_step == 0 else f"the model after its {start_step} steps"
        print(f"no step to run: evaluated {what}: {_eval_text(final)}", file=sys.stderr)
    return {
        "train_seconds": train_s,
        **{f"final_eval_{k}": v for k, v in final.items()},
        best_key: state[best_key],
        "evals": state["evals"],
        "skipped_steps": state["skipped_steps"],
        "wall_seconds": time.perf_counter() - wall_start,
        "bytes_up": traffic()[0],
        "bytes_down": traffic()[1],
    }


def run(cfg: TrainConfig) -> dict | None:
    """This process's part of the run cfg describes, over its transport: the summary, or None in a
    process that only served or followed (a dist server, a dist client other than the lead)."""
    with open_session(cfg) as session:
        if session is None:
            return None
        result = train(cfg, session.trainer, session.tokenizer, session.train_examples, session.eval_examples,
                       session.run_dir, session.link, session.point, session.batches)  # fmt: skip
        session.end(result)
    return session.finish(result)


def _resolve_resume(argv) -> TrainConfig:
    """--resume DIR: the saved config, with the flags given now allowed to change only RUN_ONLY fields."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if "resume" not in given or given.get("resume") is None:
        return parse_config(argv)
    run_dir = Path(given["resume"])
    path = run_dir / "config.json"
    try:
        saved = TrainConfig.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--resume {run_dir}: no config.json there (not a hosl run directory?)") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 (byte {exc.start})") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    given.pop("config", None)
    out = given.pop("out", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise UsageError(f"--resume {run_dir} writes to that directory: --out {out} names another one")
    changed = sorted(k for k, v in given.items() if k not in RUN_ONLY | RESUMABLE and v != getattr(saved, k))
    if changed:
        what = ", ".join(f"--{k.replace('_', '-')} {given[k]!r} (run: {getattr(saved, k)!r})" for k in changed)
        raise UsageError(f"--resume {run_dir} is a run with another config: {what}")
    new = {k: v for k, v in given.items() if k in RESUMABLE and v != getattr(saved, k)}
    for k, v in new.items():  # said once, and in config.json, metrics.jsonl and zo_log.jsonl from here on
        print(f"--resume {run_dir}: {_flag_name(k)} {v!r} from its checkpoint on (was {getattr(saved, k)!r})",
              file=sys.stderr)  # fmt: skip
    return dataclasses.replace(saved, **{k: v for k, v in given.items() if k in RUN_ONLY}, **new, out=str(run_dir))


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _print_summary(summary: dict, run_dir: str) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if v < 1e4 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    scores = [k for k in ("final_eval_accuracy", "best_eval_accuracy", "final_eval_loss", "final_eval_perplexity",
                          "best_eval_loss") if k in summary]  # fmt: skip
    keys = ["method", "model", "task", "split_layer", "steps", *scores,
            "client_peak_memory_bytes", "bytes_up", "bytes_down", "skipped_steps", "wall_seconds"]  # fmt: skip
    keys += ["cuda_peak_memory_bytes"] if "cuda_peak_memory_bytes" in summary else []
    width = max(map(len, keys))
    print(f"\nrun directory: {run_dir}")
    for k in keys:
        print(f"  {k:<{width}}  {fmt(summary.get(k))}")


def _quiet_rank() -> bool:
    """A rank other than 0 of a torchrun job on one machine: its ranks parse the same flags and read
    the same files, so they find the same error, and rank 0 alone says it (once, not once a rank).
    Across machines each rank says its own."""
    env = os.environ
    return env.get("RANK", "0") != "0" and env.get("LOCAL_WORLD_SIZE", "1") == env.get("WORLD_SIZE", "1")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("HOSL_LOG", "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = _resolve_resume(argv)
    except (UsageError, ValueError) as exc:
        if os.environ.get("HOSL_DEBUG"):
            raise
        if not _quiet_rank():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except (UsageError, TaskError, ModelError, SplitError, ValueError) as exc:
        if os.environ.get("HOSL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (LinkError, DivergedError) as exc:
        if os.environ.get("HOSL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if summary is not None:
        _print_summary(summary, summary["run_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
