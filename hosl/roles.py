"""The trainers of every method: the two roles of a split run and the protocol between them, and
the unsplit model of fo-full and zo-full (FullModel), each with one train_step and scores.

Per training step the client sends one BATCH frame (labels and attention mask), then an ACT frame
(the activation at the cut) for each upload of the step plan (hosl.plan), and the server answers
each with the frame the plan names: a LOSS, or a GRAD (dL/dh and the loss). Evaluation is a BATCH
frame marked eval and one ACT; the server answers with a SCORES frame. CONTROL frames save, commit
and load a checkpoint (hosl.checkpoint), save the final weights, and stop. Both sides derive the
plan from the same config and compare it at HELLO, so no frame says "end of step".

hosl: the clean upload goes first (the client is at w then, and needs one pass fewer than the
paper's probes-then-clean order). The server computes its gradient on it at once but takes the
optimiser step only after it has answered every probe of the step, so all of the step's losses
are at the same server weights: the paper's math, in a cheaper order.

Streaming: the client sends every upload of a step without waiting, and reads the losses when it
needs them for its update. The server answers in order; the result equals the synchronous loop's
(`sync_probes` makes the client wait for each loss, for comparison). cut-grad uploads once and
runs its first probe pair while the server computes dL/dh, which it reads only to project that pair.

A non-finite loss anywhere in a step skips both sides' updates for that step (the client still
undoes its probes); both sides see the same losses, so they agree without another message.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD

from hosl import checkpoint, zo
from hosl.boundary import Frame, Kind
from hosl.config import TrainConfig
from hosl.estimators import CLEAN, finite
from hosl.models import compute_precision
from hosl.optim import FusedStep, SkipCounter, fo_update, lr_factor, make_optimizer
from hosl.plan import FO, GRAD, ZO, StepPlan
from hosl.rows import LookupRecorder, input_embedding, step_rows
from hosl.scoring import target_scores
from hosl.split import (
    Activation,
    ClientModel,
    FrozenPrefix,
    ServerModel,
    checkpoint_blocks,
    labelled_forward,
    labelled_positions,
    split_model,
    train_last_blocks,
)
from hosl.transport import Link, LinkError
from hosl.zo import zo_params_of

logger = logging.getLogger(__name__)

PROTOCOL = 2  # 2: HELLO carries the step plan; evaluation scores in their own frame kind


_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def frame_bytes_limit(cfg: TrainConfig, hidden_size: int, candidates: int = 4) -> int:
    """The largest frame a session of cfg can legitimately send, with margin: an evaluation batch's
    activation (every candidate row of eval_batch_size examples) in float32. The local link's slots
    are this size, and each end refuses a longer frame from its peer before allocating it."""
    rows = max(cfg.batch_size, cfg.eval_batch_size * candidates)
    return rows * cfg.max_length * (hidden_size * 4 + 32) + (1 << 20)


def use_threads(n: int) -> None:
    """Sets the torch thread count of the calling thread to n (0: leaves it). torch's OpenMP builds
    keep the count per thread, so the two sides of a local run, each on its own thread, keep their
    own; each side calls this where it starts (SplitClient.hello, SplitServer.serve). A thread takes
    the process-wide count of the moment on its first torch call, which would undo a count set
    before it: the get below makes that first call happen first."""
    if n:
        torch.get_num_threads()
        torch.set_num_threads(n)


@dataclass
class StepStats:
    loss: float  # the clean loss when there is one, else the mean of the probe losses
    client_s: float
    server_s: float
    link_s: float
    skipped: bool
    grads: list[float] | None = None  # the projected gradients (ZO clients)
    rows: list[list[int]] | None = None  # the row-sparse tables' rows, zo.encode_rows (ZO clients)
    clients: list[int] | None = None  # a round of many clients (hosl.clients): grads and rows are per client
    caught_up: bool = False  # a round this client applied from the server's log, late (nothing to evaluate)


def _scalar(t: torch.Tensor) -> float:
    return float(t.reshape(()).item())


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a side computes: its parameters' device. Frames arrive as CPU tensors and are moved there."""
    return next(model.parameters()).device


@dataclass
class _Tally:
    """One ZO step's running account: the client's compute seconds, the meta of the server's last
    answer (its time), and a local estimator's clean loss and dL/dh once read."""

    client_s: float = 0.0
    server_meta: dict = field(default_factory=dict)
    grad_h: torch.Tensor | None = None
    clean_loss: float | None = None


class SplitClient:
    """The client of a split run: holds the client model and drives the step plan."""

    split_client = True  # its checkpoints have a server half (hosl.checkpoint.save_run)

    def __init__(self, cfg: TrainConfig, model: ClientModel, link: Link, client_id: int = 0):
        self.cfg = cfg
        self.plan = StepPlan.of(cfg)
        self.model = model
        self.link = link
        self.client_id = client_id  # its probe seeds (hosl.clients: each client of a round has its own)
        self.report_bytes = 0  # the last REPORT frame's size (hosl.clients)
        link.max_frame_bytes = frame_bytes_limit(cfg, model.stack.config.hidden_size)
        self.device = device_of(model)
        frozen = train_last_blocks(model, cfg.client_train_blocks)
        self.prefix = None  # a ZO client's frozen blocks, run once a step
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        update = self.plan.method.client
        self.rate = getattr(cfg, update.lr)
        if update.order == FO:
            self.zo = None
            if cfg.client_fused_step:
                self.optimizer = FusedStep([p for _, p in params], cfg, self.rate)
            else:
                self.optimizer = make_optimizer([p for _, p in params], cfg, self.rate)
            if cfg.client_checkpointing:
                checkpoint_blocks(model)
        else:
            self.zo = zo_params_of(model, cfg)
            zo.check_mu(self.zo, cfg.mu)
            if frozen:
                self.prefix = FrozenPrefix(model, frozen)
            if cfg.client_batch_probes:
                self.zo.attach_batched(model)
            self.token_table = input_embedding(model)
            self.optimizer = None
            for _, p in params:
                p.requires_grad_(False)  # forward only: no autograd graph, no saved activations

    def lr(self, step: int) -> float:
        """The client's rate at step (--lr-scheduler)."""
        return self.rate * lr_factor(self.cfg, step)

    # -- protocol ------------------------------------------------------------------------------
    def hello(self, **extra) -> dict:
        """HELLO: the protocol, config hash and step plan the server checks (and `extra`, a joining
        client's rounds applied); returns the server's answer."""
        use_threads(self.cfg.client_threads)
        numel = self.zo.numel if self.zo is not None else 0
        meta = {"protocol": PROTOCOL, "config": self.cfg.hash(), "plan": self.plan.describe(), "client_numel": numel}
        self.link.send(Frame(Kind.HELLO, meta={**meta, **extra}))
        reply = self.link.recv()
        if reply.kind != Kind.HELLO:
            raise LinkError(f"the server answered HELLO with {reply.kind.name}")
        return reply.meta

    def stop(self) -> None:
        self.link.send(Frame(Kind.CONTROL, meta={"op": "stop"}))

    def control(self, op: str, **meta) -> dict:
        self.link.send(Frame(Kind.CONTROL, meta={"op": op, **meta}))
        reply = self.link.recv()
        if reply.kind != Kind.CONTROL or reply.meta.get("op") != op:
            raise LinkError(f"the server answered CONTROL {op} with {reply.kind.name}")
        return reply.meta

    def _forward(self, batch) -> torch.Tensor:
        """The activation at the cut. Without autograd and with --client-micro-batch M, the rows run
        M at a time into one preallocated activation: the forward's transients are one slice's."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        m = self.cfg.client_micro_batch
        with compute_precision(self.cfg, self.device):
            if not m or m >= len(ids) or torch.is_grad_enabled():
                self._rows(None)
                return self.model(input_ids=ids, attention_mask=mask).hidden
            hidden = None
            for lo in range(0, len(ids), m):
                self._rows(lo)
                part = self.model(input_ids=ids[lo : lo + m], attention_mask=mask[lo : lo + m]).hidden
                if hidden is None:
                    hidden = part.new_empty((len(ids), *part.shape[1:]))
                hidden[lo : lo + m] = part
                del part
            return hidden

    def _rows(self, lo: int | None) -> None:
        """Names the rows (from lo, or the whole batch) the next forward runs, for the frozen prefix."""
        if self.prefix is not None:
            self.prefix.rows = lo

    def _clean_forward(self, batch) -> tuple[torch.Tensor, list | None]:
        """The step's forward at w, and the embedding rows it looked up (hosl.rows)."""
        if not self.zo.tables:
            return self._forward(batch), None
        with LookupRecorder(self.zo) as recorder:
            hidden = self._forward(batch)
        return hidden, step_rows(self.zo, batch, recorder)

    def _send_batch(self, step: int, batch, eval_: bool = False) -> None:
        tensors = {"labels": batch["labels"], "attention_mask": batch["attention_mask"]}
        self.link.send(Frame(Kind.BATCH, step=step, tensors=tensors, meta={"eval": eval_}))

    def _upload(self, step: int, forward, hidden: torch.Tensor) -> None:
        self.link.send(
            Frame(Kind.ACT, step=step, probe=forward.probe, sign=forward.sign, tensors={"hidden": hidden.float()})
        )

    def _answer(self, step: int, forward) -> tuple[float, torch.Tensor | None, dict]:
        """The server's answer to an upload, of the kind the plan says: (loss, dL/dh or None, meta)."""
        kind = Kind.GRAD if forward.answer == GRAD else Kind.LOSS
        frame = self.link.recv()
        if frame.kind != kind or frame.step != step or (frame.probe, frame.sign) != forward.key:
            raise LinkError(
                f"expected the {kind.name} of step {step} probe {forward.key}, got {frame.kind.name} of step "
                f"{frame.step} probe {(frame.probe, frame.sign)}"
            )
        return _scalar(frame.tensors["loss"]), frame.tensors.get("grad"), frame.meta

    # -- training --------------------------------------------------------------------------------
    def train_step(self, step: int, batch, report: bool = False) -> StepStats:
        """One step. report: send the projected gradients and rows to the server in a REPORT frame
        instead of updating (a round of hosl.clients; its ROUND frame brings the update)."""
        if self.zo is None:
            return self._fo_step(step, batch)
        return self._zo_step(step, batch, report)

    def _zo_step(self, step: int, batch, report: bool = False) -> StepStats:
        """The plan's forwards: each upload is sent without waiting (streaming) and its answer read
        when the update needs it. A local estimator (the cut-grad family) keeps its probe forwards
        on the client and projects each probe's direction on the server's dL/dh, which it reads
        when the first direction is ready (that probe runs while the server computes it), or
        before the probes with --sync-probes. The same bits either way."""
        cfg, plan, est = self.cfg, self.plan, self.plan.estimator
        start = time.perf_counter()
        tally = _Tally()
        losses: dict[tuple[int, int], float] = {}
        pending: list = []  # uploads whose answers are not read yet
        kept: dict[tuple[int, int], torch.Tensor] = {}  # a local estimator's activations, by key
        grads = []

        self._send_batch(step, batch)
        with torch.no_grad(), self.prefix.step() if self.prefix is not None else contextlib.nullcontext():
            if plan.clean is not None:
                t = time.perf_counter()
                hidden, rows = self._clean_forward(batch)
                tally.client_s += time.perf_counter() - t
                self._upload(step, plan.clean, hidden)
                if est.keeps_clean:
                    kept[CLEAN] = hidden
                del hidden  # sent: the next forward runs without it (unless kept)
                if plan.clean.answer != GRAD:
                    pending.append(plan.clean)
                elif cfg.sync_probes:  # the probes' projections need dL/dh: wait for it first
                    self._read_grad_h(step, tally)
            else:
                rows = step_rows(self.zo, batch, token_table=self.token_table)
            t = time.perf_counter()
            if cfg.client_batch_probes:  # every probe's activation into `kept` at once, the weights untouched
                forwards = self._batched_probes(step, batch, kept)
            else:
                forwards = plan.probes(self.zo, step, rows, self.client_id)
            for forward in forwards:
                if forward.key not in kept:
                    kept[forward.key] = self._tangent_forward(batch) if est.exact else self._forward(batch)
                if forward.upload:
                    tally.client_s += time.perf_counter() - t
                    self._upload(step, forward, kept.pop(forward.key))
                    pending.append(forward)
                    if cfg.sync_probes:
                        self._drain(step, pending, losses, tally)
                    t = time.perf_counter()
                    continue
                direction = est.difference(kept, forward.probe)
                if direction is None:
                    continue
                if tally.grad_h is None:  # the wait for dL/dh is not client compute
                    tally.client_s += time.perf_counter() - t
                    self._read_grad_h(step, tally)
                    t = time.perf_counter()
                grads.append(est.project(tally.grad_h, direction, cfg.mu))
                del direction
            tally.client_s += time.perf_counter() - t
            kept.clear()
            self._drain(step, pending, losses, tally)
            t = time.perf_counter()
            if est.local:
                clean, extra = tally.clean_loss, [tally.clean_loss]
            else:
                clean = losses.pop(CLEAN, None)
                extra = [*losses.values(), *(() if clean is None else (clean,))]
                grads = plan.grads(losses if clean is None else {**losses, CLEAN: clean})
            tally.grad_h = None  # freed before the update
            loss = clean if clean is not None else sum(losses.values()) / len(losses)
            if report:
                self._report(step, grads, rows, loss)
                skipped = not finite([*grads, *extra])
            else:
                skipped = plan.end(self.zo, step, [(0, grads, rows)], self.lr(step), cfg.weight_decay, extra)
            tally.client_s += time.perf_counter() - t
        wall = time.perf_counter() - start
        server_s = float(tally.server_meta.get("server_s", 0.0))
        encoded = zo.encode_rows(rows) if rows is not None else None
        client_s = tally.client_s
        return StepStats(loss, client_s, server_s, max(wall - client_s - server_s, 0.0), skipped, grads, encoded)

    def _batched_probes(self, step: int, batch, kept: dict):
        """--client-batch-probes: the step's probe forwards (local, never uploaded), their activations
        into `kept` from forwards over (probes x batch) rows, as many probes at a time as fit
        --client-micro-batch rows (all of them without it); yields the forwards in the plan's order."""
        plan, rows = self.plan, len(batch["input_ids"])
        probes = [f for f in plan.forwards if f.sign != 0]
        seeds = plan.seeds(step, self.client_id)
        m = self.cfg.client_micro_batch
        per = max(1, m // rows) if m else len(probes)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        for lo in range(0, len(probes), per):
            group = probes[lo : lo + per]
            with self.zo.batched([(seeds[f.probe], f.sign * self.cfg.mu) for f in group]):
                with compute_precision(self.cfg, self.device):
                    out = self.model(input_ids=ids.repeat(len(group), 1), attention_mask=mask.repeat(len(group), 1))
            for f, h in zip(group, out.hidden.chunk(len(group))):
                kept[f.key] = h
            del out
        yield from probes

    def _drain(self, step: int, pending: list, losses: dict, tally: _Tally) -> None:
        """Read the answers of the uploads sent so far, into `losses` by key."""
        while pending:
            forward = pending.pop(0)
            losses[forward.key], _, tally.server_meta = self._answer(step, forward)

    def _read_grad_h(self, step: int, tally: _Tally) -> None:
        """A local estimator's answer to the clean upload: its loss, and dL/dh in float32."""
        tally.clean_loss, grad, tally.server_meta = self._answer(step, self.plan.clean)
        tally.grad_h = grad.to(self.device, torch.float32)

    def _tangent_forward(self, batch) -> torch.Tensor:
        """J_w h . z of the current tangent (the plan's probe context): the activation's tangent from
        a forward-mode pass at w, --client-micro-batch rows at a time."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        m = self.cfg.client_micro_batch or len(ids)
        tangent = None
        with compute_precision(self.cfg, self.device):
            for lo in range(0, len(ids), m):
                self._rows(None if m >= len(ids) else lo)
                with zo.forward_mode():
                    out = self.model(input_ids=ids[lo : lo + m], attention_mask=mask[lo : lo + m]).hidden
                    part = fwAD.unpack_dual(out).tangent
                if part is None:
                    raise RuntimeError("the tangent forward's activation carries no tangent")
                if tangent is None:
                    tangent = part.new_empty((len(ids), *part.shape[1:]))
                tangent[lo : lo + m] = part
                del out, part
        return tangent

    def _report(self, step: int, grads, rows, loss: float) -> None:
        """REPORT: this client's g (float64, exact) and the rows its tables used (hosl.clients)."""
        tensors = {
            "grads": torch.tensor(grads, dtype=torch.float64),
            "loss": torch.tensor([loss], dtype=torch.float64),
        }
        if rows is not None:
            tensors["row_counts"] = torch.tensor([-1 if r is None else len(r) for r in rows], dtype=torch.int64)
            tensors["rows"] = torch.cat([torch.zeros(0, dtype=torch.int32)] + [r.int() for r in rows if r is not None])
        sent = self.link.bytes_sent
        self.link.send(Frame(Kind.REPORT, step=step, tensors=tensors))
        self.report_bytes = self.link.bytes_sent - sent

    def _fo_step(self, step: int, batch) -> StepStats:
        start = time.perf_counter()
        (forward,) = self.plan.uploads
        self._send_batch(step, batch)
        t = time.perf_counter()
        hidden = self._forward(batch)
        client_s = time.perf_counter() - t
        self._upload(step, forward, hidden.detach())
        loss, grad_h, meta = self._answer(step, forward)
        t = time.perf_counter()
        if isinstance(self.optimizer, FusedStep):  # each parameter steps inside the backward
            if math.isfinite(loss):
                with self.optimizer.stepping(self.lr(step), step):
                    hidden.backward(grad_h.to(hidden.device, hidden.dtype))
            skipped = not math.isfinite(loss)
        else:
            if math.isfinite(loss):
                hidden.backward(grad_h.to(hidden.device, hidden.dtype))
            skipped = fo_update(self.optimizer, self.lr(step), math.isfinite(loss), "client", step)
        client_s += time.perf_counter() - t
        wall = time.perf_counter() - start
        server_s = float(meta.get("server_s", 0.0))
        return StepStats(loss, client_s, server_s, max(wall - client_s - server_s, 0.0), skipped)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def scores(self, step: int, batch) -> torch.Tensor:
        """Rank-classification scores of the rows of `batch`, computed by the server."""
        self._send_batch(step, batch, eval_=True)
        hidden = self._forward(batch)
        self.link.send(Frame(Kind.ACT, step=step, tensors={"hidden": hidden.float()}))
        frame = self.link.recv()
        if frame.kind != Kind.SCORES or frame.step != step:
            raise LinkError(f"expected the SCORES of step {step}, got {frame.kind.name} of step {frame.step}")
        return frame.tensors["scores"]


class SplitServer:
    """The server of a split run: answers the client's frames, as the step plan says, until it says stop."""

    def __init__(self, cfg: TrainConfig, model: ServerModel, link: Link, run_dir: Path | None = None):
        self.cfg = cfg
        self.plan = StepPlan.of(cfg)
        self.model = model
        self.link = link  # None: hosl.federation hands it each client's link in turn
        if link is not None:
            link.max_frame_bytes = frame_bytes_limit(cfg, model.hidden_size)
        self.device = device_of(model)
        self.run_dir = run_dir
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        update = self.plan.method.server
        self.rate = getattr(cfg, update.lr)
        self.zo: zo.ZOParams | None = None
        self._zo_params = params
        self.optimizer = None
        if update.order == ZO:
            for _, p in params:
                p.requires_grad_(False)
        else:
            self.optimizer = make_optimizer([p for _, p in params], cfg, self.rate)
        self.steps_done = 0
        self._hello_seen = False
        self._trained = False  # any step answered: a checkpoint can no longer be loaded
        self._saved_step: int | None = None  # the step of the last CONTROL save
        self._final_sent = False
        self.skipped = 0
        self._skips = SkipCounter(cfg.max_skipped, "server")
        self._update_s = 0.0  # reported with the next step: the update runs after a step's answers
        self.reply_extra: dict = {}  # more for the final weights' reply (hosl.clients: its per-client times)

    def serve(self) -> None:
        """Answer frames until CONTROL stop. A failure here is sent to the client before it propagates."""
        use_threads(self.cfg.server_threads)
        with self.link:
            while True:
                frame = self.link.recv()
                if (frame.kind == Kind.HELLO) == self._hello_seen:  # HELLO first, and once
                    said = "a second HELLO" if self._hello_seen else f"{frame.kind.name} before HELLO"
                    raise LinkError(f"the client sent {said}: refused, the session is closed")
                if frame.kind == Kind.HELLO:
                    self.hello(frame, self.link)
                elif frame.kind == Kind.BATCH:
                    if frame.meta.get("eval"):
                        self.evaluate(frame, self.link)
                    else:
                        self.train_step(frame, self.link)
                elif frame.kind == Kind.CONTROL:
                    if not self.control(frame, self.link):
                        return
                else:
                    raise LinkError(f"the server got an unexpected {frame.kind.name} frame")

    def check_hello(self, frame: Frame) -> None:
        """LinkError unless the client's HELLO speaks this protocol, config and step plan."""
        if frame.kind != Kind.HELLO:
            raise LinkError(f"the client opened with {frame.kind.name}, not HELLO")
        if frame.meta.get("protocol") != PROTOCOL:
            raise LinkError(f"the client speaks protocol {frame.meta.get('protocol')}, this server {PROTOCOL}")
        if frame.meta.get("config") != self.cfg.hash():
            raise LinkError("the client's config differs from the server's (same flags on both sides?)")
        if frame.meta.get("plan") != self.plan.describe():
            raise LinkError("the client plans another step than this server (another hosl version on one side?)")

    # The server's interface, each frame answered on the link it came from (hosl.clients and
    # hosl.federation serve many clients' links with one server): hello, train_step (answer_step
    # and update), evaluate, control.

    def hello(self, frame: Frame, link: Link) -> None:
        """HELLO checked (check_hello) and answered."""
        self.check_hello(frame)
        self._hello_seen = True
        if self.optimizer is None and self.zo is None:
            # The server's noise continues where the client's ends: the pair sees the unsplit model's noise.
            self.zo = zo_params_of(self.model, self.cfg, self._zo_params, offset=int(frame.meta["client_numel"]))
            zo.check_mu(self.zo, self.cfg.mu, "server")
        link.send(Frame(Kind.HELLO, meta={"protocol": PROTOCOL}))

    def _recv_act(self, batch: Frame, link: Link, key: tuple[int, int] = (0, 0)) -> Frame:
        """The next frame, which must be the ACT of `batch`'s step and probe `key`, holding one
        activation of the batch's rows and tokens: LinkError otherwise."""
        step = batch.step
        frame = link.recv()
        if frame.kind != Kind.ACT or frame.step != step or (frame.probe, frame.sign) != key:
            raise LinkError(
                f"expected the ACT of step {step} probe {key}, got {frame.kind.name} of step {frame.step} "
                f"probe {(frame.probe, frame.sign)}"
            )
        hidden = frame.tensors.get("hidden")
        want = (*batch.tensors["labels"].shape, self.model.hidden_size)
        if set(frame.tensors) != {"hidden"} or hidden.dtype not in _ACTIVATION_DTYPES or tuple(hidden.shape) != want:
            got = {n: f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}" for n, t in frame.tensors.items()}
            raise LinkError(f"the ACT of step {step} probe {key} must hold hidden, a float {want}; got {got}")
        return frame

    def _check_batch(self, batch: Frame) -> None:
        """LinkError unless the BATCH holds what the forwards read: labels, int64 (rows, tokens) with
        each value -100 (no loss) or a token of the vocabulary, and an attention mask of 0s and 1s
        of the same shape."""
        t, where = batch.tensors, f"the BATCH of step {batch.step}"
        labels, mask = t.get("labels"), t.get("attention_mask")
        if set(t) != {"labels", "attention_mask"}:
            raise LinkError(f"{where} must hold labels and attention_mask, got {sorted(t)}")
        if labels.dtype != torch.int64 or labels.dim() != 2 or 0 in labels.shape:
            raise LinkError(f"{where}: labels must be int64 (rows, tokens), got {labels.dtype} {tuple(labels.shape)}")
        if mask.shape != labels.shape or mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise LinkError(f"{where}: attention_mask must be integers shaped as labels {tuple(labels.shape)}, got "
                            f"{mask.dtype} {tuple(mask.shape)}")  # fmt: skip
        vocab = self._vocab_size()
        if bool(((labels != -100) & ((labels < 0) | (labels >= vocab))).any()):
            raise LinkError(f"{where}: a label is neither -100 nor a token id below {vocab}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise LinkError(f"{where}: attention_mask holds a value other than 0 and 1")

    def _vocab_size(self) -> int:
        if not hasattr(self, "_vocab"):
            self._vocab = self.model.vocab_size  # the server model's interface: hidden_size, vocab_size, forward
        return self._vocab

    def train_step(self, batch: Frame, link: Link) -> None:
        """One client's step: each upload of the plan in order: the forward (with the gradient where the plan takes
        it), the answer; then this side's update. A ZO server applies the plan's noise pass before
        each probe's forward, as the client did to its own weights."""
        if batch.step != self.steps_done:
            raise LinkError(f"the client sent step {batch.step}'s BATCH; this server is at step {self.steps_done}")
        self._trained = True
        losses = self.answer_step(batch, link)
        self.update(batch.step, losses, finite(losses.values()))

    def answer_step(self, batch: Frame, link: Link) -> dict[tuple[int, int], float]:
        """A step's uploads, answered; the gradient accumulated where the plan takes it. Returns
        the losses by (probe, sign)."""
        self._check_batch(batch)
        cfg, plan, step = self.cfg, self.plan, batch.step
        compute = self._update_s  # the previous step's update ran after its answers went out
        uploads = plan.uploads
        probes = plan.probes(self.zo, step) if plan.estimator is not None else iter(())
        losses: dict[tuple[int, int], float] = {}
        # --server-batch-probes: the uploads the server takes no gradient on wait for one stacked
        # forward after the step's last upload (they come after any that it does, so the answers
        # keep the plan's order).
        stacked = [f for f in uploads if cfg.server_batch_probes and not f.server_grad]
        waiting: list[torch.Tensor] = []
        for i, forward in enumerate(uploads):
            frame = self._recv_act(batch, link, forward.key)
            t = time.perf_counter()
            if forward.sign != 0:
                next(probes)  # the noise pass of this probe (a no-op without ZO weights)
            if forward in stacked:
                waiting.append(frame.tensors["hidden"])
                compute += time.perf_counter() - t
                continue
            loss, grad = self._loss(frame.tensors["hidden"], batch, forward.server_grad, forward.answer == GRAD)
            losses[forward.key] = _scalar(loss)
            tensors = {"loss": loss} if grad is None else {"loss": loss, "grad": grad}
            compute += time.perf_counter() - t
            meta = {"server_s": compute} if i == len(uploads) - 1 else {}
            # The answer goes out before the update, so the client's next work overlaps it.
            kind = Kind.GRAD if forward.answer == GRAD else Kind.LOSS
            link.send(Frame(kind, step=step, probe=forward.probe, sign=forward.sign, tensors=tensors, meta=meta))
        next(probes, None)  # leaves the last probe (scratch probes perturb inside it)
        if stacked:
            t = time.perf_counter()
            values = self._stacked_losses(waiting, batch)
            compute += time.perf_counter() - t
            for j, (forward, loss) in enumerate(zip(stacked, values)):
                losses[forward.key] = _scalar(loss)
                meta = {"server_s": compute} if j == len(stacked) - 1 else {}
                link.send(
                    Frame(
                        Kind.LOSS, step=step, probe=forward.probe, sign=forward.sign, tensors={"loss": loss}, meta=meta
                    )
                )
        return losses

    def update(self, step: int, losses: dict, finite: bool, share: int = 1) -> None:
        """This side's step: ZO from the step's losses (the client computes the same g), or the
        optimiser on the accumulated gradient divided by `share` (the clients of a round), skipped
        unless `finite`."""
        cfg, plan = self.cfg, self.plan
        t = time.perf_counter()
        lr = self.rate * lr_factor(cfg, step)
        if self.zo is not None:
            extra = list(losses.values())
            skipped = plan.end(self.zo, step, [(0, plan.grads(losses), None)], lr, cfg.weight_decay, extra)
        else:
            if share > 1:
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.div_(share)
            skipped = fo_update(self.optimizer, lr, finite, "server", step)
        self.skipped += skipped
        self._skips(skipped, step)
        self.steps_done = step + 1
        self._update_s = time.perf_counter() - t

    def _slices(self, rows: int) -> list[slice]:
        """The row slices of a forward over `rows` rows: --server-micro-batch rows each (one: all)."""
        m = self.cfg.server_micro_batch or rows
        return [slice(lo, lo + m) for lo in range(0, rows, m)]

    def _forward(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
        """The server's blocks over some rows, and the head only where the labels are (the loss and
        the scores read nothing else)."""
        with compute_precision(self.cfg, self.device):
            return self.model(Activation(hidden, mask), labels=labels, labelled_only=True)

    def _loss(self, hidden: torch.Tensor, batch: Frame, train: bool, want_grad: bool):
        """An upload's mean next-token loss over its labelled tokens (float32), and dL/dh where
        want_grad (else None); with train, the backward accumulates the parameters' gradients.
        With --server-micro-batch M the rows run M at a time, each slice's loss weighted by its
        share of the labelled tokens, so the server holds one slice's saved activations; the loss
        and the gradients are the whole batch's to float tolerance (a slice without labelled
        tokens adds nothing and is skipped)."""
        hidden = hidden.to(self.device)
        labels = batch.tensors["labels"].to(self.device)
        slices = self._slices(len(hidden))
        counts = (labels[:, 1:] != -100).sum(dim=1).tolist() if len(slices) > 1 else []
        if sum(counts) == 0:  # one slice (or no labelled token): the whole batch's forward
            slices, shares = [slice(None)], [1.0]
        else:
            shares = [sum(counts[s]) / sum(counts) for s in slices]
        mask = batch.tensors["attention_mask"].to(self.device)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        grad = None
        for rows, share in zip(slices, shares):
            if share == 0:
                continue
            part = hidden[rows].detach().requires_grad_(train and want_grad)
            with torch.set_grad_enabled(train):
                loss = self._forward(part, mask[rows], labels[rows]).loss
                if share != 1.0:
                    loss = loss * share
                if train:
                    loss.backward()
            total += loss.detach().float()
            if train and want_grad and rows == slice(None):
                grad = part.grad
            elif train and want_grad:
                grad = torch.zeros_like(hidden) if grad is None else grad
                grad[rows] = part.grad
        if want_grad and grad is None:
            grad = torch.zeros_like(hidden)
        return total, grad

    @torch.no_grad()
    def _stacked_losses(self, hiddens: list[torch.Tensor], batch: Frame) -> list[torch.Tensor]:
        """The losses of several uploads of one batch from one forward over their stacked rows (or
        --server-micro-batch rows of them at a time): each upload's mean next-token loss over its
        labelled tokens, as its own forward gives it (to float tolerance: the kernels see other
        numbers of rows)."""
        n, labels = len(hiddens), batch.tensors["labels"].to(self.device)
        stacked_labels = labels.repeat(n, 1)
        mask = batch.tensors["attention_mask"].to(self.device).repeat(n, 1)
        hidden = torch.cat(hiddens).to(self.device)
        sums = []
        for rows in self._slices(len(hidden)):
            part_labels = stacked_labels[rows]
            targets = part_labels[:, labelled_positions(part_labels) + 1]
            if targets.numel() == 0:
                sums.append(torch.zeros(len(part_labels), dtype=torch.float32, device=self.device))
                continue
            logits = self._forward(hidden[rows], mask[rows], part_labels).logits
            ce = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
            )
            sums.append(ce.view(targets.shape).sum(dim=1))
        counts = (labels[:, 1:] != -100).sum()
        return list((torch.cat(sums).view(n, len(labels)).sum(dim=1) / counts).float().unbind())

    @torch.no_grad()
    def evaluate(self, batch: Frame, link: Link) -> None:
        """An evaluation batch: its activation's scores of the labelled tokens."""
        self._check_batch(batch)
        hidden = self._recv_act(batch, link).tensors["hidden"].to(self.device)
        labels = batch.tensors["labels"].to(self.device)
        mask = batch.tensors["attention_mask"].to(self.device)
        scores = []
        for rows in self._slices(len(hidden)):
            logits = self._forward(hidden[rows], mask[rows], labels[rows]).logits
            scores.append(target_scores(logits.float(), labels[rows][:, labelled_positions(labels[rows]) + 1]))
        link.send(Frame(Kind.SCORES, step=batch.step, tensors={"scores": torch.cat(scores)}))

    def control(self, frame: Frame, link: Link) -> bool:
        """CONTROL answered (see control_reply); False at stop."""
        reply = self.control_reply(frame)
        if reply is None:
            return False
        link.send(Frame(Kind.CONTROL, meta=reply))
        return True

    def control_reply(self, frame: Frame) -> dict | None:
        """stop (None); save, commit and load a checkpoint of a step; final weights. The server keeps its
        files in its own run directory (hosl.checkpoint): a frame names a step, never a path. Each
        operation is bounded by where the run is: a save of the step the run has reached, once; a
        commit of that save that keeps it; a load before any step is trained; the final weights
        once, after the last step (LinkError otherwise)."""
        op, meta = frame.meta.get("op"), frame.meta
        if op == "stop":
            return None
        reply: dict = {"op": op}
        if op in ("save", "commit"):
            step, _ = checkpoint.check_server_request(meta, op)
            if step != self.steps_done or (op == "save") == (self._saved_step == step):
                did = "saved" if op == "save" else "not saved"
                raise LinkError(
                    f"CONTROL {op} of step {step} refused: this server is at step {self.steps_done}"
                    + (f" and has {did} it" if step == self.steps_done else "")
                )
        if op == "save":
            self._saved_step = step
            directory = checkpoint.tmp_dir(self._state_dir(), step)
            directory.mkdir(parents=True, exist_ok=True)  # the client's, when the two share a run directory
            reply["files"] = checkpoint.save_server(self, directory)
        elif op == "commit":
            step, _ = checkpoint.check_server_request(meta, op)
            keep = meta.get("keep")
            if not (isinstance(keep, list) and len(keep) <= 1 << 16 and all(type(s) is int for s in keep)):
                raise ValueError("CONTROL commit: keep must be a list of steps")
            if step not in keep:
                raise LinkError(f"CONTROL commit of step {step} refused: it would delete the checkpoint it commits")
            tmp = checkpoint.tmp_dir(self._state_dir(), step)
            if tmp.exists():  # not renamed by the client: this run directory is the server's own
                checkpoint.commit(tmp, checkpoint.step_dir(self._state_dir(), step))
            checkpoint.prune(self._state_dir(), keep)
        elif op == "load":
            step, files = checkpoint.check_server_request(meta, op)
            if self._trained:
                raise LinkError(f"CONTROL load of step {step} refused: this server has trained since it started")
            directory = checkpoint.step_dir(self._state_dir(), step)
            if not directory.exists():  # killed between the client's rename and the server's
                directory = checkpoint.tmp_dir(self._state_dir(), step)
            needed = ["server.safetensors"] + (["server_optimizer.pt"] if self.optimizer is not None else [])
            unlisted = [n for n in needed if n not in files]
            if unlisted:
                raise checkpoint.CheckpointError(f"CONTROL load: the client's manifest lists no {unlisted[0]}")
            checkpoint.verify(directory, {"files": files})
            checkpoint.load_server_state(self, directory)
            self.steps_done = step
        elif op == "final":
            if self._final_sent or self.steps_done != self.cfg.steps:
                raise LinkError(
                    f"CONTROL final refused: this server is at step {self.steps_done} of {self.cfg.steps}"
                    + (" and has written its final weights" if self._final_sent else "")
                )
            self._final_sent = True
            path = self._state_dir() / "server.safetensors"
            checkpoint.save_weights(self.model, path)
            reply["files"] = {path.name: checkpoint.sha256_file(path)}
            reply.update(self.reply_extra)
        else:
            raise LinkError(f"unknown CONTROL op {op!r}")
        return reply

    def _state_dir(self) -> Path:
        if self.run_dir is None:
            raise ValueError("this server has no run directory to keep its state in")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir


class FullModel:
    """fo-full and zo-full: the unsplit model, trained in place; the same interface as SplitClient.
    A ZO step runs its split counterpart's forwards (hosl.plan) on the whole model."""

    split_client = False

    def __init__(self, cfg: TrainConfig, model, k: int):
        self.cfg, self.model = cfg, model
        self.plan = StepPlan.of(cfg)
        self.device = device_of(model)
        update = self.plan.method.client
        self.rate = getattr(cfg, update.lr)
        if update.order == ZO:
            # Noise positions as `zo` over the split at k: the client's parameters first, then the rest.
            client, _ = split_model(model, k)
            first = [p for p in client.parameters() if p.requires_grad]
            seen = {id(p) for p in first}
            rest = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
            names = {id(p): n for n, p in model.named_parameters()}
            self.zo = zo_params_of(model, cfg, [(names[id(p)], p) for p in first + rest])
            zo.check_mu(self.zo, cfg.mu, "model")
            self.token_table = input_embedding(model)
            for p in model.parameters():
                p.requires_grad_(False)
            self.optimizer = None
        else:
            self.zo = None
            self.optimizer = make_optimizer(model.parameters(), cfg, self.rate)

    def _forward(self, batch):
        """The model, with the head only where the labels are (as the split's server runs it)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with compute_precision(self.cfg, self.device):
            return labelled_forward(
                self.model, batch["labels"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )

    def _loss(self, batch) -> torch.Tensor:
        return self._forward(batch).loss

    def train_step(self, step: int, batch):
        cfg, plan, start = self.cfg, self.plan, time.perf_counter()
        lr = self.rate * lr_factor(cfg, step)
        if self.optimizer is not None:
            loss = self._loss(batch)
            loss.backward()
            value = float(loss.detach())
            skipped = fo_update(self.optimizer, lr, math.isfinite(value), "model", step)
            return StepStats(value, time.perf_counter() - start, 0.0, 0.0, skipped)
        losses: dict[tuple[int, int], float] = {}
        with torch.no_grad():
            clean, recorder = None, None
            if plan.clean is not None:
                with LookupRecorder(self.zo) as recorder:
                    clean = float(self._loss(batch))
            rows = step_rows(self.zo, batch, recorder, self.token_table)
            for forward in plan.probes(self.zo, step, rows):
                losses[forward.key] = float(self._loss(batch))
            grads = plan.grads(losses if clean is None else {**losses, CLEAN: clean})
            extra = [*losses.values(), *(() if clean is None else (clean,))]
            skipped = plan.end(self.zo, step, [(0, grads, rows)], lr, cfg.weight_decay, extra)
        loss = clean if clean is not None else sum(losses.values()) / len(losses)
        encoded = zo.encode_rows(rows) if rows is not None else None
        return StepStats(loss, time.perf_counter() - start, 0.0, 0.0, skipped, grads, encoded)

    @torch.no_grad()
    def scores(self, step: int, batch) -> torch.Tensor:
        logits = self._forward(batch).logits
        labels = batch["labels"].to(self.device)
        return target_scores(logits.float(), labels[:, labelled_positions(labels) + 1]).cpu()
