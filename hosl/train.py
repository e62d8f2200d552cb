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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from hosl import checkpoint
from hosl.auth import ENV as AUTH_ENV
from hosl.auth import AuthError, read_secret
from hosl.config import RESUMABLE, RUN_ONLY, TrainConfig, build_parser, parse_config
from hosl.models import ModelError, build, build_tokenizer, check_hub_reachable, check_model_name, num_blocks
from hosl.optim import DivergedError, SkipCounter, lr_factor
from hosl.plan import method_of
from hosl.roles import FullModel, SplitClient, SplitServer, use_threads
from hosl.scoring import accuracy, rank_classify
from hosl.session import local_session
from hosl.split import SplitError, split_model, split_summary
from hosl.tasks import TaskError, check_fits, encode_candidates, encode_for_training, load_run_data
from hosl.transport import LinkError, dist_link, dist_links

logger = logging.getLogger("hosl.train")


class UsageError(ValueError):
    """Bad input from the command line or the run directory: one line, exit status 2."""


# -- data ---------------------------------------------------------------------------------------------


class Batches:
    """The training batch of every step: a fresh seeded permutation per epoch, so the batch of step t
    depends only on (seed, t) and a resumed run sees the same data as an uninterrupted one."""

    def __init__(self, examples, tokenizer, cfg: TrainConfig, stream: int = 0):
        self.examples, self.tokenizer, self.cfg = examples, tokenizer, cfg
        self.stream = stream  # a client of a many-client run walks its shard in its own order
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            seed = self.cfg.seed * 1_000_003 + epoch
            if self.stream:
                seed = int.from_bytes(
                    hashlib.blake2b(f"hosl:data:{seed}:{self.stream}".encode(), digest_size=7).digest()
                )
            g = torch.Generator().manual_seed(seed)
            self._perms = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perms[epoch]

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        n, b = len(self.examples), self.cfg.batch_size
        picked = [self.examples[self._perm(i // n)[i % n]] for i in range(step * b, step * b + b)]
        return encode_for_training(self.tokenizer, picked, self.cfg.max_length)


# -- the run ---------------------------------------------------------------------------------------------


def _peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _device(cfg: TrainConfig) -> torch.device:
    """--device, checked against what this machine has (UsageError when it lacks it)."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {cfg.device}: torch {torch.__version__} sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def _cuda_peak(device: torch.device) -> dict:
    """The CUDA allocator's peak on `device` (tensors this process allocated there), when it computes there."""
    if device.type != "cuda":
        return {}
    return {"cuda_peak_memory_bytes": torch.cuda.max_memory_allocated(device)}


def evaluate(trainer, tokenizer, examples, cfg: TrainConfig, step: int) -> dict:
    """The model's score on `examples`: {"accuracy": ...} for a classification task (rank
    classification), {"loss": ..., "perplexity": ...} for a generation task (the mean loss per
    completion token, from the same per-row scores the server computes)."""
    generation = examples[0].generation
    predictions, total, tokens = [], 0.0, 0
    starts = range(0, len(examples), cfg.eval_batch_size)
    try:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="eval", unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr)
    except ImportError:
        pass
    for start in starts:
        chunk = examples[start : start + cfg.eval_batch_size]
        if generation:
            batch = encode_for_training(tokenizer, chunk, cfg.max_length)
            counts = (batch["labels"] != -100).sum(dim=1)
            total += float((trainer.scores(step, batch).double() * counts).sum())
            tokens += int(counts.sum())
        else:
            batch, index = encode_candidates(tokenizer, chunk, cfg.max_length)
            scores = trainer.scores(step, batch)
            predictions.append(rank_classify(scores, index, len(chunk)))
    if generation:
        loss = -total / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    return {"accuracy": accuracy(torch.cat(predictions), examples)}


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


def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method}-{cfg.task}-{stamp}"


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


def _kept_lines(path: Path, step: int) -> list[str] | None:
    """The lines of a JSON Lines log for steps before `step` (a resumed run rewrites what came after
    its checkpoint); None when there is no such file. A last line cut short by a kill is dropped;
    any other bad line is a CheckpointError naming the file and line."""
    if not path.exists():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise checkpoint.CheckpointError(f"{path}: not UTF-8 ({exc})") from None
    keep = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # the line being written when the run was killed
            raise checkpoint.CheckpointError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict):
            raise checkpoint.CheckpointError(f"{path}:{number}: not a JSON object")
        if "step" in record and (isinstance(record["step"], bool) or not isinstance(record["step"], int)):
            raise checkpoint.CheckpointError(f"{path}:{number}: step must be an integer, got {record['step']!r}")
        if record.get("step", -1) < step:
            keep.append(line)
    return keep


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
        logs = {name: _kept_lines(run_dir / name, resume.step) for name in ("metrics.jsonl", "zo_log.jsonl")}
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
                    "client_peak_memory_bytes": _peak_memory_bytes(),
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
                metrics = evaluate(trainer, tokenizer, eval_examples, cfg, step)
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
        final = evaluate(trainer, tokenizer, eval_examples, cfg, cfg.steps)
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


def _summary(cfg: TrainConfig, result: dict, side_params: dict, device: torch.device) -> dict:
    return {
        "method": cfg.method,
        "model": cfg.model,
        "task": cfg.task,
        "split_layer": cfg.split_layer if method_of(cfg.method).split else None,
        "steps": cfg.steps,
        "q": cfg.q,
        **result,
        "client_peak_memory_bytes": _peak_memory_bytes(),
        "client_peak_memory_scope": "client process"
        if cfg.transport == "dist"
        else "whole process (client and server)",
        **_cuda_peak(device),
        **side_params,
    }


def _start_run_dir(cfg: TrainConfig):
    """(cfg, run directory, the checkpoint to resume from or None). A resumed run's checkpoint is
    verified here, before anything is built or written; a new run's directory must be empty."""
    check_model_name(cfg.model)
    check_hub_reachable(cfg.model, cfg.gguf_file)
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--report-to tensorboard needs the tensorboard package: pip install 'hosl[tensorboard]'")
    n = num_blocks(cfg.model, cfg.gguf_file)  # from the config where it can be read: before a slow build
    if n is not None and method_of(cfg.method).split and not 0 <= cfg.split_layer <= n:
        raise UsageError(f"--split-layer must be in [0, {n}] for {cfg.model} ({n} blocks), got {cfg.split_layer}")
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = run_dir / "config.json"
        point = checkpoint.latest(run_dir, saved, server_here=cfg.transport == "local") if saved.exists() else None
        if point is None:
            if (run_dir / "checkpoint" / "state.json").exists():
                raise UsageError(
                    f"--resume {run_dir}: its checkpoint/ was written by an older hosl, without a manifest to "
                    "verify it; resume it with that version"
                )
            cut = sorted(p.name for p in run_dir.glob("checkpoint-*.tmp"))
            if cut:
                raise UsageError(
                    f"--resume {run_dir}: no complete checkpoint, only {cut[-1]}, a save cut short; nothing to "
                    "resume: start the run again (remove the directory or choose another --out)"
                )
            raise UsageError(f"--resume {run_dir}: no checkpoint there (was the run started with --save-every?)")
        if cfg.steps < point.step:
            raise UsageError(f"--resume {run_dir}: --steps {cfg.steps} is fewer than the {point.step} it has done")
        for name in ("metrics.jsonl", "zo_log.jsonl"):
            _kept_lines(run_dir / name, point.step)  # a bad line is refused before anything is written
        tmp = saved.with_name("config.json.tmp")  # the config says what the run now is (--steps, ...)
        tmp.write_text(dataclasses.replace(cfg, resume=None).to_json() + "\n")
        tmp.replace(saved)
        return cfg, run_dir, point
    run_dir = _run_dir(cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"--out {run_dir} exists and is not empty; choose another or --resume it")
    _CREATED[run_dir] = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    (run_dir / "config.json").write_text(cfg.to_json() + "\n")
    return cfg, run_dir, None


# The folders a new run's directory made, deepest first, by run directory: a run that fails before
# its first step removes them again (when empty), so that it leaves no runs/ behind either.
_CREATED: dict[Path, list[Path]] = {}


@contextlib.contextmanager
def _unless_started(run_dir: Path, point):
    """A new run that fails before its first step is logged leaves nothing behind: the same --out can
    be used again once the input is fixed."""
    try:
        yield
    except BaseException:
        metrics = run_dir / "metrics.jsonl"
        if point is None and not (metrics.exists() and metrics.stat().st_size):
            for name in ("config.json", "metrics.jsonl", "zo_log.jsonl"):
                (run_dir / name).unlink(missing_ok=True)
            for folder in _CREATED.get(run_dir, [run_dir]):  # runs/ too, when this run made it
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
        raise
    finally:
        _CREATED.pop(run_dir, None)


def run(cfg: TrainConfig) -> dict:
    """One run with the local transport (or no link for the full methods); returns the summary."""
    device = _device(cfg)
    cfg, run_dir, point = _start_run_dir(cfg)
    with _unless_started(run_dir, point):
        return _run_local(cfg, run_dir, point, device)


def _run_local(cfg: TrainConfig, run_dir: Path, point, device) -> dict:
    train_examples, eval_examples = load_run_data(cfg)
    tokenizer, model = build(cfg, train_examples)
    model.to(device)
    torch.manual_seed(cfg.seed)
    if not method_of(cfg.method).split:
        trainer = FullModel(cfg, model, cfg.split_layer)
        use_threads(cfg.threads)
        result = train(cfg, trainer, tokenizer, train_examples, eval_examples, run_dir, resume=point)
        checkpoint.save_final(run_dir, trainer)
        summary = _summary(cfg, result, {"params": sum(p.numel() for p in model.parameters())}, device)
        return _finish(run_dir, summary)
    client_model, server_model = split_model(model, cfg.split_layer)
    sizes = split_summary(client_model, server_model)
    del model
    if _rounds(cfg):
        return _run_clients(cfg, run_dir, tokenizer, client_model, server_model, train_examples, eval_examples, sizes)
    with local_session(cfg, client_model, server_model, run_dir) as client:
        result, server_files = _client_session(cfg, client, tokenizer, train_examples, eval_examples, run_dir, point)
    summary = _summary(cfg, result, _side_params(sizes), device)
    return _finish(run_dir, summary, server_files)


def _rounds(cfg: TrainConfig) -> bool:
    """Whether the run goes by rounds of many clients (tests run one client through them too)."""
    return cfg.clients > 1


def _client_data(cfg: TrainConfig, train_examples, tokenizer):
    """Every client's shard (its training part), held-out part (--client-eval-fraction) and batches:
    the same on every process of a run."""
    from hosl import clients as many

    shards = many.partition([e.label for e in train_examples], cfg.clients, cfg.partition, cfg.alpha, cfg.seed)
    shards, held = many.hold_out(shards, cfg.client_eval_fraction, cfg.seed)
    streams = [Batches([train_examples[i] for i in s], tokenizer, cfg, stream=c) for c, s in enumerate(shards)]
    return shards, held, streams


def _held_out_accuracy(cfg, held, train_examples, tokenizer):
    """After the last round: the shared model's accuracy on each client's held-out part, evaluated
    by the lead (every process of this simulation reads the whole dataset; the clients hold the
    same weights, so each would get the same number on its own part)."""

    def evaluate_held(client, result):
        if cfg.client_eval_fraction:
            parts = [[train_examples[j] for j in h] for h in held]
            scores = [evaluate(client, tokenizer, p, cfg, cfg.steps) for p in parts]
            for key in scores[0]:
                result[f"client_eval_{key}"] = [score[key] for score in scores]

    return evaluate_held


def _round_batches(streams, schedule, client: int = 0):
    """A client's batch of each round: the next of its shard when it is sampled, else None."""

    def batches(rnd):
        return streams[client](schedule.position(client, rnd)) if client in schedule.sampled(rnd) else None

    return batches


def _rounds_summary(cfg: TrainConfig, shards, lead, clients) -> dict:
    """What a many-client summary adds, from the clients this process holds (all of them, or the lead)."""
    return {
        "clients": cfg.clients,
        "clients_per_round": cfg.clients_per_round,
        "partition": cfg.partition,
        "shard_examples": [len(s) for s in shards],
        "client_weights_sha256": lead.digest(),
        "clients_left": lead.left,
        "sync_bytes_per_client": [sum(c.sync_bytes) for c in clients],
        "catch_up_bytes_per_client": [c.catch_up_bytes for c in clients],
        "bytes_per_client": [c.link.bytes_sent + c.link.bytes_received for c in clients],
    }


def _run_clients(cfg, run_dir, tokenizer, client_model, server_model, train_examples, eval_examples, sizes) -> dict:
    """--clients N > 1 in one process (hosl.clients): the lead client runs the loop, the others and
    the server run on threads; at the end every client's weights are compared with the lead's."""
    from hosl import clients as many

    device = next(client_model.parameters()).device
    shards, held, streams = _client_data(cfg, train_examples, tokenizer)
    after = _held_out_accuracy(cfg, held, train_examples, tokenizer)
    with many.local_rounds(cfg, client_model, server_model, streams, run_dir) as clients:
        lead = clients[0]
        batches = _round_batches(streams, lead.schedule)
        result, server_files = _client_session(
            cfg, lead, tokenizer, train_examples, eval_examples, run_dir, None, batches=batches, after=after
        )
    gone = {c for c, _, _ in lead.left}
    identical = all(torch.equal(c.zo.flat.flat, lead.zo.flat.flat) for c in clients if c.id not in gone)
    if not identical:
        raise RuntimeError("the clients' weights differ after the run (a bug: please report it)")
    extra = {**_rounds_summary(cfg, shards, lead, clients), "clients_identical": identical}
    summary = _summary(cfg, result, _side_params(sizes), device)
    return _finish(run_dir, {**summary, **extra}, server_files)


def _client_session(
    cfg, client, tokenizer, train_examples, eval_examples, run_dir, point, batches=None, after=None
) -> tuple[dict, dict]:
    """The client's whole session, over either transport: hello, training, the final weights of both
    sides, stop. Returns the training result and the server's final files with their digests.
    after(client, result): more work with the server before the final weights (held-out evaluation)."""
    client.hello()
    result = train(cfg, client, tokenizer, train_examples, eval_examples, run_dir, client.link, point, batches)
    if after is not None:
        after(client, result)
    checkpoint.save_final(run_dir, client)
    reply = client.control("final")
    client.stop()
    if "server_stats" in reply:  # many clients: the server's time on each
        result["server_stats"] = reply["server_stats"]
    return result, reply["files"]


def _side_params(sizes) -> dict:
    return {
        "client_params": sizes.client.params,
        "server_params": sizes.server.params,
        "client_trainable_params": sizes.client.trainable,
        "server_trainable_params": sizes.server.trainable,
    }


def _finish(run_dir: Path, summary: dict, server_files: dict | None = None) -> dict:
    """summary.json, then manifest.json: the digests of the run's config, logs, summary and final
    weights (the server's as it reported them), which hosl.replay verifies."""
    summary["run_dir"] = str(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    names = ["summary.json", "metrics.jsonl", "zo_log.jsonl", "client.safetensors", "model.safetensors"]
    files = checkpoint.digests(run_dir, [n for n in names if (run_dir / n).is_file()])
    files.update(server_files or {})
    checkpoint.write_manifest(run_dir, files, run_dir / "config.json")
    return summary


def _one_side(cfg: TrainConfig, role: str, train_examples, device: torch.device):
    """This process's side of a dist run. A local checkpoint directory (safetensors or .bin) is read
    with load_client/load_server, so the process never holds the other side's weights, not even
    while loading; built-in, GGUF and LoRA models are built whole and cut."""
    from hosl.loading import load_client, load_server
    from hosl.models import DTYPES

    local = Path(cfg.model).is_dir() and not cfg.gguf_file and not (cfg.client_lora_r or cfg.server_lora_r)
    if local:
        loader = load_client if role == "client" else load_server
        return loader(cfg.model, cfg.split_layer, dtype=DTYPES[cfg.dtype], device=device), None
    _, model = build(cfg, train_examples)
    client_model, server_model = split_model(model, cfg.split_layer)
    sizes = split_summary(client_model, server_model)
    return (client_model if role == "client" else server_model).to(device), sizes


def run_dist(cfg: TrainConfig) -> dict | None:
    """This process's half of a --transport dist run (torchrun: rank 0 server, rank 1 client)."""
    if cfg.resume and not all(v in os.environ for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
        raise UsageError(
            f"--resume {cfg.resume}: the run used --transport dist; resume it under torchrun as it was started "
            "(or add --transport local to continue it in one process)"
        )
    secret = _secret(cfg, needed=True)
    if secret is None:
        print(
            f"warning: --insecure: no --auth-token-file or ${AUTH_ENV}, so the peers of this run are not "
            "authenticated, and anyone who reaches its port can join it (see docs/safety.md)",
            file=sys.stderr,
        )
    if _rounds(cfg):
        return _dist_rounds(cfg, secret)
    link = dist_link(timeout=cfg.timeout, compression=cfg.compression, secret=secret)
    if link.role == "server":
        try:
            device = _device(cfg)
            examples = load_run_data(cfg)[0] if cfg.model.startswith("builtin:") else []  # a builtin vocabulary
            side, _ = _one_side(cfg, "server", examples, device)
            torch.manual_seed(cfg.seed)
            server = SplitServer(cfg, side, link, Path(cfg.resume or cfg.out or "."))
        except Exception as exc:
            link.fail(f"{type(exc).__name__}: {exc}")  # the client hears why instead of timing out
            raise
        server.serve()
        return None
    with link:
        device = _device(cfg)
        cfg, run_dir, point = _start_run_dir(cfg)
        with _unless_started(run_dir, point):
            return _client_dist(cfg, link, run_dir, point, device)


def run_grpc(cfg: TrainConfig) -> dict:
    """A --transport grpc client: dial --server (python -m hosl.serve), prove the secret, train."""
    from hosl.grpc_link import TLS, dial

    if not cfg.server:
        raise UsageError("--transport grpc needs --server HOST:PORT (where python -m hosl.serve listens)")
    secret = _secret(cfg, needed=False)
    if cfg.insecure:
        print(
            "warning: --insecure: plain text, no TLS: the activations, labels and losses cross readable by anyone "
            "on the path" + ("" if secret else ", and the peers are not authenticated"),
            file=sys.stderr,
        )
    tls = None if cfg.insecure else TLS(ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key)
    device = _device(cfg)

    def connect(timeout: float):
        link = dial(cfg.server, tls, timeout, cfg.compression, client_id=cfg.client_id)
        if secret is not None:
            link.authenticate(secret)
        return link

    link = connect(cfg.timeout)
    with link:
        cfg, run_dir, point = _start_run_dir(cfg)
        with _unless_started(run_dir, point):
            if _rounds(cfg):
                from hosl import clients as many

                schedule = many.Schedule(cfg.seed, cfg.clients, cfg.clients_per_round)
                return _round_client(cfg, link, run_dir, device, schedule, redial=connect)
            return _client_dist(cfg, link, run_dir, point, device)


def _secret(cfg: TrainConfig, needed: bool) -> bytes | None:
    """The run's shared secret; UsageError when it cannot be read, or when a link needs one and
    --insecure was not given."""
    try:
        secret = read_secret(cfg.auth_token_file)
    except AuthError as exc:
        raise UsageError(str(exc)) from None
    if secret is None and needed and not cfg.insecure:
        raise UsageError(
            f"--transport {cfg.transport} needs a shared secret, or anyone who reaches the port can join the run: "
            f"give both sides --auth-token-file FILE (make one with python -m hosl.token FILE) or ${AUTH_ENV}, or "
            "--insecure on a network you trust"
        )
    return secret


def _client_dist(cfg: TrainConfig, link, run_dir: Path, point, device) -> dict:
    train_examples, eval_examples = load_run_data(cfg)
    tokenizer = build_tokenizer(cfg.model, cfg.task, train_examples, cfg.gguf_file)
    client_model, sizes = _one_side(cfg, "client", train_examples, device)
    torch.manual_seed(cfg.seed)
    client = SplitClient(cfg, client_model, link)
    result, server_files = _client_session(cfg, client, tokenizer, train_examples, eval_examples, run_dir, point)
    params = _side_params(sizes) if sizes else {"client_params": sum(p.numel() for p in client_model.parameters())}
    return _finish(run_dir, _summary(cfg, result, params, device), server_files)


def _dist_rounds(cfg: TrainConfig, secret) -> dict | None:
    """This process's part of a --clients N --transport dist run (torchrun --nproc-per-node N+1):
    rank 0 the server, rank 1 the lead client (it writes the run directory), ranks 2..N the others."""
    from hosl import clients as many

    role, links = dist_links(cfg.clients, timeout=cfg.timeout, compression=cfg.compression, secret=secret)
    schedule = many.Schedule(cfg.seed, cfg.clients, cfg.clients_per_round)
    if role == "server":
        try:
            device = _device(cfg)
            examples = load_run_data(cfg)[0] if cfg.model.startswith("builtin:") else []
            side, _ = _one_side(cfg, "server", examples, device)
            torch.manual_seed(cfg.seed)
            server = SplitServer(cfg, side, links[0], Path(cfg.out))
            rounds = many.RoundServer(cfg, server, links, schedule)
        except Exception as exc:
            for link in links:
                link.fail(f"{type(exc).__name__}: {exc}")
            raise
        rounds.serve()
        return None
    (link,) = links
    with link:
        device = _device(cfg)
        if link.client_id == 0:
            cfg, run_dir, point = _start_run_dir(cfg)
            with _unless_started(run_dir, point):
                return _round_client(cfg, link, run_dir, device, schedule)
        train_examples, _ = load_run_data(cfg)
        tokenizer = build_tokenizer(cfg.model, cfg.task, train_examples, cfg.gguf_file)
        client_model, _ = _one_side(cfg, "client", train_examples, device)
        torch.manual_seed(cfg.seed)
        mine = _client_data(cfg, train_examples, tokenizer)[2][link.client_id]
        client = many.RoundClient(cfg, SplitClient(cfg, client_model, link, client_id=link.client_id), schedule)
        client.follow(mine, cfg.steps)
        print(f"client {client.id}: weights sha256 {client.digest()}", flush=True)
    return None


def _round_client(cfg: TrainConfig, link, run_dir: Path, device, schedule, redial=None) -> dict:
    """A client of a many-client run that writes a run directory: the lead of a dist run, or any
    client of a grpc run (redial: how it dials the server again when its link drops)."""
    from hosl import clients as many

    train_examples, eval_examples = load_run_data(cfg)
    tokenizer = build_tokenizer(cfg.model, cfg.task, train_examples, cfg.gguf_file)
    client_model, sizes = _one_side(cfg, "client", train_examples, device)
    torch.manual_seed(cfg.seed)
    shards, held, streams = _client_data(cfg, train_examples, tokenizer)
    me = many.RoundClient(cfg, SplitClient(cfg, client_model, link, client_id=link.client_id), schedule)
    me.redial = redial
    after = _held_out_accuracy(cfg, held, train_examples, tokenizer)
    try:
        result, server_files = _client_session(
            cfg,
            me,
            tokenizer,
            train_examples,
            eval_examples,
            run_dir,
            None,
            _round_batches(streams, schedule, me.id),
            after,
        )
    finally:
        if me.link is not link:  # dialled again: the session open now is this client's to close
            me.link.close()
    params = _side_params(sizes) if sizes else {"client_params": sum(p.numel() for p in client_model.parameters())}
    extra = _rounds_summary(cfg, shards, me, [me])
    if cfg.transport == "grpc":
        extra |= {"client_id": me.id, "rejoined": me.rejoined}
    return _finish(run_dir, {**_summary(cfg, result, params, device), **extra}, server_files)


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
        runner = {"dist": run_dist, "grpc": run_grpc}.get(cfg.transport, run)
        summary = runner(cfg)
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
