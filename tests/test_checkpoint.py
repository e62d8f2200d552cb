"""Checkpoints (hosl.checkpoint): a kill at any point of a save leaves a run that resumes to the same
bits; a damaged or edited checkpoint, config or log is refused by name before any file changes; the
server keeps its state where it decides, whatever a frame asks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _links import ScriptedLink
from test_train import FAST, cfg_for, losses, weights

from hosl import checkpoint, transport
from hosl.boundary import Frame, Kind
from hosl.models import build
from hosl.replay import main as replay_main
from hosl.roles import SplitServer
from hosl.split import split_model
from hosl.tasks import load_run_data
from hosl.train import main, run


class Killed(BaseException):
    """Stands for a SIGKILL at one point of the save: nothing after it runs."""


def _straight(tmp_path, **overrides):
    cfg = cfg_for(tmp_path, "straight", steps=8, save_every=2, **overrides)
    run(cfg)
    return weights(tmp_path / "straight")


def _resume(run_dir, steps=8):
    assert main(["--resume", str(run_dir), "--steps", str(steps)]) == 0


def _kill_on_call(monkeypatch, module, name, call):
    """Make module.name raise Killed on its call-th call (1-based)."""
    real, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise Killed(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


# Points of the save of step 6, the third save (each save calls digests twice, client then server,
# write_manifest and commit once, prune twice, server then client): inside the .tmp, at the rename,
# after it.
KILL_POINTS = {
    "the server's files": ("digests", 6),
    "writing the manifest": ("write_manifest", 3),
    "the rename": ("commit", 3),
    "before the older is deleted": ("prune", 5),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_during_a_save_resumes_to_the_same_bits(tmp_path, monkeypatch, point):
    want = _straight(tmp_path)
    name, call = KILL_POINTS[point]
    with monkeypatch.context() as m:
        _kill_on_call(m, checkpoint, name, call)
        with pytest.raises(Killed):
            run(cfg_for(tmp_path, "killed", steps=8, save_every=2))
    assert checkpoint.complete(tmp_path / "killed"), "no complete checkpoint left"
    _resume(tmp_path / "killed")
    got = weights(tmp_path / "killed")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_a_local_run_raises_the_servers_own_exception_however_late_its_thread_records_it(tmp_path, monkeypatch):
    """The server's thread sends its ERROR frame, then records its exception: the client waits for it
    rather than raising the link's report (a race that once failed the kill test above)."""
    real_fail = transport.Link.fail

    def slow_fail(self, message):
        real_fail(self, message)
        time.sleep(0.5)  # the client has its PeerError long before the server's thread records why

    monkeypatch.setattr(transport.Link, "fail", slow_fail)
    _kill_on_call(monkeypatch, checkpoint, "prune", 1)  # the server prunes first
    with pytest.raises(Killed):
        run(cfg_for(tmp_path, "killed", steps=4, save_every=2))


@pytest.mark.parametrize("method", ["hosl", "fo"])
def test_a_killed_run_with_a_schedule_resumes_to_the_same_bits(tmp_path, monkeypatch, method):
    """The rate is a function of the step: a resumed run takes up the schedule where it stopped."""
    schedule = dict(lr_scheduler="linear", warmup_steps=3, method=method)
    want = _straight(tmp_path, **schedule)
    with monkeypatch.context() as m:
        _kill_on_call(m, checkpoint, "commit", 3)
        with pytest.raises(Killed):
            run(cfg_for(tmp_path, "killed", steps=8, save_every=2, **schedule))
    _resume(tmp_path / "killed")
    got = weights(tmp_path / "killed")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_only_the_last_save_total_limit_checkpoints_are_kept(tmp_path):
    run(cfg_for(tmp_path, steps=8, save_every=2, save_total_limit=2))
    assert [s for s, _ in checkpoint.complete(tmp_path / "run")] == [6, 8]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint*")) == ["checkpoint-6", "checkpoint-8"]
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint-8").iterdir())
    assert files == ["client.safetensors", "manifest.json", "server.safetensors", "server_optimizer.pt", "state.json"]


def _flip_byte(path: Path, at: int = -1):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_digest_digit(path: Path, name: str):
    """One hex digit of the digest a manifest lists for `name`, changed: JSON still, a digest still."""
    manifest = json.loads(path.read_text())
    digest = manifest["files"][name]
    manifest["files"][name] = ("1" if digest[0] == "0" else "0") + digest[1:]
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def _edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


DAMAGE = {
    "client weights, one bit": ("checkpoint-4/client.safetensors", lambda p: _flip_byte(p)),
    "server weights, one bit": ("checkpoint-4/server.safetensors", lambda p: _flip_byte(p, 200)),
    "server optimizer, truncated": ("checkpoint-4/server_optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:50])),
    "state, step -3": ("checkpoint-4/state.json", lambda p: _edit_json(p, step=-3)),
    "config, another seed": ("config.json", lambda p: _edit_json(p, seed=5)),
    "manifest, not JSON": ("checkpoint-4/manifest.json", lambda p: p.write_text("{")),
    "client weights, missing": ("checkpoint-4/client.safetensors", lambda p: p.unlink()),
    "server weights, missing": ("checkpoint-4/server.safetensors", lambda p: p.unlink()),
    "server optimizer, missing": ("checkpoint-4/server_optimizer.pt", lambda p: p.unlink()),
    # a flipped hex digit of the server optimizer's digest: the manifest is blamed, not the file
    "manifest, one digit of a digest": (
        "checkpoint-4/manifest.json",
        lambda p: _flip_digest_digit(p, "server_optimizer.pt"),
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_by_name_and_nothing_changes(tmp_path, capsys, damage):
    run(cfg_for(tmp_path, steps=4, save_every=4))
    run_dir = tmp_path / "run"
    name, edit = DAMAGE[damage]
    edit(run_dir / name)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(run_dir), "--steps", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"error: {run_dir / name}: " in err[0], err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before  # metrics.jsonl and zo_log.jsonl untouched


def test_a_checkpoint_of_an_older_hosl_is_refused_with_the_reason(tmp_path, capsys):
    run(cfg_for(tmp_path, steps=2, save_every=2))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-2").rename(run_dir / "checkpoint")
    (run_dir / "checkpoint" / "manifest.json").unlink()
    assert main(["--resume", str(run_dir), "--steps", "4"]) == 2
    assert "written by an older hosl" in capsys.readouterr().err


def test_a_resume_drops_a_log_line_cut_short_by_a_kill(tmp_path):
    run(cfg_for(tmp_path, "straight", steps=6, save_every=3))
    run(cfg_for(tmp_path, "run", steps=6, save_every=3, save_total_limit=2))
    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir / "checkpoint-6")  # as if killed before step 6's save: resume from step 3
    with open(run_dir / "zo_log.jsonl", "a") as f:
        f.write('{"step": 6, "gra')
    _resume(run_dir, 6)
    assert (run_dir / "zo_log.jsonl").read_text() == (tmp_path / "straight" / "zo_log.jsonl").read_text()


def test_replay_refuses_an_edited_log(tmp_path, capsys):
    cfg = cfg_for(tmp_path, steps=3)
    run(cfg)
    log = tmp_path / "run" / "zo_log.jsonl"
    log.write_text(log.read_text().replace('"grads": [', '"grads": [1.0, ', 1))
    assert replay_main([str(tmp_path / "run")]) == 2
    assert f"{log}: its SHA-256 differs" in capsys.readouterr().err


# -- the server decides where its state lives --------------------------------------------------------


def _server(tmp_path):
    cfg = cfg_for(tmp_path, "srv")
    examples = load_run_data(cfg)[0]
    _, model = build(cfg, examples)
    _, server_model = split_model(model, cfg.split_layer)
    return SplitServer(cfg, server_model, ScriptedLink(), tmp_path / "srv")


def test_a_control_frame_cannot_name_the_servers_paths(tmp_path):
    server = _server(tmp_path)
    server.steps_done = 3  # as if three steps had run
    elsewhere = tmp_path / "elsewhere"
    server.control(Frame(Kind.CONTROL, meta={"op": "save", "step": 3, "dir": str(elsewhere)}), server.link)
    assert not elsewhere.exists()  # the old protocol's path is ignored
    assert (tmp_path / "srv" / "checkpoint-3.tmp" / "server.safetensors").is_file()
    digests = server.link.sent[-1].meta["files"]
    bad = [
        {"op": "save", "step": "../../x"},
        {"op": "save", "step": -1},
        {"op": "load", "step": 3, "files": {"../client.safetensors": "0" * 64}},
        {"op": "load", "step": 3, "files": {"server.safetensors": "not a digest"}},
        {"op": "commit", "step": 3, "keep": "all"},
    ]
    for meta in bad:
        with pytest.raises(ValueError, match=f"CONTROL {meta['op']}"):
            server.control(Frame(Kind.CONTROL, meta=meta), server.link)
    wrong = {**digests, "server.safetensors": "0" * 64}
    with pytest.raises(checkpoint.CheckpointError, match="server.safetensors: its SHA-256 differs"):
        server.control(Frame(Kind.CONTROL, meta={"op": "load", "step": 3, "files": wrong}), server.link)
    load = Frame(Kind.CONTROL, meta={"op": "load", "step": 3, "files": digests})
    server.control(load, server.link)  # the .tmp, verified


@pytest.mark.parametrize("op", ["final", "stop", "save", "commit"])
def test_no_frame_reaches_the_server_before_hello(tmp_path, op):
    """A stranger who reaches an unauthenticated server's port and sends CONTROL frames first: the
    session closes with one line and nothing is written (it used to write untrained final weights,
    delete checkpoints, save copies, or stop the server with exit status 0)."""
    server = _server(tmp_path)
    server.link = ScriptedLink([Frame(Kind.CONTROL, meta={"op": op, "step": 0, "keep": []})])
    with pytest.raises(transport.LinkError, match="the client sent CONTROL before HELLO"):
        server.serve()
    assert not (tmp_path / "srv").exists()


def test_control_operations_are_bounded_by_the_run(tmp_path):
    """One save per step the run has reached, a commit that keeps it, the final weights once after
    the last step, a load only before training: anything else is refused and changes no file."""
    server = _server(tmp_path)
    steps = server.cfg.steps
    refused = [
        ({"op": "save", "step": 1}, "CONTROL save of step 1 refused: this server is at step 0"),
        ({"op": "commit", "step": 0, "keep": [0]}, "CONTROL commit of step 0 refused: .* has not saved it"),
        ({"op": "final"}, f"CONTROL final refused: this server is at step 0 of {steps}"),
    ]
    for meta, message in refused:
        with pytest.raises(transport.LinkError, match=message):
            server.control(Frame(Kind.CONTROL, meta=meta), server.link)
    assert not (tmp_path / "srv").exists()
    server.steps_done = 2
    server.control(Frame(Kind.CONTROL, meta={"op": "save", "step": 2}), server.link)
    with pytest.raises(transport.LinkError, match="CONTROL save of step 2 refused: .* has saved it"):
        server.control(Frame(Kind.CONTROL, meta={"op": "save", "step": 2}), server.link)  # a disk filler, once
    with pytest.raises(transport.LinkError, match="would delete the checkpoint it commits"):
        server.control(Frame(Kind.CONTROL, meta={"op": "commit", "step": 2, "keep": []}), server.link)
    assert (tmp_path / "srv" / "checkpoint-2.tmp" / "server.safetensors").is_file()
    server.control(Frame(Kind.CONTROL, meta={"op": "commit", "step": 2, "keep": [2]}), server.link)
    assert (tmp_path / "srv" / "checkpoint-2" / "server.safetensors").is_file()
    server._trained = True
    with pytest.raises(transport.LinkError, match="CONTROL load of step 2 refused"):
        server.control(Frame(Kind.CONTROL, meta={"op": "load", "step": 2, "files": {}}), server.link)
    server.steps_done = steps
    server.control(Frame(Kind.CONTROL, meta={"op": "final"}), server.link)
    assert (tmp_path / "srv" / "server.safetensors").is_file()
    with pytest.raises(transport.LinkError, match="has written its final weights"):
        server.control(Frame(Kind.CONTROL, meta={"op": "final"}), server.link)


# -- real kills ------------------------------------------------------------------------------------------


def _flags(run_dir, steps):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items() if k != "steps"]
    return [*flags, f"--steps={steps}", "--save-every=1", f"--out={run_dir}"]


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """A run killed (SIGKILL) at 6 moments, resumed after each, ends with the bits of a run that never
    stopped; after every kill, zo_log.jsonl covers every step metrics.jsonl does. The run is long
    enough (a step takes well under 0.1 s) that it cannot end before the sixth kill, however the
    machine's load shifts the moments (16 steps once ended after three)."""
    steps = 64
    run(cfg_for(tmp_path, "straight", steps=steps))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hosl.train", *_flags(run_dir, steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = __import__("random").Random(3)
    kills = 0
    for attempt in range(6):
        argv = cmd if attempt == 0 else [sys.executable, "-m", "hosl.train", "--resume", str(run_dir)]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = rng.randint(1, 3)  # steps past the resume point before the kill
        start = len(losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        while proc.poll() is None and len(_safe_losses(run_dir)) < start + target:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.3)  # somewhere in the next step, its log lines or its save
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        logged = _safe_losses(run_dir)
        zo_lines = [ln for ln in (run_dir / "zo_log.jsonl").read_text().splitlines() if ln.endswith("}")]
        assert len(zo_lines) >= len(logged), (len(zo_lines), len(logged))
    assert kills >= 4
    out = subprocess.run([sys.executable, "-m", "hosl.train", "--resume", str(run_dir)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    want, got = weights(tmp_path / "straight"), weights(run_dir)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert losses(run_dir) == losses(tmp_path / "straight")


def _safe_losses(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            out.append(record["loss"])
    return out
