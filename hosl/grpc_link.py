"""The `grpc` transport: a client dials a server over gRPC (HTTP/2), TLS by default.

One session is one bidirectional stream of the method /hosl.Link/Session; each gRPC message is one
hosl frame as hosl.boundary encodes it (its CRC included), followed, after the token handshake of
hosl.auth, by the frame's 32-byte MAC. No protobuf: the messages are the frames' own bytes.

    server = serve(handler, "0.0.0.0:7860", tls=TLS(cert=..., key=...))  # handler(link) per session
    link = dial("host:7860", tls=TLS(ca=...), timeout=300)               # the client's Link

Transport security is gRPC's: with `TLS(ca=...)` the client checks the server's certificate (the
name it dials must be in it); a server given `client_ca` also requires each client's certificate
(mutual TLS). `tls=None` is plain text, which the trainer allows only with --insecure. The shared
secret's challenge-response and the per-frame MAC run inside the stream as over dist, so a run with a
token is authenticated whatever the channel.

Every wait is bounded by the link's timeout: a reader thread moves the stream's messages into a
queue, and `recv` waits on the queue. A message longer than max_frame_bytes (plus its MAC) is
refused by gRPC itself before it is read into memory (the channel's max receive length).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from hosl import auth
from hosl.boundary import MAX_FRAME_BYTES, FrameError
from hosl.transport import Link, LinkError, LinkSetupError, LinkTimeout

__all__ = ["TLS", "GrpcLink", "dial", "serve"]

logger = logging.getLogger(__name__)

METHOD = "/hosl.Link/Session"
_END = object()  # the stream ended (the peer closed it)
_GONE = object()  # the server's side of a stream was ended by gRPC: the client left, or broke a limit
# A frame and its MAC; gRPC's lengths are 32-bit, so a frame over 2 GiB cannot cross (hosl's frames
# are an activation, a few hundred MiB at most).
_MESSAGE_LIMIT = min(MAX_FRAME_BYTES + auth.TAG_BYTES, 2**31 - 1)


def _grpc():
    # gRPC's core logs each failed TLS handshake on stderr; the one line a user gets is hosl's.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        import grpc
    except ImportError:
        raise LinkSetupError("--transport grpc needs grpcio: pip install 'hosl[grpc]'") from None
    return grpc


@dataclasses.dataclass(frozen=True)
class TLS:
    """Files of a TLS setup (PEM). A server: cert and key, and client_ca to require client
    certificates. A client: ca (the server's issuer; None: the system's roots), and cert and key
    when the server requires a client certificate."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_ca: str | None = None

    @staticmethod
    def _read(path: str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise LinkSetupError(f"cannot read {what} {path}: {exc.strerror or exc}") from None

    def server_credentials(self):
        grpc = _grpc()
        if not (self.cert and self.key):
            raise LinkSetupError("a TLS server needs --tls-cert and --tls-key (or --insecure for plain text)")
        pair = [(self._read(self.key, "--tls-key"), self._read(self.cert, "--tls-cert"))]
        client_ca = self._read(self.client_ca, "--tls-client-ca")
        return grpc.ssl_server_credentials(
            pair, root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def channel_credentials(self):
        grpc = _grpc()
        if bool(self.cert) != bool(self.key):
            raise LinkSetupError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca, "--tls-ca"),
            private_key=self._read(self.key, "--tls-key"),
            certificate_chain=self._read(self.cert, "--tls-cert"),
        )


def _options(timeout: float, max_message: int = _MESSAGE_LIMIT) -> list[tuple[str, int]]:
    keepalive_ms = int(max(10.0, min(timeout / 3, 60.0)) * 1000)  # a dead peer is noticed within the timeout
    return [
        ("grpc.max_receive_message_length", min(max_message, _MESSAGE_LIMIT)),
        ("grpc.max_send_message_length", _MESSAGE_LIMIT),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class GrpcLink(Link):
    """One end of a session: frames out through `outbox` (which the stream's writer drains), frames
    in from a reader thread through `inbox`."""

    def __init__(self, role: str, timeout: float, compression: str | None, client_id: int = 0):
        super().__init__(role, timeout, compression, client_id)
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.drained = threading.Event()  # the writer has sent everything queued before close
        self._on_close: Callable[[], None] | None = None

    def _read(self, messages) -> None:
        """The reader thread: every message of the stream into inbox, then _END or the error."""
        try:
            for message in messages:
                self.inbox.put(message)
            self.inbox.put(_END)
        except Exception as exc:  # grpc.RpcError and what a cancelled stream raises
            self.inbox.put(exc)

    def _next(self, what: str) -> bytes:
        try:
            item = self.inbox.get(timeout=self.timeout)
        except queue.Empty:
            raise LinkTimeout(
                f"the {self.role} waited {self.timeout:.0f} s to {what} the {self.peer} (--timeout); "
                "is it still running?"
            ) from None
        if item is _END:
            raise LinkError(f"the {self.peer} closed the connection")
        if item is _GONE:
            raise LinkError(
                f"the {self.peer}'s stream ended: it went away, or sent a message over this run's frame limit "
                f"({self.max_frame_bytes} bytes)"
            )
        if isinstance(item, Exception):
            raise LinkError(f"the connection to the {self.peer} failed: {_rpc_text(item)}")
        return item

    def _send_bytes(self, buf: torch.Tensor) -> int:
        frame = buf.numpy()
        # One copy into the message gRPC sends (the frame, then its MAC).
        data = b"".join((frame, self._mac.tag(frame))) if self._mac is not None else frame.tobytes()
        self.outbox.put(data)
        return len(data)

    def _recv_bytes(self) -> tuple[torch.Tensor, int]:
        message = memoryview(self._next("receive from"))
        wire = len(message)
        cut = wire - auth.TAG_BYTES if self._mac else wire
        data, tag = message[: max(cut, 0)], bytes(message[max(cut, 0) :])
        if len(data) > self.max_frame_bytes:
            raise FrameError(f"oversized: a frame of {len(data)} bytes, the limit is {self.max_frame_bytes}")
        # One copy, into memory the decoder may own and write.
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        self._check_tag(buf.numpy(), tag)
        return buf, wire

    def _send_message(self, data: bytes) -> None:
        self.outbox.put(bytes(data))
        self.bytes_sent += len(data)

    def _recv_message(self, limit: int) -> bytes:
        message = self._next("receive from")
        if len(message) > limit:
            raise FrameError(f"oversized: a handshake message of {len(message)} bytes")
        self.bytes_received += len(message)
        return message

    def close(self) -> None:
        if not self.closed:
            self.outbox.put(_END)  # the writer ends the stream after what was queued
            if self._on_close is not None:
                self._on_close()
        super().close()


def _rpc_text(exc: Exception) -> str:
    """A gRPC error as one line: its status and details."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        text = f"{code().name}: {details() or ''}".strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _outgoing(link: GrpcLink):
    """The messages the link queues, until it closes."""
    try:
        while True:
            item = link.outbox.get()
            if item is _END:
                return
            yield item
    finally:
        link.drained.set()


def dial(target: str, tls: TLS | None, timeout: float, compression: str | None = None, client_id: int = 0) -> GrpcLink:
    """The client's end of a new session with the server at target (HOST:PORT). tls=None: plain
    text. LinkError in one line when the server cannot be reached within the timeout."""
    grpc = _grpc()
    options = _options(timeout)
    if tls is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, tls.channel_credentials(), options=options)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        channel.close()
        how = "over TLS (is --tls-ca the server's issuer, and the name dialled in its certificate?)" if tls else ""
        raise LinkError(f"could not reach the server at {target} {how}within {timeout:.0f} s (--timeout)") from None
    link = GrpcLink("client", timeout, compression, client_id)
    call = channel.stream_stream(METHOD)(_outgoing(link), wait_for_ready=True)
    reader = threading.Thread(target=link._read, args=(call,), name="hosl-grpc-reader", daemon=True)
    reader.start()

    def close():
        # What was queued goes out before the channel closes (the run's last frames: final, stop);
        # then the server ends the stream, or the wait runs out. A broken link is just dropped.
        if not link.broken:
            link.drained.wait(min(link.timeout, 30.0))
            reader.join(min(link.timeout, 30.0))
        channel.close()
        reader.join(5.0)  # the closed channel ends the stream: no thread is left inside gRPC at exit

    link._on_close = close
    return link


class Server:
    """A gRPC server whose every session is handed, as a server-side GrpcLink, to handler(link) on
    the session's own thread; the session ends when the handler returns (its link closed)."""

    def __init__(self, grpc_server, port: int, threads: list[threading.Thread], lock: threading.Lock):
        self._server, self.port, self._threads, self._lock = grpc_server, port, threads, lock

    def stop(self, grace: float | None = None) -> None:
        """Stop serving, and return once the server and its sessions' threads have ended: calls
        still open after grace seconds are cancelled. A thread left inside gRPC's or torch's C++
        code when the interpreter exits is ended there by force, and the process aborts."""
        self._server.stop(grace).wait()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5.0 if grace is None else grace + 5.0)

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(
    handler: Callable[[GrpcLink], None],
    listen: str,
    tls: TLS | None,
    timeout: float,
    compression: str | None = None,
    max_sessions: int = 16,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> Server:
    """Start serving sessions on listen (HOST:PORT; port 0 picks a free one, see .port). A message
    longer than max_frame_bytes and its MAC is refused by gRPC before it is read into memory, and
    ends that session only."""
    grpc = _grpc()
    from concurrent import futures

    threads: list[threading.Thread] = []  # each session's reader and worker, joined by Server.stop
    threads_lock = threading.Lock()

    def session(messages, context):
        link = GrpcLink("server", timeout, compression)
        link.max_frame_bytes = max_frame_bytes
        reader = threading.Thread(target=link._read, args=(messages,), name="hosl-grpc-reader", daemon=True)
        worker = threading.Thread(target=_run, args=(handler, link), name="hosl-grpc-session", daemon=True)
        with threads_lock:
            threads[:] = [t for t in threads if t.is_alive()] + [reader, worker]
        reader.start()
        worker.start()
        context.add_callback(lambda: link.inbox.put(_GONE))  # the stream ended: the handler hears it
        yield from _outgoing(link)

    options = _options(timeout, max_frame_bytes + auth.TAG_BYTES)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_sessions), options=options)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "hosl.Link", {"Session": grpc.stream_stream_rpc_method_handler(session)}
            )
        ]
    )
    try:
        port = server.add_secure_port(listen, tls.server_credentials()) if tls else server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise LinkSetupError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise LinkSetupError(f"cannot listen on {listen} (in use, or not an address of this machine?)")
    server.start()
    return Server(server, port, threads, threads_lock)


def _run(handler, link: GrpcLink) -> None:
    try:
        handler(link)
    except Exception:  # the handler's own failure is its to report; the session just ends
        logger.debug("a session's handler failed", exc_info=True)
    finally:
        link.close()
