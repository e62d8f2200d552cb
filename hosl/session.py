"""How a run is wired: which sides this process holds, over which link, with one client or many.
`open_session(cfg)` does it for every transport (local, dist, grpc) and yields what the training
loop (hosl.train) drives: a Session, or None in a process that only serves or follows.

    with open_session(cfg) as session:      # the run directory made, the sides built, HELLO said
        if session is not None:
            result = train(cfg, session.trainer, ...)
            session.end(result)             # held-out evaluation, final weights of both sides, stop
    summary = session.finish(result)        # summary.json and manifest.json, once the sides are down

`local_session` and `local_links_for` wire one client and a server in one process (the trainer and
benchmarks/bench_step.py use them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from hosl import checkpoint, scoring
from hosl.auth import ENV as AUTH_ENV
from hosl.auth import AuthError, read_secret
from hosl.config import TrainConfig, UsageError
from hosl.models import build, build_tokenizer, check_hub_reachable, check_model_name, num_blocks
from hosl.plan import StepPlan, method_of
from hosl.roles import FullModel, SplitClient, SplitServer, frame_bytes_limit, use_threads
from hosl.split import ClientModel, ServerModel, split_model, split_summary, train_last_blocks
from hosl.tasks import Batches, load_run_data
from hosl.transport import LinkError, Network, PeerError, dist_link, dist_links, local_links


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


# -- open_session: every transport, one client or many -------------------------------------------------


@dataclasses.dataclass
class Session:
    """What this process trains: the trainer (FullModel, SplitClient, or a many-client RoundClient)
    with its data, run directory and checkpoint to resume from, and what the run's end adds."""

    cfg: TrainConfig
    run_dir: Path
    point: checkpoint.ResumePoint | None
    trainer: object
    tokenizer: object
    train_examples: list
    eval_examples: list
    device: torch.device
    params: dict  # the sides' parameter counts, for the summary
    batches: Callable[[int], dict] | None = None  # the batch of each step (default: Batches)
    after: Callable[[object, dict], None] | None = None  # more evaluation before the final weights
    extra: Callable[[], dict] | None = None  # the summary's additions, once the session is closed
    server_files: dict | None = None

    @property
    def link(self):
        return getattr(self.trainer, "link", None)

    def end(self, result: dict) -> None:
        """After the last step: the after-work, this side's final weights, the server's (their
        digests kept for the manifest), and the stop that ends the server's session."""
        if self.after is not None:
            self.after(self.trainer, result)
        checkpoint.save_final(self.run_dir, self.trainer)
        if self.trainer.split_client:
            reply = self.trainer.control("final")
            self.trainer.stop()
            if "server_stats" in reply:  # many clients: the server's time on each
                result["server_stats"] = reply["server_stats"]
            self.server_files = reply["files"]

    def finish(self, result: dict) -> dict:
        """summary.json and manifest.json; returns the summary."""
        summary = _summary(self.cfg, result, self.params, self.device)
        return _finish(self.run_dir, {**summary, **(self.extra() if self.extra else {})}, self.server_files)


@contextlib.contextmanager
def open_session(cfg: TrainConfig) -> Iterator[Session | None]:
    """This process's part of the run cfg describes, wired; see the module docstring. A new run that
    fails before its first step leaves no run directory behind."""
    device = device_for(cfg)
    if cfg.transport == "dist":
        with _dist(cfg, device) as session:
            yield session
    elif cfg.transport == "grpc":
        with _grpc(cfg, device) as session:
            yield session
    else:
        cfg, run_dir, point = start_run_dir(cfg)
        with _unless_started(run_dir, point), _local(cfg, run_dir, point, device) as session:
            yield session


@contextlib.contextmanager
def _local(cfg: TrainConfig, run_dir: Path, point, device) -> Iterator[Session]:
    """One process: the unsplit model, or a split with the server (and any other clients) on threads."""
    train_examples, eval_examples = load_run_data(cfg)
    tokenizer, model = build(cfg, train_examples)
    model.to(device)
    torch.manual_seed(cfg.seed)
    data = dict(tokenizer=tokenizer, train_examples=train_examples, eval_examples=eval_examples, device=device)
    if not method_of(cfg.method).split:
        use_threads(cfg.threads)
        params = {"params": sum(p.numel() for p in model.parameters())}
        yield Session(cfg, run_dir, point, FullModel(cfg, model, cfg.split_layer), params=params, **data)
        return
    client_model, server_model = split_model(model, cfg.split_layer)
    train_last_blocks(client_model, cfg.client_train_blocks)  # before the summary counts what trains
    params = _side_params(split_summary(client_model, server_model))
    del model
    if not _rounds(cfg):
        with local_session(cfg, client_model, server_model, run_dir) as client:
            client.hello()
            yield Session(cfg, run_dir, point, client, params=params, **data)
        return
    from hosl import clients as many

    shards, held, streams = _client_data(cfg, train_examples, tokenizer)
    with many.local_rounds(cfg, client_model, server_model, streams, run_dir) as clients:
        lead = clients[0]

        def extra():  # every client's weights against the lead's, once every thread has ended
            gone = {c for c, _, _ in lead.left}
            identical = all(torch.equal(c.zo.flat.flat, lead.zo.flat.flat) for c in clients if c.id not in gone)
            if not identical:
                raise RuntimeError("the clients' weights differ after the run (a bug: please report it)")
            return {**_rounds_summary(cfg, shards, lead, clients), "clients_identical": identical}

        lead.hello()
        yield Session(cfg, run_dir, point, lead, params=params, batches=_round_batches(streams, lead.schedule),
                      after=_held_out_accuracy(cfg, held, train_examples, tokenizer), extra=extra,
                      **data)  # fmt: skip


def _dist(cfg: TrainConfig, device):
    """--transport dist (torchrun: rank 0 the server, rank 1 the client, or the lead client and ranks
    2..N the others with --clients N)."""
    if cfg.resume and not all(v in os.environ for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
        raise UsageError(
            f"--resume {cfg.resume}: the run used --transport dist; resume it under torchrun as it was started "
            "(or add --transport local to continue it in one process)"
        )
    secret = secret_for(cfg, needed=True)
    if secret is None:
        print(
            f"warning: --insecure: no --auth-token-file or ${AUTH_ENV}, so the peers of this run are not "
            "authenticated, and anyone who reaches its port can join it (see docs/safety.md)",
            file=sys.stderr,
        )
    if _rounds(cfg):
        return _dist_rounds(cfg, secret, device)
    return _dist_one(cfg, secret, device)


@contextlib.contextmanager
def _dist_one(cfg: TrainConfig, secret, device) -> Iterator[Session | None]:
    link = dist_link(timeout=cfg.timeout, compression=cfg.compression, secret=secret)
    if link.role == "server":
        try:
            examples = load_run_data(cfg)[0] if cfg.model.startswith("builtin:") else []  # a builtin vocabulary
            side, _ = one_side(cfg, "server", examples, device)
            torch.manual_seed(cfg.seed)
            server = SplitServer(cfg, side, link, Path(cfg.resume or cfg.out or "."))
        except Exception as exc:
            link.fail(f"{type(exc).__name__}: {exc}")  # the client hears why instead of timing out
            raise
        server.serve()
        yield None
        return
    with link:
        cfg, run_dir, point = start_run_dir(cfg)
        with _unless_started(run_dir, point):
            yield _remote_client(cfg, link, run_dir, point, device)


@contextlib.contextmanager
def _dist_rounds(cfg: TrainConfig, secret, device) -> Iterator[Session | None]:
    from hosl import clients as many

    role, links = dist_links(cfg.clients, timeout=cfg.timeout, compression=cfg.compression, secret=secret)
    schedule = many.Schedule(cfg.seed, cfg.clients, cfg.clients_per_round)
    if role == "server":
        try:
            examples = load_run_data(cfg)[0] if cfg.model.startswith("builtin:") else []
            side, _ = one_side(cfg, "server", examples, device)
            torch.manual_seed(cfg.seed)
            server = SplitServer(cfg, side, links[0], Path(cfg.out))
            rounds = many.RoundServer(cfg, server, links, schedule)
        except Exception as exc:
            for link in links:
                link.fail(f"{type(exc).__name__}: {exc}")
            raise
        rounds.serve()
        yield None
        return
    (link,) = links
    with link:
        if link.client_id == 0:  # the lead writes the run directory
            cfg, run_dir, point = start_run_dir(cfg)
            with _unless_started(run_dir, point), _round_client(cfg, link, run_dir, device, schedule) as session:
                yield session
            return
        train_examples, _ = load_run_data(cfg)
        tokenizer = build_tokenizer(cfg.model, cfg.task, train_examples, cfg.gguf_file)
        client_model, _ = one_side(cfg, "client", train_examples, device)
        torch.manual_seed(cfg.seed)
        mine = _client_data(cfg, train_examples, tokenizer)[2][link.client_id]
        client = many.RoundClient(cfg, SplitClient(cfg, client_model, link, client_id=link.client_id), schedule)
        client.follow(mine, cfg.steps)
        print(f"client {client.id}: weights sha256 {client.digest()}", flush=True)
    yield None


@contextlib.contextmanager
def _grpc(cfg: TrainConfig, device) -> Iterator[Session]:
    """A --transport grpc client: dial --server (python -m hosl.serve), prove the secret."""
    from hosl.grpc_link import TLS, dial

    if not cfg.server:
        raise UsageError("--transport grpc needs --server HOST:PORT (where python -m hosl.serve listens)")
    secret = secret_for(cfg, needed=False)
    if cfg.insecure:
        print(
            "warning: --insecure: plain text, no TLS: the activations, labels and losses cross readable by anyone "
            "on the path" + ("" if secret else ", and the peers are not authenticated"),
            file=sys.stderr,
        )
    tls = None if cfg.insecure else TLS(ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key)

    def connect(timeout: float):
        link = dial(cfg.server, tls, timeout, cfg.compression, client_id=cfg.client_id)
        if secret is not None:
            link.authenticate(secret)
        return link

    link = connect(cfg.timeout)
    with link:
        cfg, run_dir, point = start_run_dir(cfg)
        with _unless_started(run_dir, point):
            if _rounds(cfg):
                from hosl import clients as many

                schedule = many.Schedule(cfg.seed, cfg.clients, cfg.clients_per_round)
                with _round_client(cfg, link, run_dir, device, schedule, redial=connect) as session:
                    yield session
            else:
                yield _remote_client(cfg, link, run_dir, point, device)


def _remote_client(cfg: TrainConfig, link, run_dir: Path, point, device) -> Session:
    """The client of a one-client run whose server is another process, after HELLO."""
    train_examples, eval_examples = load_run_data(cfg)
    tokenizer = build_tokenizer(cfg.model, cfg.task, train_examples, cfg.gguf_file)
    client_model, sizes = one_side(cfg, "client", train_examples, device)
    torch.manual_seed(cfg.seed)
    client = SplitClient(cfg, client_model, link)
    client.hello()
    params = _side_params(sizes) if sizes else {"client_params": sum(p.numel() for p in client_model.parameters())}
    return Session(cfg, run_dir, point, client, tokenizer, train_examples, eval_examples, device, params)


@contextlib.contextmanager
def _round_client(cfg: TrainConfig, link, run_dir: Path, device, schedule, redial=None) -> Iterator[Session]:
    """A client of a many-client run that writes a run directory: the lead of a dist run, or any
    client of a grpc run (redial: how it dials the server again when its link drops)."""
    from hosl import clients as many

    train_examples, eval_examples = load_run_data(cfg)
    tokenizer = build_tokenizer(cfg.model, cfg.task, train_examples, cfg.gguf_file)
    client_model, sizes = one_side(cfg, "client", train_examples, device)
    torch.manual_seed(cfg.seed)
    shards, held, streams = _client_data(cfg, train_examples, tokenizer)
    me = many.RoundClient(cfg, SplitClient(cfg, client_model, link, client_id=link.client_id), schedule)
    me.redial = redial
    params = _side_params(sizes) if sizes else {"client_params": sum(p.numel() for p in client_model.parameters())}

    def extra():
        mine = _rounds_summary(cfg, shards, me, [me])
        return mine | ({"client_id": me.id, "rejoined": me.rejoined} if cfg.transport == "grpc" else {})

    try:
        me.hello()
        yield Session(cfg, run_dir, None, me, tokenizer, train_examples, eval_examples, device, params,
                      batches=_round_batches(streams, schedule, me.id),
                      after=_held_out_accuracy(cfg, held, train_examples, tokenizer), extra=extra)  # fmt: skip
    finally:
        if me.link is not link:  # dialled again: the session open now is this client's to close
            me.link.close()


# -- the run directory, the data of many clients, the summary -------------------------------------------


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def device_for(cfg: TrainConfig) -> torch.device:
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


def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method}-{cfg.task}-{stamp}"


def kept_lines(path: Path, step: int) -> list[str] | None:
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


def _summary(cfg: TrainConfig, result: dict, side_params: dict, device: torch.device) -> dict:
    return {
        "method": cfg.method,
        "model": cfg.model,
        "task": cfg.task,
        "split_layer": cfg.split_layer if method_of(cfg.method).split else None,
        "steps": cfg.steps,
        "q": cfg.q,
        **result,
        "client_peak_memory_bytes": peak_memory_bytes(),
        "client_peak_memory_scope": "client process"
        if cfg.transport == "dist"
        else "whole process (client and server)",
        **_cuda_peak(device),
        **side_params,
    }


def start_run_dir(cfg: TrainConfig):
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
            kept_lines(run_dir / name, point.step)  # a bad line is refused before anything is written
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
            scores = [scoring.evaluate(client, tokenizer, p, cfg, cfg.steps) for p in parts]
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


def one_side(cfg: TrainConfig, role: str, train_examples, device: torch.device):
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
    train_last_blocks(client_model, cfg.client_train_blocks)
    sizes = split_summary(client_model, server_model)
    return (client_model if role == "client" else server_model).to(device), sizes


def secret_for(cfg: TrainConfig, needed: bool) -> bytes | None:
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
