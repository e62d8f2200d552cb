"""How frames travel between a client and a server: `local` (one process, threads, through two
hosl.boundary.FrameQueues: C++ rings of preallocated slots) or `dist` (two processes, on one machine or two, over
torch.distributed point-to-point messages; gloo on CPU).

Both ends are a `Link`: `send(frame)`, `recv()`, byte and frame counters, `close()`. Nothing waits
forever: every wait is bounded by the link's timeout, and a peer that stops answering or dies ends
in a LinkError on the other side that says which and what to look at. An end that fails can
`fail(message)` first: its peer then gets the message as a PeerError instead of waiting out the
timeout.

A peer is not trusted. Given a shared secret, a dist link opens with a challenge-response and MACs
every frame (hosl.auth). And it is not trusted with the reader's memory: a received frame is refused (LinkError, from a
FrameError) before it is allocated when it is longer than `max_frame_bytes`, and decoded with that
cap on its tensor data and at most `max_tensors` tensors. The roles set max_frame_bytes to the
largest frame their session can legitimately send (hosl.roles.frame_bytes_limit).

Counting: `bytes_sent` / `bytes_received` are what crosses, frames plus the transport's own framing
(dist sends an 8-byte length before each frame, and with a shared secret a 32-byte MAC after it). On
the client, sent is "up" and received "down".

Roles over dist: rank 0 is the server and rank 1 the client, started with torchrun
(`torchrun --nproc-per-node 2 ...`, or one process per machine with --nnodes 2) or with the usual
MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE environment. With many clients (dist_links, hosl.clients)
ranks 1..N are clients 0..N-1 and the server holds one link to each.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import threading
import time

import torch

from hosl import auth
from hosl.boundary import (
    MAX_FRAME_BYTES,
    BufferClosedError,
    Frame,
    FrameError,
    FrameQueue,
    Kind,
    decode_frame,
    encode_frame,
)

__all__ = [
    "Link",
    "LinkError",
    "LinkTimeout",
    "Network",
    "PeerError",
    "dist_link",
    "dist_links",
    "local_links",
    "TRANSPORTS",
]

logger = logging.getLogger(__name__)

TRANSPORTS = ("local", "dist")
ROLES = ("server", "client")  # rank 0, rank 1 over dist
DEFAULT_TIMEOUT = 300.0


class LinkError(RuntimeError):
    """The link is broken: the peer closed it, died, or sent something unusable."""


class LinkSetupError(ValueError):
    """The link's own flags or files are bad (a certificate that cannot be read, an address that
    cannot be listened on, grpcio not installed): bad input, found before any peer is reached."""


class LinkTimeout(LinkError, TimeoutError):
    """The peer did not answer within the link's timeout."""


class PeerError(LinkError):
    """The peer failed and said why (it sent an ERROR frame)."""


class Network:
    """A network between the two ends of a link, emulated, to measure what it costs: a frame arrives
    rtt/2 after its last byte left, and each direction sends its bytes at `mbit` megabits per second,
    one frame after the other (0: no limit). The sender does not wait (as with a socket's buffers);
    the receiver waits until the frame would have arrived."""

    def __init__(self, rtt_ms: float, mbit: float = 0.0):
        if rtt_ms < 0 or mbit < 0:
            raise ValueError(f"a network needs rtt_ms >= 0 and mbit >= 0, got {rtt_ms} and {mbit}")
        self.half_rtt = rtt_ms / 2000.0
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else 0.0
        self._lock = threading.Lock()
        self._free = {role: 0.0 for role in ROLES}  # when each sender's direction is next idle
        self._arrivals = {role: collections.deque() for role in ROLES}  # by sender, in order

    def sent(self, sender: str, nbytes: int) -> None:
        with self._lock:
            start = max(time.perf_counter(), self._free[sender])
            done = start + (nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)
            self._free[sender] = done
            self._arrivals[sender].append(done + self.half_rtt)

    def arrive(self, sender: str) -> None:
        """Wait until the sender's next frame has arrived."""
        with self._lock:
            at = self._arrivals[sender].popleft()
        delay = at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


class Link:
    """One end of a client-server connection; see the module docstring."""

    MAX_TENSORS = 8  # hosl's frames carry at most two

    def __init__(self, role: str, timeout: float, compression: str | None, client_id: int):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.role = role
        self.peer = ROLES[1 - ROLES.index(role)]
        self.timeout = float(timeout)
        self.compression = compression
        self.client_id = client_id
        self.bytes_sent = self.bytes_received = 0
        self.frames_sent = self.frames_received = 0
        self.closed = False
        self.broken = False  # a send or receive failed: the peer is gone or the channel is unusable
        self.max_frame_bytes = MAX_FRAME_BYTES  # the largest frame accepted, in bytes
        self.max_tensors = self.MAX_TENSORS
        self._mac: auth.FrameMac | None = None  # after authenticate(): every frame tagged and checked
        self.network: Network | None = None  # an emulated network between the ends (local links)

    def send(self, frame: Frame) -> None:
        """Encode and send one frame (the link's compression applies to activations and gradients)."""
        if self.closed:
            raise LinkError(f"the {self.role}'s link is closed")
        frame.client_id = self.client_id
        compression = self.compression if frame.kind in (Kind.ACT, Kind.GRAD) else None
        buf = encode_frame(frame, compression=compression)
        if self.network is not None:  # before the frame can be received
            self.network.sent(self.role, buf.numel())
        try:
            self.bytes_sent += self._send_bytes(buf)
        except LinkError:
            self.broken = True
            raise
        self.frames_sent += 1

    def recv(self) -> Frame:
        """The next frame from the peer. An ERROR frame raises PeerError with the peer's message."""
        if self.closed:
            raise LinkError(f"the {self.role}'s link is closed")
        try:
            buf, wire = self._recv_bytes()
        except LinkError:
            self.broken = True
            raise
        except FrameError as exc:  # a length refused before its bytes were read: the stream is lost
            self.broken = True
            raise LinkError(f"the {self.role} received a bad frame from the {self.peer}: {exc}") from exc
        self.bytes_received += wire
        self.frames_received += 1
        if self.network is not None:
            self.network.arrive(self.peer)
        try:
            frame = decode_frame(buf, max_bytes=self.max_frame_bytes, max_tensors=self.max_tensors)
        except FrameError as exc:
            raise LinkError(f"the {self.role} received a bad frame from the {self.peer}: {exc}") from exc
        if frame.kind == Kind.ERROR:
            raise PeerError(f"the {self.peer} failed: {frame.meta.get('message', '(no message)')}")
        return frame

    def fail(self, message: str) -> None:
        """Tell the peer this end is failing (best effort), then close."""
        try:
            if not self.closed and not self.broken:
                self.send(Frame(Kind.ERROR, meta={"message": message}))
        except Exception:  # the peer may be gone already; the message is a courtesy
            logger.debug("could not send the ERROR frame", exc_info=True)
        self.close()

    def stats(self) -> dict:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
        }

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        """Close without waiting on the peer (the link is being given up)."""
        self.broken = True
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, LinkError):
            self.fail(f"{type(exc).__name__}: {exc}")
        self.close()

    def authenticate(self, secret: bytes) -> None:
        """The handshake of hosl.auth: each side proves it holds the secret; then every frame is MACed.
        Its messages are counted in the byte counters as frames are."""
        message, mine = auth.hello(self.role)
        self._send_message(message)
        try:
            theirs = auth.peer_nonce(self._recv_message(auth.HELLO_BYTES), self.peer)
        except FrameError:
            raise LinkError(f"the {self.peer} did not authenticate (no shared secret on its side?)") from None
        except auth.AuthError as exc:
            raise LinkError(str(exc)) from None
        client_nonce, server_nonce = (theirs, mine) if self.role == "server" else (mine, theirs)
        proof = auth.proof(secret, self.role, client_nonce, server_nonce)
        self._send_message(proof)
        try:
            got = self._recv_message(len(proof))
        except FrameError:
            got = b""
        if not auth.proof_ok(got, secret, self.peer, client_nonce, server_nonce):
            try:  # deliver this side's proof before leaving, so the peer judges it and says why, too
                self._flush()
            except LinkError:
                pass
            raise LinkError(f"the {self.peer} failed authentication: it does not hold this run's shared secret")
        self._mac = auth.FrameMac(auth.session_key(secret, client_nonce, server_nonce), self.role, self.peer)

    def _check_tag(self, data, tag: bytes) -> None:
        """A received frame's MAC (after authenticate), or a HELLO of a peer with a secret when this
        end has none: LinkError either way."""
        if self._mac is not None:
            try:
                self._mac.check(data, tag)
            except auth.AuthError as exc:
                raise LinkError(f"the {self.role} refused a frame: {exc}") from None
        elif bytes(data[:4]) == auth.HELLO_MAGIC:
            raise LinkError(
                f"the {self.peer} authenticates with a shared secret and this {self.role} has none: give both sides "
                f"the same --auth-token-file (or ${auth.ENV})"
            )

    # Transport-specific: send encoded bytes and return what crossed; receive one frame's bytes; the
    # handshake's messages; deliver what was sent.
    def _send_bytes(self, buf: torch.Tensor) -> int:
        raise NotImplementedError

    def _recv_bytes(self) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def _send_message(self, data: bytes) -> None:
        raise NotImplementedError

    def _recv_message(self, limit: int) -> bytes:
        raise NotImplementedError

    def _flush(self) -> None:
        pass


class _LocalLink(Link):
    """One end of an in-process link: it puts into one FrameQueue and gets from the other."""

    def __init__(self, role, outbox: FrameQueue, inbox: FrameQueue, timeout, compression, client_id):
        super().__init__(role, timeout, compression, client_id)
        self._outbox, self._inbox = outbox, inbox

    def _send_bytes(self, buf):
        try:
            self._outbox.put(buf, self.timeout)
        except TimeoutError as exc:
            raise LinkTimeout(
                f"the {self.role} could not send for {self.timeout:g} s: the {self.peer} stopped taking frames"
            ) from exc
        except BufferClosedError as exc:
            raise LinkError(f"the {self.peer} closed the link") from exc
        except ValueError as exc:  # a frame larger than a slot
            raise LinkError(f"{exc}; make the local link's slot_bytes larger") from exc
        return buf.numel()

    def _recv_bytes(self):
        try:
            buf = self._inbox.get(self.timeout)  # a view of the queue's receive buffer: decoded at once
        except TimeoutError as exc:
            raise LinkTimeout(f"the {self.role} got no frame from the {self.peer} within {self.timeout:g} s") from exc
        except BufferClosedError as exc:
            raise LinkError(f"the {self.peer} closed the link") from exc
        return buf, buf.numel()

    def close(self):
        # Closing both queues wakes the peer if it is waiting on either.
        if not self.closed:
            self._outbox.close()
            self._inbox.close()
        super().close()


def local_links(
    *,
    slots: int = 8,
    slot_bytes: int = 64 << 20,
    down_slots: int | None = None,
    down_slot_bytes: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    compression: str | None = None,
    client_id: int = 0,
) -> tuple[Link, Link]:
    """(client_end, server_end) of an in-process link: an up queue of `slots` slots of `slot_bytes`
    bytes and a down queue (by default the same sizes), allocated here once. A frame larger than a
    slot is an error naming both sizes.

    A streaming client sends a whole step before it reads any answer, so the down queue must hold
    a step's answers (one per upload) or the server blocks on it while the client blocks on a full
    up queue; the trainer sizes it so."""
    up = FrameQueue(slots, slot_bytes)
    down = FrameQueue(down_slots or slots, down_slot_bytes or slot_bytes)
    client = _LocalLink("client", up, down, timeout, compression, client_id)
    server = _LocalLink("server", down, up, timeout, compression, client_id)
    return client, server


class _DistLink(Link):
    """One end of a two-process link over torch.distributed: an int64 length, then the frame.

    Sends are asynchronous: a send returns once it is posted, and its buffers are kept until it
    completes. Blocking sends would deadlock a streaming exchange (gloo completes a send only when
    the peer posts the matching receive, and both sides send before they receive). Backpressure:
    before posting, the oldest sends are waited for while more than MAX_IN_FLIGHT are outstanding
    or while they and the new frame would hold more than MAX_IN_FLIGHT_BYTES (at least the new one
    is always posted). gloo reports a send complete only once it has been waited for, so the byte
    bound is what frees the frames of finished sends: without it they would pile up, step after step.
    A client keeps at most a few activations in flight, which is all the overlap needs: its next
    forward runs while the server works on the last upload.
    """

    _LENGTH_BYTES = 8
    MAX_IN_FLIGHT = 256
    MAX_IN_FLIGHT_BYTES = 8 << 20

    def __init__(self, role, timeout, compression, client_id, owns_group, peer_rank: int | None = None):
        super().__init__(role, timeout, compression, client_id)
        import torch.distributed as dist

        self._dist = dist
        self._group = None  # the default group: the server (rank 0) and its clients
        self._owns_group = owns_group  # a _GroupOwner (the group ends with its last link), or a bool
        self._peer_rank = 1 - ROLES.index(role) if peer_rank is None else peer_rank
        self._length = torch.zeros(1, dtype=torch.int64)
        self._scratch = torch.empty(0, dtype=torch.uint8)  # grows to the largest frame received
        self._in_flight: collections.deque = collections.deque()  # (work, buffer kept alive)
        self._held = 0  # bytes of the buffers in _in_flight

    def _wait(self, work, what: str) -> None:
        """Wait for `work`; a callable is posted first, inside the same guard, since gloo raises at
        posting time when the peer's connection is already closed."""
        try:
            if callable(work):
                work = work()
            work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise self._error(exc, what) from exc

    def _error(self, exc: RuntimeError, what: str) -> LinkError:
        text = str(exc)
        if "timed out" in text.lower():  # gloo: "Timed out waiting 300000ms for recv operation"
            return LinkTimeout(
                f"the {self.role} waited {self.timeout:g} s to {what} the {self.peer} (rank {self._peer_rank}) "
                "and got no answer"
            )
        return LinkError(
            f"the {self.role} lost the {self.peer} (rank {self._peer_rank}) while trying to {what} it; "
            f"check the {self.peer}'s log. ({text.splitlines()[0][:200] if text else type(exc).__name__})"
        )

    def _reap(self, keep: int, incoming: int = 0) -> None:
        """Forget completed sends; wait for the oldest while more than `keep` are outstanding or while
        they would hold more than MAX_IN_FLIGHT_BYTES with `incoming` more bytes."""
        while self._in_flight and (
            self._in_flight[0][0].is_completed()
            or len(self._in_flight) > keep
            or self._held + incoming > self.MAX_IN_FLIGHT_BYTES
        ):
            work, tensor = self._in_flight.popleft()
            self._held -= tensor.nbytes
            self._wait(work, "send to")

    def _post(self, tensors) -> int:
        """Post the sends of one message (its tensors in order); the bytes they hold."""
        self._reap(self.MAX_IN_FLIGHT - len(tensors), sum(t.numel() * t.element_size() for t in tensors))
        for tensor in tensors:
            try:
                work = self._dist.isend(tensor, dst=self._peer_rank, group=self._group)
            except RuntimeError as exc:  # the peer's connection is already closed
                raise self._error(exc, "send to") from exc
            self._in_flight.append((work, tensor))
            self._held += tensor.nbytes
        return sum(t.nbytes for t in tensors)

    def _send_bytes(self, buf):
        length = torch.tensor([buf.numel()], dtype=torch.int64)
        tensors = [length, buf] if buf.numel() else [length]
        if self._mac is not None:
            tensors.append(torch.frombuffer(bytearray(self._mac.tag(buf.numpy())), dtype=torch.uint8))
        return self._post(tensors)

    @property
    def held_bytes(self) -> int:
        """Bytes of frames kept alive by sends not yet known to be finished."""
        return self._held

    def _recv_raw(self, limit: int) -> torch.Tensor:
        """One length-prefixed message of at most `limit` bytes (FrameError before allocating a longer one)."""
        self._reap(self.MAX_IN_FLIGHT)
        self._wait(lambda: self._dist.irecv(self._length, src=self._peer_rank, group=self._group), "receive from")
        n = int(self._length[0])
        if not 0 <= n <= limit:  # before anything is allocated for it
            raise FrameError(f"oversized: a length prefix of {n} bytes, the limit is {limit}")
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.uint8)
        buf = self._scratch[:n]
        if n:
            self._wait(lambda: self._dist.irecv(buf, src=self._peer_rank, group=self._group), "receive from")
        return buf

    def _recv_bytes(self):
        buf = self._recv_raw(self.max_frame_bytes)
        wire = self._LENGTH_BYTES + buf.numel()
        tag = b""
        if self._mac is not None:
            received = torch.empty(auth.TAG_BYTES, dtype=torch.uint8)
            self._wait(lambda: self._dist.irecv(received, src=self._peer_rank, group=self._group), "receive from")
            tag = received.numpy().tobytes()
            wire += auth.TAG_BYTES
        self._check_tag(buf.numpy(), tag)
        return buf, wire

    def _send_message(self, data: bytes) -> None:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.bytes_sent += self._post([torch.tensor([len(data)], dtype=torch.int64), payload])

    def _recv_message(self, limit: int) -> bytes:
        data = bytes(self._recv_raw(limit).numpy())
        self.bytes_received += self._LENGTH_BYTES + len(data)
        return data

    def _flush(self) -> None:
        self._reap(0)

    def close(self):
        if not self.closed:
            try:
                if not self.broken:
                    self._reap(0)  # deliver what was sent before leaving
            finally:
                if isinstance(self._owns_group, _GroupOwner):
                    self._owns_group.release()
                elif self._owns_group and self._dist.is_initialized():
                    self._dist.destroy_process_group()
        super().close()


class _GroupOwner:
    """The process group of a server's many links: destroyed when the last of them closes."""

    def __init__(self, links: int, owns: bool):
        self.left, self.owns = links, owns

    def release(self) -> None:
        import torch.distributed as dist

        self.left -= 1
        if self.left == 0 and self.owns and dist.is_initialized():
            dist.destroy_process_group()


def dist_link(
    role: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    compression: str | None = None,
    client_id: int = 0,
    backend: str | None = None,
    secret: bytes | None = None,
) -> Link:
    """This process's end of a two-process link over torch.distributed.

    Joins (or reuses) the default process group from the torchrun environment: WORLD_SIZE must be
    2; rank 0 is the server and rank 1 the client (`role`, if given, must agree with the rank).
    backend defaults to gloo; pass "nccl" only when both ends hold CUDA tensors (frames are CPU
    bytes, so gloo is what hosl uses on GPU machines too). Every wait is bounded by `timeout`.
    secret: a shared secret (hosl.auth.read_secret): the link opens with the handshake of
    hosl.auth, and every frame carries a MAC checked before it is decoded. Both sides need it.
    """
    rank, owns = _join(timeout, backend, clients=1)
    if role is not None and role != ROLES[rank]:
        raise LinkError(f"rank {rank} is the {ROLES[rank]}, but this process was asked to be the {role}")
    link = _DistLink(ROLES[rank], timeout, compression, client_id, owns_group=owns)
    _authenticate([link], secret)
    return link


def dist_links(
    clients: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    compression: str | None = None,
    backend: str | None = None,
    secret: bytes | None = None,
) -> tuple[str, list[Link]]:
    """This process's links in a run of one server and `clients` clients over torch.distributed
    (WORLD_SIZE clients + 1): (role, links). Rank 0, the server, gets one link per client (client
    i is rank i + 1, and its link's client_id is i); a client gets its one link to rank 0. The
    group ends when the server's last link closes. As dist_link otherwise."""
    rank, owns = _join(timeout, backend, clients)
    if rank == 0:
        owner = _GroupOwner(clients, owns)
        links = [
            _DistLink("server", timeout, compression, i, owns_group=owner, peer_rank=i + 1) for i in range(clients)
        ]
    else:
        links = [_DistLink("client", timeout, compression, rank - 1, owns_group=owns, peer_rank=0)]
    _authenticate(links, secret)
    return ROLES[min(rank, 1)], links


def _authenticate(links, secret) -> None:
    if secret is None:
        return
    for link in links:
        try:
            link.authenticate(secret)
        except LinkError:
            for other in links:
                other.broken = True
                other.close()
            raise


def _join(timeout: float, backend: str | None, clients: int) -> tuple[int, bool]:
    """(this process's rank, whether it created the default group), joining it from the torchrun
    environment unless it exists; WORLD_SIZE must be clients + 1."""
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in os.environ]
        if missing:
            raise LinkError(
                "the dist transport needs a torch.distributed environment (missing "
                + ", ".join(missing)
                + f"): start it with `torchrun --nproc-per-node {clients + 1} ...`"
            )
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            dist.init_process_group(backend or "gloo", timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:  # the peer never came, the address is wrong, the port is taken
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise LinkError(f"could not join the other process at {where} within {timeout:g} s ({first})") from exc
        owns = True
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != clients + 1:
        what = "server and client" if clients == 1 else f"the server and {clients} clients"
        raise LinkError(
            f"the dist transport joins exactly {clients + 1} processes ({what}); WORLD_SIZE is {world}"
            + (f": start it with `torchrun --nproc-per-node {clients + 1} ...`" if clients > 1 else "")
        )
    return rank, owns
