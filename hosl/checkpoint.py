"""Checkpoints that survive a kill and cannot be silently wrong.

A run directory holds its checkpoints as `checkpoint-<step>/`, each complete the moment it has that
name: a checkpoint is written into `checkpoint-<step>.tmp/`, its files and the directory synced to
disk, and only then renamed (one atomic rename). The older ones are deleted after that, keeping the
last --save-total-limit, so a kill at any instant leaves at least one complete checkpoint, and resume
takes the newest.

Each checkpoint has a `manifest.json`: the SHA-256 of every file in it and of the run's settings
(config.json's fields that define the trajectory: a resume may change the others, such as --steps,
and rewrites config.json to say so).
Resume and replay verify it before they read anything else and refuse, naming the file, when a
byte differs: a flipped bit in the weights, a truncated optimizer state, an edited step or seed. A
finished run has a manifest too, of its config, its log and its final weights (hosl.replay checks it).

The server keeps its own files (server.safetensors, server_optimizer.pt) in its own run directory,
which is the client's on one machine. The client lists their digests in its manifest and sends them
back when it asks the server to load, so the server verifies what it reads as well; a frame names a
step, never a path.

Here too: a module's weights as safetensors and back (tensors_of, load_tensors, save_weights), the
server's files (save_server, load_server_state), and a trainer's whole checkpoint (save_run,
load_run, save_final).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

MANIFEST = "manifest.json"
SERVER_FILES = ("server.safetensors", "server_optimizer.pt")
STATE_KEYS = ("step", "evals", "skipped_steps", "wall_seconds", "bytes")
BEST_KEYS = ("best_eval_accuracy", "best_eval_loss")  # a classification task's, a generation task's
_NAME = re.compile(r"checkpoint-(\d+)")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint or run file that is missing, damaged or edited: one line naming the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}"


def tmp_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}.tmp"


def digests(directory: Path, names=None) -> dict[str, str]:
    """{file name: SHA-256} of the files in directory (or of `names`), the manifest left out."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    return {name: sha256_file(directory / name) for name in names}


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(directory: Path) -> None:
    """Every file in directory, then the directory itself, to disk."""
    for p in Path(directory).iterdir():
        if p.is_file():
            sync_file(p)
    sync_file(directory)


def config_digest(config_path: Path, legacy: bool = False, era: int | None = None) -> str:
    """SHA-256 of the run-defining fields of a config.json (TrainConfig.identity; legacy: as the
    versions before the resumable fields wrote it; era: as the versions before config.ADDED[era])."""
    from hosl.config import TrainConfig

    try:
        cfg = TrainConfig.from_json(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from None
    return hashlib.sha256(json.dumps(cfg.identity(legacy, era), sort_keys=True).encode()).hexdigest()


def check_config(manifest: dict, config_path: Path, where: Path) -> None:
    """CheckpointError unless the manifest's config digest is the config's, as this version or an
    older one (config.ADDED) wrote it."""
    from hosl.config import ADDED

    eras = [config_digest(config_path, era=era) for era in range(len(ADDED) + 1)]
    if manifest.get("config") not in (*eras, config_digest(config_path, legacy=True)):
        raise CheckpointError(
            f"{config_path}: its settings differ from those {where} was saved with (edited since the save)"
        )


def write_manifest(directory: Path, files: dict[str, str], config_path: Path | None) -> None:
    manifest = {"files": dict(sorted(files.items()))}
    if config_path is not None:
        manifest["config"] = config_digest(config_path)
    manifest["digest"] = _own_digest(manifest)
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _own_digest(manifest: dict) -> str:
    """A manifest's digest of its own contents: a damaged manifest is blamed, not the file whose
    digest the damage fell on."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def commit(tmp: Path, final: Path) -> None:
    """Sync tmp and rename it to final, atomically; a final of the same name (the same step saved
    again) is replaced, and the run directory's entry synced."""
    sync_dir(tmp)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    sync_file(final.parent)


def complete(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the run's complete checkpoints (renamed, with a manifest), oldest first."""
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir() and (p / MANIFEST).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune(run_dir: Path, keep: list[int]) -> None:
    """Delete the checkpoints (and interrupted .tmp ones) of every step not in keep."""
    for p in Path(run_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)(\.tmp|\.old)?", p.name)
        if m and int(m.group(1)) not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {what} is unreadable ({type(exc).__name__}: {exc})") from None


def read_manifest(path: Path) -> dict:
    manifest = _read_json(path, "the manifest")
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: not a hosl manifest")
    if "digest" in manifest and manifest["digest"] != _own_digest(manifest):  # older manifests have none
        raise CheckpointError(f"{path}: damaged or edited (its own digest does not match what it lists)")
    return manifest


def verify(directory: Path, manifest: dict, *, missing_ok=()) -> None:
    """Each file the manifest lists has its digest (files in missing_ok may be absent here)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in files.values()):
        raise CheckpointError(f"{directory / MANIFEST}: not a hosl manifest")
    for name, want in files.items():
        path = Path(directory) / name
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{directory / MANIFEST}: bad file name {name!r}")
        if not path.is_file():
            if name in missing_ok:
                continue
            raise CheckpointError(f"{path}: missing (the manifest lists it)")
        if sha256_file(path) != want:
            raise CheckpointError(f"{path}: its SHA-256 differs from the manifest's (damaged or edited)")


@dataclass
class ResumePoint:
    """A verified checkpoint: its step, directory, manifest and training state."""

    step: int
    path: Path
    manifest: dict
    state: dict

    def server_digests(self) -> dict[str, str]:
        return {n: d for n, d in self.manifest["files"].items() if n in SERVER_FILES}


def latest(run_dir: Path, config_path: Path, server_here: bool = False) -> ResumePoint | None:
    """The newest complete checkpoint of run_dir, verified against its manifest (the config's digest
    included) and its state checked; None when there is none. CheckpointError for any mismatch.
    server_here: the server's files are in this directory too (one process), so they must be there.
    Reads only: nothing in the run directory changes."""
    run_dir = Path(run_dir)
    found = complete(run_dir)
    renamed = sorted(
        (int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := _NAME.fullmatch(p.name)) and p.is_dir()
    )
    if renamed and (not found or renamed[-1][0] > found[-1][0]):  # a checkpoint is renamed after its manifest
        raise CheckpointError(
            f"{renamed[-1][1]} has no {MANIFEST} (removed?), so it cannot be verified: put it back, or remove "
            f"{renamed[-1][1].name} to resume from an older checkpoint"
        )
    if not found:
        return None
    step, path = found[-1]
    manifest = read_manifest(path / MANIFEST)
    # The server's files may live on another machine: the server verifies those itself.
    verify(path, manifest, missing_ok=() if server_here else SERVER_FILES)
    check_config(manifest, config_path, path)
    state = _read_json(path / "state.json", "the training state")
    if not isinstance(state, dict) or state.get("step") != step:
        got = state.get("step") if isinstance(state, dict) else state
        raise CheckpointError(f"{path / 'state.json'}: its step {got!r} is not the checkpoint's {step}")
    missing = sorted(set(STATE_KEYS) - set(state))
    missing += [] if set(BEST_KEYS) & set(state) else [BEST_KEYS[0]]
    if missing:
        raise CheckpointError(f"{path / 'state.json'}: lacks {', '.join(missing)}")
    return ResumePoint(step, path, manifest, state)


def check_server_request(meta: dict, op: str) -> tuple[int, dict[str, str]]:
    """The (step, digests) of a CONTROL save/load/commit frame, checked: a peer's frame names a step
    and the digests of the server's own files, nothing else (ValueError otherwise)."""
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 1 << 63:
        raise ValueError(f"CONTROL {op}: step must be an int >= 0, got {step!r}")
    files = meta.get("files", {})
    if not isinstance(files, dict) or any(
        n not in SERVER_FILES or not (isinstance(d, str) and _HEX64.fullmatch(d)) for n, d in files.items()
    ):
        raise ValueError(f"CONTROL {op}: files must map {', '.join(SERVER_FILES)} to SHA-256 digests")
    return step, files


# -- weights and optimiser state ---------------------------------------------------------------------


def tensors_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters by name, as owned contiguous CPU copies (safetensors refuses shared storage)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in module.named_parameters()}


def load_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """The module's parameters as safetensors at path, written beside it and renamed into place."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors_of(module), tmp)
    tmp.replace(path)


def save_server(server, directory: Path) -> dict[str, str]:
    """The server's weights and optimiser state into directory; {file name: SHA-256}."""
    from safetensors.torch import save_file

    save_file(tensors_of(server.model), directory / "server.safetensors")
    names = ["server.safetensors"]
    if server.optimizer is not None:
        torch.save(server.optimizer.state_dict(), directory / "server_optimizer.pt")
        names.append("server_optimizer.pt")
    for name in names:
        sync_file(directory / name)
    return digests(directory, names)


def load_server_state(server, directory: Path) -> None:
    from safetensors.torch import load_file

    load_tensors(server.model, load_file(directory / "server.safetensors"))
    if server.optimizer is not None:
        state = torch.load(directory / "server_optimizer.pt", weights_only=True, map_location="cpu")
        server.optimizer.load_state_dict(state)  # moves the state to the parameters' device


# -- a run's checkpoints, either side ----------------------------------------------------------------


# `trainer` below is hosl.roles' SplitClient or FullModel: .model, .optimizer (None for ZO),
# .split_client, and a split client's .control (the CONTROL frames to the server).


def weights_file(trainer) -> str:
    """This process's weights: the client's of a split run (the server saves its own), or the model's."""
    return "client.safetensors" if trainer.split_client else "model.safetensors"


def save_run(run_dir: Path, trainer, total_limit: int, step: int, state: dict) -> None:
    """checkpoint-<step>/, written whole into its .tmp, verified by a manifest, renamed into place;
    then only the newest `total_limit` are kept. A split client has the server save, commit and prune
    its own files in step (CONTROL frames)."""
    from safetensors.torch import save_file

    tmp, final = tmp_dir(run_dir, step), step_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [weights_file(trainer)]
    save_file(tensors_of(trainer.model), tmp / names[0])
    if trainer.optimizer is not None:
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        names.append("optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    names.append("state.json")
    files = digests(tmp, names)
    if trainer.split_client:
        files.update(trainer.control("save", step=step)["files"])  # the server's: here too when it shares run_dir
    write_manifest(tmp, files, run_dir / "config.json")
    commit(tmp, final)
    keep = [s for s, _ in complete(run_dir)][-total_limit:]
    if trainer.split_client:
        trainer.control("commit", step=step, keep=keep)
    prune(run_dir, keep)


def load_run(point: ResumePoint, trainer) -> None:
    """The verified checkpoint `point` into trainer (a split client also has the server load its own)."""
    from safetensors.torch import load_file

    load_tensors(trainer.model, load_file(point.path / weights_file(trainer)))
    if trainer.optimizer is not None:
        state = torch.load(point.path / "optimizer.pt", weights_only=True, map_location="cpu")
        trainer.optimizer.load_state_dict(state)  # moves the state to the parameters' device
    if trainer.split_client:
        trainer.control("load", step=point.step, files=point.server_digests())


def save_final(run_dir: Path, trainer) -> None:
    """This process's final weights, beside the run's logs."""
    save_weights(trainer.model, run_dir / weights_file(trainer))
