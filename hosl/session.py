"""A client and a server wired together in one process: the local link sized by the step plan, the
server answering on its own thread, and a failure on either side raised as itself. The trainer
(--transport local) and benchmarks/bench_step.py run their split sessions through it.

    with local_session(cfg, client_model, server_model, run_dir) as client:
        client.hello()
        ...                      # client.train_step, client.scores, client.control
        client.stop()
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from hosl.config import TrainConfig
from hosl.plan import StepPlan
from hosl.roles import SplitClient, SplitServer, frame_bytes_limit
from hosl.split import ClientModel, ServerModel
from hosl.transport import LinkError, Network, PeerError, local_links


def local_links_for(cfg: TrainConfig, hidden_size: int, client_id: int = 0):
    """The two ends of a local link for cfg's sessions: up slots hold the largest frame the session
    sends, and the down ring holds a whole step's answers (and a round's ROUND frame, with every
    sampled client's rows), so the server never blocks on them."""
    plan = StepPlan.of(cfg)
    act_bytes = frame_bytes_limit(cfg, hidden_size)
    round_bytes = cfg.clients_per_round * (cfg.batch_size * cfg.max_length + cfg.q + 64) * 8 + (1 << 12)
    ends = local_links(
        slots=8,
        slot_bytes=act_bytes,
        down_slots=len(plan.uploads) + 3,
        down_slot_bytes=max(act_bytes if plan.answers_with_grad else 1 << 16, round_bytes),
        timeout=cfg.timeout,
        compression=cfg.compression,
        client_id=client_id,
    )
    if cfg.link_rtt_ms or cfg.link_mbit:
        network = Network(cfg.link_rtt_ms, cfg.link_mbit)
        for end in ends:
            end.network = network
    return ends


@contextlib.contextmanager
def local_session(
    cfg: TrainConfig, client_model: ClientModel, server_model: ServerModel, run_dir: Path | None = None
) -> Iterator[SplitClient]:
    """Yields the client; the server serves on a thread until the client's CONTROL stop. On leaving,
    the server's thread has ended, and an exception of the server's is raised in place of the
    link's report of it (the server sends its ERROR frame before its thread records why)."""
    client_link, server_link = local_links_for(cfg, client_model.stack.config.hidden_size)
    server = SplitServer(cfg, server_model, server_link, run_dir)
    failure: list[BaseException] = []

    def serve():
        try:
            server.serve()
        except BaseException as exc:  # reported to the client through the link, and re-raised below
            failure.append(exc)

    thread = threading.Thread(target=serve, name="hosl-server", daemon=True)
    client = SplitClient(cfg, client_model, client_link)  # before the server starts: its checks fail alone
    thread.start()
    try:
        with client_link:
            yield client
    except LinkError as exc:
        if isinstance(exc, PeerError):  # the server is ending: wait for its thread to record why
            thread.join(timeout=cfg.timeout)
        if failure:
            raise failure[0] from None
        raise
    thread.join(timeout=cfg.timeout)
    if failure:
        raise failure[0]
