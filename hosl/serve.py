"""`python -m hosl.serve --listen HOST:PORT --tls-cert FILE --tls-key FILE --out DIR [flags of hosl.train]`:
the server side of a --transport grpc run, which a client dials (`python -m hosl.train --transport
grpc --server HOST:PORT --tls-ca FILE ...`). Both take the run's model, split and training flags;
HELLO checks that they plan the same step.

One client (the default): the server holds its side of the model for the whole process and serves
one session at a time. A session that ends with the run (the client's stop) ends the process, exit
status 0. One that breaks (the client died, its link dropped, it failed authentication or sent a bad
frame) is logged in one line and the server waits for the next: a client restarted with --resume
reconnects, and the server loads its side of the same checkpoint from --out. A second client while
one is connected is refused.

--clients N (hosl.federation): each client process gives its --client-id; the rounds start once
--min-clients are connected, clients join late, leave, dial again after a dropped link or start
afresh, and each catches up from the server's log of rounds. The process ends, exit status 0, when
the last round is over and every client that joined has stopped (or stayed away for --timeout).
With --save-every S it keeps checkpoints in --out (its weights, optimiser and log of rounds), and
`--resume DIR` continues from the newest; clients started again catch up from the restored log.

Security: TLS unless --insecure (plain text, with a warning). Clients prove themselves with the
shared secret (--auth-token-file or $HOSL_AUTH_TOKEN) or with a certificate from --tls-client-ca
(mutual TLS); a server with neither is refused unless --insecure.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from pathlib import Path

__all__ = ["main", "serve_run"]

logger = logging.getLogger(__name__)


def serve_run(cfg, ready=None) -> int:
    """Serve the run of cfg until a session ends it; ready(port) is called once listening."""
    import torch

    from hosl.config import UsageError
    from hosl.grpc_link import TLS
    from hosl.roles import SplitServer, frame_bytes_limit
    from hosl.session import device_for, one_side, secret_for
    from hosl.tasks import load_run_data

    if not cfg.listen:
        raise UsageError("hosl.serve needs --listen HOST:PORT")
    if cfg.resume and cfg.clients == 1:
        raise UsageError("hosl.serve --resume is for --clients > 1: one client's server resumes when its client does")
    if not (cfg.out or cfg.resume):
        raise UsageError("hosl.serve needs --out DIR: the server's files (checkpoints, final weights) go there")
    secret = secret_for(cfg, needed=cfg.tls_client_ca is None)
    if cfg.insecure:
        print("warning: --insecure: plain text, no TLS: what crosses is readable by anyone on the path"
              + ("" if secret or cfg.tls_client_ca else ", and any client that reaches the port may join"),
              file=sys.stderr)  # fmt: skip
    tls = None if cfg.insecure else TLS(cert=cfg.tls_cert, key=cfg.tls_key, client_ca=cfg.tls_client_ca)
    if tls is not None:
        tls.server_credentials()  # unreadable or missing files: said before the model is built
    device = device_for(cfg)
    examples = load_run_data(cfg)[0] if cfg.model.startswith("builtin:") else []  # a built-in vocabulary
    out = Path(cfg.resume or cfg.out)
    if cfg.clients > 1 and not cfg.resume and any(out.glob("checkpoint-*")):
        raise UsageError(f"--out {out} holds checkpoints of a run: --resume {out} to continue it, or choose another")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.clients > 1:
        return _serve_rounds(cfg, tls, secret, one_side(cfg, "server", examples, device)[0], out, ready)
    busy, done = threading.Lock(), threading.Event()
    model = {"side": one_side(cfg, "server", examples, device)[0], "fresh": True}

    def session(link):
        if not busy.acquire(blocking=False):
            link.fail("the server is serving another client: one client at a time over grpc")
            return
        try:
            if secret is not None:
                link.authenticate(secret)
            if not model["fresh"]:  # a broken session moved the weights: start from the initial ones
                model["side"] = one_side(cfg, "server", examples, device)[0]
            model["fresh"] = False
            torch.manual_seed(cfg.seed)
            server = SplitServer(cfg, model["side"], link, out)
            server.serve()  # returns at the client's stop; raises when the session breaks
            done.set()
        except Exception as exc:
            print(f"session ended: {type(exc).__name__}: {exc}; waiting for the next client", file=sys.stderr)
            link.fail(str(exc))
        finally:
            busy.release()

    limit = frame_bytes_limit(cfg, model["side"].hidden_size)  # the largest frame this run sends
    _listen(cfg, tls, session, limit, 16, "", ready, done.wait)
    print("hosl.serve: the run is over", file=sys.stderr)
    return 0


def _listen(cfg, tls, session, limit: int, sessions: int, what: str, ready, until) -> None:
    """Serve sessions on --listen (each to session(link) on its own thread) until until() returns;
    the port is printed, and given to ready(port), once listening."""
    from hosl.grpc_link import serve

    server = serve(session, cfg.listen, tls, cfg.timeout, cfg.compression, sessions, limit)
    print(f"hosl.serve: listening on port {server.port} ({'plain text' if tls is None else 'TLS'}){what}", flush=True)
    if ready is not None:
        ready(server.port)
    try:
        until()
    finally:
        server.stop(grace=5)


def _serve_rounds(cfg, tls, secret, side, out: Path, ready) -> int:
    """--clients N: the rounds of hosl.federation, with clients joining and leaving while it runs."""
    import torch

    from hosl.federation import Federation
    from hosl.roles import SplitServer, frame_bytes_limit
    from hosl.transport import LinkError

    torch.manual_seed(cfg.seed)
    federation = Federation(cfg, SplitServer(cfg, side, None, out))
    if cfg.resume:
        at = federation.resume()
        print(f"hosl.serve: resuming the run in {out} at round {at} (run {federation.run_id})", file=sys.stderr)
    else:
        (out / "config.json").write_text(dataclasses.replace(cfg, resume=None).to_json() + "\n")

    def session(link):
        try:
            if secret is not None:
                link.authenticate(secret)
            federation.session(link)
        except LinkError as exc:
            print(f"a session was refused: {exc}", file=sys.stderr)
            link.fail(str(exc))

    limit = frame_bytes_limit(cfg, side.hidden_size)
    _listen(cfg, tls, session, limit, cfg.clients + 4, f", {cfg.clients} clients", ready, federation.serve)
    left = f", {len(federation.left)} departures" if federation.left else ""
    print(f"hosl.serve: the run is over ({len(federation.joins)} joins{left})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from hosl.config import UsageError, parse_config
    from hosl.models import ModelError
    from hosl.split import SplitError
    from hosl.transport import LinkError

    logging.basicConfig(
        level=os.environ.get("HOSL_LOG", "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("hosl.federation").setLevel(logging.INFO)  # who joins and leaves, as it happens
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        own = "--listen, --tls-cert, --tls-key and --tls-client-ca are its own"
        print(f"{__doc__.strip()}\n\nThe flags, shared with hosl.train ({own}):\n", flush=True)
    if "--transport" not in argv and not any(a.startswith("--transport=") for a in argv):
        argv = ["--transport", "grpc", *argv]
    try:
        cfg = parse_config(argv)
        if cfg.transport != "grpc":
            raise UsageError("hosl.serve serves --transport grpc")
        return serve_run(cfg)
    except (UsageError, ValueError, ModelError, SplitError, LinkError) as exc:
        if os.environ.get("HOSL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, LinkError) else 2  # 1: the run's clients are gone, as hosl.train's lost peer
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
