"""Many edge clients, one server: split-federated HOSL (--clients N), every client holding the same
client weights, bit for bit, with no weight ever crossing the network.

All clients share one client model (the SFL setting); each has its own shard of the training data
(`partition`). A round r:

  1. The lead client (client 0: it also evaluates and asks for the final weights) opens the round
     with CONTROL round.
  2. The server serves the round's sampled clients (`Schedule.sampled`, seeded) in client order.
     Each sends its BATCH and the step plan's uploads, all against the same server weights; the
     server answers each as in a one-client step and accumulates its first-order gradient on each
     clean upload, then takes the client's REPORT: its projected gradients g (float64) and the
     rows its embedding tables used.
  3. The server steps once on the mean of those gradients and sends ROUND to every client: the
     sampled clients with their g and rows. Each client applies

         w <- w - lr / (K Q) * sum_i sum_q g_iq z_iq          (K sampled clients, Q probes)

     as one update pass per sampled client, in client order (client i's pass on its own rows of
     the tables), then weight decay once. A round any of whose losses or g is not finite is
     skipped on both sides.

Why the clients agree exactly: with scratch probes (zo.PROBE_WRITES) a client's probes never write
into its weights, so the only writes are the round's update passes, a pure function of the weights
and the ROUND frame; the noise z is bit-identical on every backend. A client that was not sampled
applies the same frame. Synchronisation is O(K Q) scalars per round (plus the row lists), whatever
the model's size; `RoundClient.sync_bytes` counts it.

Each client draws its probe seeds from (run seed, round, probe, client) and walks its own shard
in a seeded order, one batch per round it is sampled in. Client 0's seeds and data order are a
one-client run's, so --clients 1 is today's run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from hosl import zo
from hosl.boundary import Frame, Kind
from hosl.config import TrainConfig
from hosl.estimators import finite
from hosl.roles import SplitClient, SplitServer, StepStats, use_threads
from hosl.split import ClientModel, ServerModel
from hosl.transport import Link, LinkError, PeerError

logger = logging.getLogger(__name__)


_DIRICHLET_DRAWS = 100


class PartitionError(ValueError):
    """A partition that leaves a client without training examples."""


# -- data and sampling -------------------------------------------------------------------------------


def partition(
    labels: Sequence[int], n: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[list[int]]:
    """The indices of each of n clients' training examples. iid: a seeded permutation dealt out in
    turn. dirichlet: per label, proportions over the clients drawn from Dirichlet(alpha) and that
    label's (shuffled) examples cut by them, as the federated-learning literature skews labels;
    drawn again (up to 100 times, seeded) while a client gets no example. One client gets every
    example, in order. PartitionError when a client would get none."""
    count = len(labels)
    if n == 1:
        return [list(range(count))]
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    shards: list[list[int]] = [[] for _ in range(n)]
    if scheme == "iid":
        for i, index in enumerate(torch.randperm(count, generator=g).tolist()):
            shards[i % n].append(index)
    elif scheme == "dirichlet":
        concentration = torch.full((n,), float(alpha), dtype=torch.float64)
        for _ in range(_DIRICHLET_DRAWS):  # as the literature does: draw again while a client has none
            shards = [[] for _ in range(n)]
            for label in sorted(set(labels)):
                members = [i for i, y in enumerate(labels) if y == label]
                members = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
                gammas = torch._standard_gamma(concentration, generator=g)
                cuts = (torch.cumsum(gammas / gammas.sum(), 0) * len(members)).round().long().tolist()
                lo = 0
                for i, hi in enumerate(cuts):
                    shards[i].extend(members[lo:hi])
                    lo = hi
            if all(shards):
                break
    else:
        raise ValueError(f"partition must be iid or dirichlet, got {scheme!r}")
    empty = [i for i, shard in enumerate(shards) if not shard]
    if empty:
        how = f"--partition {scheme}" + (f" --alpha {alpha:g}" if scheme == "dirichlet" else "")
        raise PartitionError(
            f"{how} leaves client {empty[0]} no training examples ({count} examples over {n} clients); "
            "use more examples, fewer clients" + (" or a larger --alpha" if scheme == "dirichlet" else "")
        )
    return [sorted(shard) for shard in shards]


def hold_out(shards: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(training part, held-out part) of each shard: round(fraction * size) of its examples, drawn
    with the seed, are held out for evaluating the shared model on that client's own data.
    PartitionError when a client would be left no training example."""
    if not fraction:
        return shards, [[] for _ in shards]
    g = torch.Generator().manual_seed(seed * 1_000_003 + 29)
    train, held = [], []
    for i, shard in enumerate(shards):
        k = round(fraction * len(shard))
        if k >= len(shard):
            what = f"--client-eval-fraction {fraction:g} leaves client {i} no training examples"
            raise PartitionError(f"{what} ({len(shard)} in its shard)")
        picked = {shard[j] for j in torch.randperm(len(shard), generator=g)[:k].tolist()}
        train.append([x for x in shard if x not in picked])
        held.append(sorted(picked))
    return train, held


class Schedule:
    """Which clients each round samples, and how far into its shard each client is."""

    def __init__(self, seed: int, clients: int, per_round: int):
        self.seed, self.clients, self.per_round = seed, clients, per_round
        self._sampled: dict[int, list[int]] = {}
        self._taken: list[int] = [0] * clients  # rounds before _upto each client took part in
        self._upto = 0

    def sampled(self, rnd: int) -> list[int]:
        """The clients of round `rnd`, in client order: all of them, or per_round drawn by a hash of
        (seed, round, client), the same on every machine."""
        if rnd not in self._sampled:
            ids = list(range(self.clients))
            if self.per_round < self.clients:

                def key(i):
                    return hashlib.blake2b(f"hosl:round:{self.seed}:{rnd}:{i}".encode(), digest_size=8).digest()

                ids = sorted(sorted(ids, key=key)[: self.per_round])
            self._sampled[rnd] = ids
        return self._sampled[rnd]

    def position(self, client: int, rnd: int) -> int:
        """How many rounds before `rnd` the client took part in: the index of its batch at `rnd`."""
        if rnd < self._upto:
            return sum(client in self.sampled(r) for r in range(rnd))
        for r in range(self._upto, rnd):
            for i in self.sampled(r):
                self._taken[i] += 1
        self._upto = rnd
        return self._taken[client]


# -- the round's update ---------------------------------------------------------------------------------


def round_frame(rnd: int, reports: list[tuple[int, Frame]], skipped: bool, q: int, left=()) -> Frame:
    """ROUND: the clients that reported, their g (K x Q float64) and losses, their rows, whether the
    round is skipped, and who left during it ([client, round, why])."""
    tensors = {
        "clients": torch.tensor([c for c, _ in reports], dtype=torch.int64),
        "grads": torch.stack([f.tensors["grads"] for _, f in reports]).reshape(len(reports), q)
        if reports
        else torch.zeros(0, q, dtype=torch.float64),
        "losses": torch.cat([f.tensors["loss"] for _, f in reports])
        if reports
        else torch.zeros(0, dtype=torch.float64),
    }
    if reports and all("row_counts" in f.tensors for _, f in reports):
        tensors["row_counts"] = torch.stack([f.tensors["row_counts"] for _, f in reports])
        tensors["rows"] = torch.cat([f.tensors["rows"] for _, f in reports])
    meta = {"skipped": skipped} | ({"left": [list(x) for x in left]} if left else {})
    return Frame(Kind.ROUND, step=rnd, tensors=tensors, meta=meta)


def round_entries(frame: Frame, clients: int, q: int) -> list[tuple[int, list[float], list | None]]:
    """(client, g, rows) of each sampled client of a ROUND frame, checked: LinkError for a frame
    that does not describe a round of this run."""
    t = frame.tensors
    ids, grads = t.get("clients"), t.get("grads")
    if ids is None or grads is None or ids.dtype != torch.int64 or grads.dtype != torch.float64:
        raise LinkError("a ROUND frame without int64 clients and float64 grads")
    if ids.dim() != 1 or not 0 <= len(ids) <= clients or tuple(grads.shape) != (len(ids), q):
        raise LinkError(f"a ROUND frame of {tuple(ids.shape)} clients and {tuple(grads.shape)} grads (Q = {q})")
    if ids.tolist() != sorted(set(ids.tolist())) or any(not 0 <= c < clients for c in ids.tolist()):
        raise LinkError(f"a ROUND frame names clients {ids.tolist()} of a run of {clients}")
    rows: list[list | None] = [None] * len(ids)
    if "row_counts" in t:
        counts, flat = t["row_counts"], t.get("rows")
        if (
            flat is None
            or counts.dim() != 2
            or counts.shape[0] != len(ids)
            or flat.dim() != 1
            or flat.is_floating_point()
        ):
            raise LinkError("a ROUND frame with row counts that do not match its rows")
        if int(counts.clamp(min=0).sum()) != len(flat) or bool((counts < -1).any()):
            raise LinkError("a ROUND frame with row counts that do not match its rows")
        at = 0
        for i, per_table in enumerate(counts.tolist()):
            rows[i] = []
            for n in per_table:
                rows[i].append(None if n < 0 else flat[at : at + n].long())
                at += max(n, 0)
    return [(int(c), g, r) for c, g, r in zip(ids.tolist(), grads.tolist(), rows)]


# -- the two roles -------------------------------------------------------------------------------------


class RoundClient:
    """One client of a many-client run: a SplitClient whose steps report to the server, and which
    applies every round's update. The lead (client 0) has the trainer's interface (train_step,
    scores, control, ...), so hosl.train's loop drives it."""

    split_client = True

    def __init__(self, cfg: TrainConfig, client: SplitClient, schedule: Schedule):
        self.cfg, self.client, self.schedule = cfg, client, schedule
        self.id = client.client_id
        self.zo, self.rate, self.link, self.plan = client.zo, client.rate, client.link, client.plan
        # The server may wait out --timeout on each of the round's other clients before it gets here.
        self.link.timeout = cfg.timeout * (cfg.clients_per_round + 1)
        self.model = client.model
        self.sync_bytes = [0, 0]  # REPORT frames sent, ROUND frames received
        self.left: list[list] = []  # [client, round, why] of the clients the server dropped
        self.applied = 0  # rounds applied to this client's weights
        self.catch_up_bytes, self.catch_up_s = 0, 0.0  # of rounds applied late (--relay sampled, or on joining)
        # Under hosl.federation (grpc) every client opens its rounds, and one whose link drops dials
        # again: redial(timeout) gives a new authenticated link.
        self.announces = self.id == 0 or cfg.transport == "grpc"
        self.redial: Callable[[float], Link] | None = None
        self.run_id: str | None = None  # the federation's run, named in a rejoining HELLO
        self.rejoined = 0
        self._caught: dict[int, StepStats] = {}  # rounds applied from the server's log, not yet stepped

    def lr(self, rnd: int) -> float:
        return self.client.lr(rnd)

    def digest(self) -> str:
        """SHA-256 of this client's ZO weights: equal on every client of a run, on any machine."""
        return hashlib.sha256(self.zo.flat.flat.detach().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()

    def hello(self) -> None:
        """HELLO, then the rounds the server ran before this client (re)joined, from its log."""
        extra = {"applied": self.applied} | ({"run": self.run_id} if self.run_id else {})
        reply = self.client.hello(**extra)
        upto = reply.get("round", 0)
        if type(upto) is not int or not self.applied <= upto <= self.cfg.steps:
            raise LinkError(f"the server's HELLO names round {upto!r}; this client has applied {self.applied}")
        self.run_id = reply.get("run", self.run_id)
        t, received = time.perf_counter(), self.link.bytes_received
        while self.applied < upto:
            rnd = self.applied
            entries, skipped, losses, update_s = self._apply_next(rnd)
            self._caught[rnd] = self._stats(entries, skipped, losses, update_s, 0.0, 0.0, caught_up=True)
        self.catch_up_bytes += self.link.bytes_received - received
        self.catch_up_s += time.perf_counter() - t

    def scores(self, step: int, batch) -> torch.Tensor:
        return self.client.scores(step, batch)

    def control(self, op: str, **meta) -> dict:
        return self.client.control(op, **meta)

    def stop(self) -> None:
        self.client.stop()

    def train_step(self, rnd: int, batch) -> StepStats:
        """Round `rnd`: this client's step when it is sampled (batch: its batch, else unused), then
        the round's update. The stats are the round's: its clients' g, rows and mean loss. With a
        redial, a dropped link is dialled again and the rounds missed meanwhile come from the
        server's log."""
        while True:
            if rnd in self._caught:  # applied on (re)joining: the server ran it without this client
                return self._caught.pop(rnd)
            try:
                return self._round(rnd, batch)
            except LinkError as exc:
                if self.redial is None:
                    raise
                self._rejoin(rnd, exc)

    def _round(self, rnd: int, batch) -> StepStats:
        start = time.perf_counter()
        if self.announces:
            self.link.send(Frame(Kind.CONTROL, step=rnd, meta={"op": "round"}))
        own = None
        if self.id in self.schedule.sampled(rnd):
            self.catch_up(rnd)
            own = self.client.train_step(rnd, batch, report=True)
            self.sync_bytes[0] += self.client.report_bytes
        entries, skipped, losses, update_s = self._apply_next(rnd)
        wall = time.perf_counter() - start
        client_s = (own.client_s if own else 0.0) + update_s
        server_s = own.server_s if own else 0.0
        return self._stats(entries, skipped, losses, client_s, server_s, max(wall - client_s - server_s, 0.0))

    @staticmethod
    def _stats(entries, skipped, losses, client_s, server_s, link_s, caught_up=False) -> StepStats:
        return StepStats(
            loss=sum(losses) / len(losses) if losses else float("nan"),
            client_s=client_s,
            server_s=server_s,
            link_s=link_s,
            skipped=skipped,
            grads=[g for _, g, _ in entries],
            rows=[zo.encode_rows(r) if r is not None else None for _, _, r in entries],
            clients=[c for c, _, _ in entries],
            caught_up=caught_up,
        )

    def _rejoin(self, rnd: int, exc: LinkError) -> None:
        """Dial the server again, with backoff, for up to --timeout; the new session's HELLO brings
        the rounds missed. LinkError when the server cannot be reached; PeerError when it refuses
        this client (another run, or the run is over)."""
        logger.warning("client %d lost the server at round %d (%s); dialling again", self.id, rnd, exc)
        self.link.abort()
        sent, received, timeout = self.link.bytes_sent, self.link.bytes_received, self.link.timeout
        deadline, wait = time.monotonic() + self.cfg.timeout, 0.5
        while True:
            try:
                link = self.redial(max(deadline - time.monotonic(), 1.0))
                link.timeout = timeout
                link.bytes_sent, link.bytes_received = sent, received  # the run's traffic, over every session
                self.link = self.client.link = link
                self.hello()
                self.rejoined += 1
                return
            except PeerError:
                raise
            except LinkError as failed:
                self.link.abort()
                if time.monotonic() + wait >= deadline:
                    raise LinkError(
                        f"client {self.id} lost the server at round {rnd} and could not join it again within "
                        f"--timeout: {failed}"
                    ) from exc
                time.sleep(wait)
                wait = min(2 * wait, 8.0)

    def catch_up(self, upto: int) -> None:
        """Apply the rounds before `upto` that this client has not yet applied (--relay sampled: the
        server sends them just before the client's next step, and after the last round)."""
        while self.applied < upto:
            t = time.perf_counter()
            received = self.link.bytes_received
            self._apply_next(self.applied)
            self.catch_up_bytes += self.link.bytes_received - received
            self.catch_up_s += time.perf_counter() - t

    def _apply_next(self, rnd: int):
        """Receive the ROUND frame of round `rnd` and apply it: (entries, skipped, losses, seconds)."""
        if rnd != self.applied:
            raise RuntimeError(f"client {self.id} would apply round {rnd} after round {self.applied - 1}")
        received = self.link.bytes_received
        frame = self.link.recv()
        if frame.kind != Kind.ROUND or frame.step != rnd:
            raise LinkError(f"expected the ROUND of round {rnd}, got {frame.kind.name} of step {frame.step}")
        self.sync_bytes[1] += self.link.bytes_received - received
        entries = round_entries(frame, self.cfg.clients, self.plan.q)
        skipped = bool(frame.meta.get("skipped"))
        t = time.perf_counter()
        with torch.no_grad():
            if not skipped:
                self.plan.end(self.zo, rnd, entries, self.lr(rnd), self.cfg.weight_decay)
        self.applied += 1
        for client, at, why in frame.meta.get("left", []):
            self.left.append([client, at, why])
            if self.announces:
                logger.warning("client %d left at round %d: %s", client, at, why)
        return entries, skipped, frame.tensors["losses"].tolist(), time.perf_counter() - t

    def follow(self, batches: Callable[[int], dict], rounds: int) -> None:
        """A client other than the lead: hello, then every round (its batch drawn only when
        sampled; under --relay sampled, only the rounds it is sampled in, then the rest at the end).
        A failure here is sent to the server, which drops the client or ends the run."""
        with self.link:
            self.hello()
            for rnd in range(rounds):
                mine = self.id in self.schedule.sampled(rnd)
                if mine or self.cfg.relay == "all":
                    self.train_step(rnd, batches(self.schedule.position(self.id, rnd)) if mine else None)
            self.catch_up(rounds)


class RoundServer:
    """The server of a many-client run: one SplitServer's model and optimiser, N links. It serves
    the lead's frames between rounds (evaluation, CONTROL) and each round's sampled clients in
    client order; see the module docstring.

    A client other than the lead that fails, leaves or stays silent past the timeout is dropped
    (--on-client-loss continue): its part of the round is discarded, the round completes with the
    others, the ROUND frame says who left, and no frame goes to it again. Fewer live clients than
    --min-clients, --on-client-loss fail, or the lead's loss end the run with one line to every
    client left."""

    keeps_log = False  # True: every ROUND frame is kept (hosl.federation: clients join at any round)

    def __init__(self, cfg: TrainConfig, server: SplitServer, links: Sequence[Link | None], schedule: Schedule):
        self.cfg, self.server, self.links, self.schedule = cfg, server, list(links), schedule
        for link in self.links[1:]:
            if link is not None:
                link.max_frame_bytes = self.links[0].max_frame_bytes
        self.live = set(range(len(self.links)))
        self.log: list[Frame] = []  # the ROUND frames some live client has not been sent, from round _base on
        self._base = 0
        self.delivered = [0] * len(self.links)  # rounds sent to each client
        # Per client: steps served, seconds waiting for its BATCH (a straggler's cost), seconds from
        # its BATCH to its REPORT (the server's time on its step). The final weights' reply carries them.
        self.stats = [{"steps": 0, "wait_s": 0.0, "step_s": 0.0} for _ in self.links]
        server.reply_extra["server_stats"] = self.stats
        self.left: list[list] = []  # [client, round, why], in the order they left
        self._params = [] if server.optimizer is None else [
            p for group in server.optimizer.param_groups for p in group["params"]
        ]  # fmt: skip

    def _recv(self, i: int) -> Frame:
        frame = self.links[i].recv()
        if frame.client_id != i:
            raise LinkError(f"client {i}'s link carried a frame of client {frame.client_id}")
        return frame

    def _drop(self, i: int, rnd: int, exc: BaseException) -> None:
        """Client i is gone: LinkError for the lead, --on-client-loss fail or too few left."""
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if i == 0:
            raise LinkError(f"the lead client (client 0) left at round {rnd}: {why}") from exc
        if self.cfg.on_client_loss == "fail":
            raise LinkError(f"client {i} left at round {rnd} (--on-client-loss fail): {why}") from exc
        self.live.discard(i)
        self.left.append([i, rnd, why])
        logger.warning("client %d left at round %d: %s", i, rnd, why)
        with contextlib.suppress(Exception):
            self.links[i].fail(f"the server dropped client {i} at round {rnd}: {why}")
        if len(self.live) < self.cfg.min_clients:
            raise LinkError(
                f"{len(self.live)} clients left after client {i} left at round {rnd}, fewer than "
                f"--min-clients {self.cfg.min_clients}"
            )

    def serve(self) -> None:
        """HELLO from every client, then the lead's frames and the rounds until the lead's stop. A
        failure is sent to every client before it propagates."""
        use_threads(self.cfg.server_threads)
        try:
            for i in range(len(self.links)):
                try:
                    self.server.hello(self._recv(i), self.links[i])
                except LinkError as exc:
                    self._drop(i, 0, exc)
            while True:
                frame = self._recv(0)
                if frame.kind == Kind.CONTROL and frame.meta.get("op") == "round":
                    self._round(frame.step)
                elif frame.kind == Kind.BATCH and frame.meta.get("eval"):
                    self.server.evaluate(frame, self.links[0])
                elif frame.kind == Kind.CONTROL:
                    if not self.server.control(frame, self.links[0]):
                        return
                else:
                    raise LinkError(f"the server got an unexpected {frame.kind.name} frame from the lead client")
        except BaseException as exc:
            for i in sorted(self.live):
                self.links[i].fail(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            for link in self.links:
                link.close()

    def _client_step(self, i: int, rnd: int) -> tuple[dict, Frame]:
        """Client i's step of round rnd: its uploads answered, its REPORT checked."""
        q = self.server.plan.q
        start = time.perf_counter()
        batch = self._recv(i)
        arrived = time.perf_counter()
        if batch.kind != Kind.BATCH or batch.meta.get("eval") or batch.step != rnd:
            raise LinkError(f"expected client {i}'s BATCH of round {rnd}, got {batch.kind.name} of {batch.step}")
        losses = self.server.answer_step(batch, self.links[i])
        report = self._recv(i)
        if report.kind != Kind.REPORT or report.step != rnd:
            raise LinkError(f"expected client {i}'s REPORT of round {rnd}, got {report.kind.name}")
        grads, loss = report.tensors.get("grads"), report.tensors.get("loss")
        if grads is None or grads.dtype != torch.float64 or tuple(grads.shape) != (q,) or loss is None:
            raise LinkError(f"client {i}'s REPORT of round {rnd} does not hold its {q} projected gradients")
        stats = self.stats[i]
        stats["steps"] += 1
        stats["wait_s"] += arrived - start
        stats["step_s"] += time.perf_counter() - arrived
        return losses, report

    def _round(self, rnd: int) -> None:
        reports: list[tuple[int, Frame]] = []
        ok, summed = True, {}
        before = len(self.left)
        for i in self.schedule.sampled(rnd):
            if i not in self.live:
                continue
            try:
                self._deliver(i, rnd)
                losses, report = self._client_step(i, rnd)
            except LinkError as exc:
                for p in self._params:  # what it got of the way: not part of the round
                    p.grad = None
                self._drop(i, rnd, exc)
                continue
            values = [*report.tensors["grads"].tolist(), *report.tensors["loss"].tolist()]
            ok = ok and finite(losses.values()) and finite(values)
            for p in self._params:  # the round's sum, client by client in order
                if p.grad is not None:
                    if id(p) in summed:
                        summed[id(p)].add_(p.grad)
                    else:
                        summed[id(p)] = p.grad
                    p.grad = None
            reports.append((i, report))
        if reports:
            for p in self._params:
                p.grad = summed.get(id(p))
            self.server.update(rnd, {}, ok, share=len(reports))
        self.server.steps_done = rnd + 1  # a round no report reached is a step of the run too
        self.log.append(round_frame(rnd, reports, not (ok and reports), self.server.plan.q, self.left[before:]))
        last = rnd + 1 == self.cfg.steps
        sampled = {0, *(i for i, _ in reports)}
        for i in sorted(self.live):
            if self.cfg.relay == "all" or i in sampled or last:
                try:
                    self._deliver(i, rnd + 1)
                except LinkError as exc:
                    self._drop(i, rnd, exc)
        if not self.keeps_log and self.live:
            oldest = min(self.delivered[i] for i in self.live)  # every live client has the rounds before it
            del self.log[: oldest - self._base]
            self._base = oldest

    def _deliver(self, i: int, upto: int) -> None:
        """Send client i the ROUND frames of the rounds before `upto` it has not been sent."""
        while self.delivered[i] < upto:
            self.links[i].send(self.log[self.delivered[i] - self._base])
            self.delivered[i] += 1


# -- one process: the clients as threads -----------------------------------------------------------------


@contextlib.contextmanager
def local_rounds(
    cfg: TrainConfig,
    client_model: ClientModel,
    server_model: ServerModel,
    batches: Sequence[Callable[[int], dict]],
    run_dir: Path | None = None,
) -> Iterator[list[RoundClient]]:
    """--clients N in one process: the server and clients 1..N-1 on threads, each client with its
    own copy of the client model (as each device would hold one). Yields every client; the caller
    drives the lead (the first), the others follow on their own. On leaving, every thread has
    ended; the first failure of any side is raised in place of the others' reports of it."""
    from hosl.session import local_links_for

    hidden = client_model.stack.config.hidden_size
    pairs = [local_links_for(cfg, hidden, client_id=i) for i in range(cfg.clients)]
    schedule = Schedule(cfg.seed, cfg.clients, cfg.clients_per_round)
    server = SplitServer(cfg, server_model, pairs[0][1], run_dir)
    round_server = RoundServer(cfg, server, [s for _, s in pairs], schedule)
    models = [client_model] + [copy.deepcopy(client_model) for _ in range(cfg.clients - 1)]
    clients = [
        RoundClient(
            cfg, SplitClient(cfg, m, link, client_id=i), Schedule(cfg.seed, cfg.clients, cfg.clients_per_round)
        )
        for i, (m, (link, _)) in enumerate(zip(models, pairs))
    ]

    def guarded(name, fn, *args):
        def body():
            with contextlib.suppress(BaseException):  # the server drops the client and reports why
                fn(*args)

        return threading.Thread(target=body, name=name, daemon=True)

    server_failed: list[BaseException] = []

    def serve():
        try:
            round_server.serve()
        except BaseException as exc:
            server_failed.append(exc)

    threads = [threading.Thread(target=serve, name="hosl-server", daemon=True)]
    threads += [guarded(f"hosl-client-{c.id}", c.follow, batches[c.id], cfg.steps) for c in clients[1:]]
    for thread in threads:
        thread.start()
    try:
        with clients[0].link:
            yield clients
    except LinkError as exc:
        if isinstance(exc, PeerError):  # the server is ending: wait for its thread to record why
            threads[0].join(timeout=cfg.timeout)
        if server_failed:  # the server's reason names the client that ended the run, and why
            raise server_failed[0] from None
        raise
    finally:
        for thread in threads:  # the server has ended every client's link, or is about to
            thread.join(timeout=cfg.timeout * (cfg.clients_per_round + 2))
    if server_failed:
        raise server_failed[0]
    # A client that failed was dropped by the server and the run went on (--on-client-loss continue).
