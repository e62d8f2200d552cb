"""A long-lived server that many grpc clients join, leave and join again (`python -m hosl.serve
--clients N`): the rounds of hosl.clients, paced by the server instead of a lead client.

  before round r   each connected client's frames are served, in client order, until it opens round
                   r (CONTROL round): its evaluation batches between rounds see the server's weights
                   after round r - 1, whichever client sends them;
  round r          the sampled clients that are connected take their steps, as in RoundServer; one
                   that is not connected is left out of the round; the ROUND frame goes to every
                   connected client;
  after the last   each connected client's frames until its stop: evaluation, the final weights
                   (written once, the same reply to every client).

A client joins with a session whose HELLO carries its --client-id and how many rounds its weights
hold (0 for a new process). It is taken in before the next round: the server answers with the round
it is at and sends the ROUND frames of its log that the client lacks (scalars and row lists; the whole
log is kept), so a client that starts late, dials again after its link dropped, or was restarted,
holds every other client's weights before it takes part. No client is special: the run goes on while
--min-clients are connected (waiting up to --timeout for more when fewer are), any client may leave,
and the server ends once the last round is over and every client that joined has stopped (or stayed
away for --timeout). The server's first HELLO answer names its run (a random id), and a client that
rejoins names it back: a client holding rounds of an earlier server process is refused instead of
drifting apart from the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import secrets
import shutil
import struct
import threading
import time
from pathlib import Path

import torch

from hosl import checkpoint
from hosl.boundary import Frame, Kind, decode_frame, encode_frame
from hosl.clients import RoundServer, Schedule
from hosl.config import TrainConfig
from hosl.roles import PROTOCOL, SplitServer, use_threads
from hosl.transport import Link, LinkError

__all__ = ["Federation"]

logger = logging.getLogger(__name__)


class Federation(RoundServer):
    """RoundServer over the sessions that come and go: `session(link)` is each grpc session's
    handler, `serve()` runs the rounds on the caller's thread."""

    keeps_log = True  # a client may (re)join at any round and needs every ROUND frame since the first

    def __init__(self, cfg: TrainConfig, server: SplitServer, schedule: Schedule | None = None):
        schedule = schedule or Schedule(cfg.seed, cfg.clients, cfg.clients_per_round)
        super().__init__(cfg, server, [None] * cfg.clients, schedule)
        self.live = set()
        self.run_id = secrets.token_hex(8)
        self.joins: list[list] = []  # [client, round, rounds it held], in the order they joined
        self._arrivals: queue.Queue = queue.Queue()
        self._done: dict[int, threading.Event] = {}  # a connected client's handler waits on it
        self._stopped: set[int] = set()  # clients that stopped after the last round
        self._final: dict | None = None
        self._over = False

    # -- sessions (their own threads) ----------------------------------------------------------------

    def session(self, link: Link) -> None:
        """A session's handler: its HELLO checked, then the link held for the rounds until they are
        done with it. LinkError (for the caller to send) when the client may not join."""
        frame = link.recv()
        self.server.check_hello(frame)
        i, applied, run = frame.client_id, frame.meta.get("applied", 0), frame.meta.get("run")
        if not 0 <= i < self.cfg.clients:
            n = self.cfg.clients
            raise LinkError(f"client {i} of a run of {n} clients (--client-id 0 to {n - 1})")
        if type(applied) is not int or not 0 <= applied <= self.cfg.steps:
            raise LinkError(f"client {i}'s HELLO holds {applied!r} rounds applied")
        if applied and run != self.run_id:
            raise LinkError(
                f"client {i} holds {applied} rounds of another run than this server's (was the server started "
                "again?): start the client afresh"
            )
        if self._over:
            raise LinkError("the run is over")
        link.client_id = i
        done = threading.Event()
        self._arrivals.put((i, link, applied, done))
        done.wait()

    # -- the rounds (the caller's thread) ------------------------------------------------------------

    def serve(self) -> None:
        use_threads(self.cfg.server_threads)
        try:
            for rnd in range(self.server.steps_done, self.cfg.steps):
                ready: set[int] = set()
                while True:  # every connected client opens the round, those who join meanwhile too
                    self._gather(rnd)
                    waiting = sorted(self.live - ready)
                    if not waiting:
                        break
                    for i in waiting:
                        if self._before(i, rnd):
                            ready.add(i)
                self._round(rnd)
                every = self.cfg.save_every
                if every and ((rnd + 1) % every == 0 or rnd + 1 == self.cfg.steps):
                    self.save(rnd + 1)
            self._end()
        except BaseException as exc:
            for i in list(self._done):
                self._release(i, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._over = True
            while True:
                try:
                    _, link, _, done = self._arrivals.get_nowait()
                except queue.Empty:
                    break
                with contextlib.suppress(Exception):
                    link.fail("the run is over")
                done.set()

    def _gather(self, rnd: int) -> None:
        """Take in the clients that arrived; while fewer than --min-clients are connected, wait for
        more: for as long as it takes before the first round this process runs (a server waits for
        its clients), up to --timeout after it (LinkError when none come)."""
        first = not self.joins
        deadline = time.monotonic() + self.cfg.timeout
        while True:
            try:
                arrival = self._arrivals.get_nowait()
            except queue.Empty:
                if len(self.live) >= self.cfg.min_clients:
                    return
                try:
                    arrival = self._arrivals.get(timeout=None if first else max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    raise LinkError(
                        f"{len(self.live)} clients connected at round {rnd}, fewer than --min-clients "
                        f"{self.cfg.min_clients}, and none came within --timeout {self.cfg.timeout:g} s"
                    ) from None
            self._take(*arrival, rnd)

    def _take(self, i: int, link: Link, applied: int, done: threading.Event, rnd: int) -> None:
        """Client i's new session, taken in before round rnd: the answer to its HELLO and the rounds
        it lacks. A session of a client already connected replaces the old one."""
        if applied > rnd:
            with contextlib.suppress(Exception):
                link.fail(
                    f"client {i} holds {applied} rounds; this server is at round {rnd} (started again from its "
                    "checkpoint): start the client again with a new --out, and it catches up from the server's log"
                )
            done.set()
            return
        if i in self._done:
            self._release(i, f"client {i} connected again")
        self.links[i], self._done[i], self.delivered[i] = link, done, applied
        try:
            link.send(Frame(Kind.HELLO, meta={"protocol": PROTOCOL, "round": rnd, "run": self.run_id}))
            self._deliver(i, rnd)
        except LinkError as exc:
            logger.warning("client %d could not join at round %d: %s", i, rnd, exc)
            self._release(i)
            return
        self.live.add(i)
        self.joins.append([i, rnd, applied])
        logger.info("client %d joined at round %d (it held %d rounds)", i, rnd, applied)

    def _release(self, i: int, why: str | None = None) -> None:
        """Client i's session is over: told why (if it is an error), and its handler let go."""
        self.live.discard(i)
        done = self._done.pop(i, None)
        if why is not None and self.links[i] is not None:
            with contextlib.suppress(Exception):
                self.links[i].fail(why)
        if done is not None:
            done.set()

    def _drop(self, i: int, rnd: int, exc: BaseException) -> None:
        """Client i left (any client: the run goes on, unless --on-client-loss fail)."""
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        self.left.append([i, rnd, why])
        logger.warning("client %d left at round %d: %s", i, rnd, why)
        self._release(i, f"the server dropped client {i} at round {rnd}: {why}")
        if self.cfg.on_client_loss == "fail":
            raise LinkError(f"client {i} left at round {rnd} (--on-client-loss fail): {why}") from exc

    def _before(self, i: int, rnd: int) -> bool:
        """Client i's frames until it opens round rnd; False when it left instead."""
        try:
            while True:
                frame = self._recv(i)
                if frame.kind == Kind.CONTROL and frame.meta.get("op") == "round":
                    if frame.step != rnd:
                        raise LinkError(f"client {i} opened round {frame.step}; the server is at round {rnd}")
                    return True
                self._between(i, frame)
        except LinkError as exc:
            self._drop(i, rnd, exc)
            return False

    def _between(self, i: int, frame: Frame) -> bool:
        """One frame between rounds: an evaluation batch, or after the last round the final weights
        or a stop (False)."""
        end = self.server.steps_done == self.cfg.steps
        op = frame.meta.get("op") if frame.kind == Kind.CONTROL else None
        if frame.kind == Kind.BATCH and frame.meta.get("eval"):
            self.server.evaluate(frame, self.links[i])
        elif end and op == "final":
            if self._final is None:
                self._final = self.server.control_reply(frame)
            self.links[i].send(Frame(Kind.CONTROL, meta=self._final))
        elif end and op == "stop":
            return False
        else:
            what = f"CONTROL {op}" if op else frame.kind.name
            raise LinkError(f"client {i} sent {what} between rounds")
        return True

    def _end(self) -> None:
        """After the last round: every client's frames until its stop, including clients that join
        now; then up to --timeout for those that joined once and have not stopped."""
        steps, deadline = self.cfg.steps, time.monotonic() + self.cfg.timeout
        while True:
            self._gather_any(steps, deadline)
            if not self.live:
                return
            for i in sorted(self.live):
                try:
                    while self._between(i, self._recv(i)):
                        pass
                    self._stopped.add(i)
                    self._release(i)
                except LinkError as exc:
                    self._drop(i, steps, exc)

    def _gather_any(self, rnd: int, deadline: float) -> None:
        """Take in what arrived; with no client connected, wait until the deadline for one that
        joined once and has not stopped."""
        missing = {i for i, _, _ in self.joins} - self._stopped
        while True:
            try:
                block = not self.live and missing and time.monotonic() < deadline
                arrival = (
                    self._arrivals.get(timeout=max(deadline - time.monotonic(), 0.0))
                    if block
                    else (self._arrivals.get_nowait())
                )
            except queue.Empty:
                return
            self._take(*arrival, rnd)

    # -- checkpoints (--save-every): the server's weights and optimiser, its log of rounds, its run --------

    def save(self, step: int) -> None:
        """checkpoint-<step>/ in the server's run directory, written whole, verified by a manifest and
        renamed into place; the newest --save-total-limit kept. Clients keep nothing: a client started
        again catches up from the log."""
        out = self.server.run_dir
        tmp, final = checkpoint.tmp_dir(out, step), checkpoint.step_dir(out, step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = checkpoint.save_server(self.server, tmp)
        (tmp / ROUNDS).write_bytes(b"".join(_framed(f) for f in self.log[:step]))
        (tmp / "state.json").write_text(json.dumps({"step": step, "run": self.run_id}))
        files.update(checkpoint.digests(tmp, [ROUNDS, "state.json"]))
        checkpoint.write_manifest(tmp, files, out / "config.json")
        checkpoint.commit(tmp, final)
        checkpoint.prune(out, [s for s, _ in checkpoint.complete(out)][-self.cfg.save_total_limit :])

    def resume(self) -> int:
        """Continue from the newest complete checkpoint in the server's run directory, verified: its
        weights, optimiser, log of rounds and run. Returns its round; CheckpointError without one."""
        out = self.server.run_dir
        found = checkpoint.complete(out)
        if not found:
            raise checkpoint.CheckpointError(f"{out}: no checkpoint to resume (was the server run with --save-every?)")
        step, path = found[-1]
        manifest = checkpoint.read_manifest(path / checkpoint.MANIFEST)
        checkpoint.check_config(manifest, out / "config.json", path)
        checkpoint.verify(path, manifest)
        log = _unframed((path / ROUNDS).read_bytes(), path / ROUNDS)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("step") != step or not isinstance(state.get("run"), str):
            raise checkpoint.CheckpointError(f"{path / 'state.json'}: not the state of a federation's round {step}")
        if len(log) != step or [f.step for f in log] != list(range(step)):
            raise checkpoint.CheckpointError(f"{path}: its log of rounds does not end at round {step}")
        checkpoint.load_server_state(self.server, path)
        self.log, self.run_id, self.server.steps_done = log, state["run"], step
        return step


ROUNDS = "rounds.bin"  # a checkpoint's log of rounds: each ROUND frame as hosl.boundary encodes it, length first


def _framed(frame: Frame) -> bytes:
    data = encode_frame(frame).numpy().tobytes()
    return struct.pack("<Q", len(data)) + data


def _unframed(data: bytes, path: Path) -> list[Frame]:
    frames, at = [], 0
    while at < len(data):
        if at + 8 > len(data):
            raise checkpoint.CheckpointError(f"{path}: cut short")
        (n,) = struct.unpack_from("<Q", data, at)
        chunk = data[at + 8 : at + 8 + n]
        if len(chunk) != n:
            raise checkpoint.CheckpointError(f"{path}: cut short")
        frame = decode_frame(torch.frombuffer(bytearray(chunk), dtype=torch.uint8))
        if frame.kind != Kind.ROUND:
            raise checkpoint.CheckpointError(f"{path}: holds a {frame.kind.name} frame")
        frames.append(frame)
        at += 8 + n
    return frames
