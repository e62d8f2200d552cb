"""hosl.transport: an exchange over the local and the dist link against the same computation done
directly; byte counts; timeouts, a peer that fails, dies or goes silent ends in a clear error."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _procs import free_port
from _tiny_models import batch, model

from hosl.boundary import Frame, Kind, encode_frame
from hosl.split import split_model
from hosl.transport import LinkError, LinkTimeout, PeerError, dist_link, local_links

SECRET, GUESS = "s3cret, 16 or more bytes", "a guess, 16 or more bytes"  # hosl.auth refuses shorter ones
EXCHANGE = Path(__file__).parent / "_exchange.py"


def _direct_loss():
    client, server = split_model(model("llama"), 2)
    ids, mask, labels = batch()
    with torch.no_grad():
        return server(client(input_ids=ids, attention_mask=mask), labels=labels).loss.item()


def _env(rank, port):
    return dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2", OMP_NUM_THREADS="1",
    )  # fmt: skip


def _start_pair(mode, timeout, secrets=(None, None)):
    """The server (rank 0) and client (rank 1) of _exchange.py; secrets: each one's $HOSL_AUTH_TOKEN."""
    port = free_port()

    def env(rank):
        e = {k: v for k, v in _env(rank, port).items() if k != "HOSL_AUTH_TOKEN"}
        return e if secrets[rank] is None else {**e, "HOSL_AUTH_TOKEN": secrets[rank]}

    return [
        subprocess.Popen(
            [sys.executable, str(EXCHANGE), mode, "dist", str(timeout)],
            env=env(rank),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]


def _run_local(mode="exchange"):
    out = subprocess.run([sys.executable, str(EXCHANGE), mode, "local"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_exchange_matches_direct():
    result = _run_local()
    assert result["loss"] == _direct_loss()  # exact: frames carry the float32 bytes unchanged
    assert result["client_bytes_sent"] == result["server_bytes_received"] > 0
    assert result["client_bytes_received"] == result["server_bytes_sent"] > 0
    assert result["client_frames_sent"] == 2 and result["client_frames_received"] == 1


def test_dist_exchange_matches_local():
    procs = _start_pair("exchange", 60)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    server, client = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    local = _run_local()
    assert (server["role"], client["role"]) == ("server", "client")
    assert client["loss"] == local["loss"] == _direct_loss()
    # Over dist each frame also carries an 8-byte length.
    assert client["client_bytes_sent"] == server["server_bytes_received"] == local["client_bytes_sent"] + 2 * 8
    assert client["client_bytes_received"] == server["server_bytes_sent"] == local["client_bytes_received"] + 8


def test_dist_streaming_holds_bounded_bytes_in_flight():
    from _exchange import STREAM_FRAMES, STREAM_ROUNDS

    from hosl.transport import _DistLink

    procs = _start_pair("stream", 60)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    client = json.loads(outs[1][0].strip().splitlines()[-1])
    expected = [[r, i, float(i)] for r in range(STREAM_ROUNDS) for i in range(STREAM_FRAMES)]
    assert client["answers"] == expected  # every frame arrived, in order, none lost to backpressure
    # 72 frames of 1 MiB went out: the finished ones were let go, so no more than the bound was ever
    # held (the newest frame included), in the last round as in the first.
    bound = _DistLink.MAX_IN_FLIGHT_BYTES
    assert bound < STREAM_ROUNDS * STREAM_FRAMES << 20
    assert 0 < max(client["held"]) <= bound, max(client["held"])
    assert max(client["held"][-STREAM_FRAMES:]) > (1 << 20)  # several frames in flight: still streaming


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_dist_exchange_under_torchrun(tmp_path):
    port = str(free_port())
    out = subprocess.run(
        [
            "torchrun",
            "--nproc-per-node",
            "2",
            "--master-port",
            port,
            str(EXCHANGE),
            "exchange",
            "dist",
            "60",
            tmp_path,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    client = json.loads((tmp_path / "client.json").read_text())
    server = json.loads((tmp_path / "server.json").read_text())
    assert client["loss"] == _direct_loss()
    assert client["client_bytes_sent"] == server["server_bytes_received"]


def test_killed_client_fails_the_server_cleanly():
    timeout = 30
    server, client = _start_pair("client-dies", timeout)
    assert client.stdout.readline().strip() == "ready"  # connected, hello sent: now it dies
    client.send_signal(signal.SIGKILL)
    client.wait()
    start = time.monotonic()
    _, err = server.communicate(timeout=timeout + 30)
    assert server.returncode == 3, err
    assert time.monotonic() - start < timeout
    assert err.strip().splitlines()[-1].startswith("error: the server lost the client (rank 1)")


def test_silent_client_times_the_server_out():
    timeout = 4
    server, client = _start_pair("client-silent", timeout)
    try:
        _, err = server.communicate(timeout=120)
    finally:
        client.kill()
    assert server.returncode == 3, err
    assert err.strip().splitlines()[-1].startswith("error: the server waited 4 s to receive from the client")


def test_dist_refuses_an_oversized_length_before_allocating_it():
    server, client = _start_pair("rogue-length", 30)
    try:
        _, err = server.communicate(timeout=120)
    finally:
        client.kill()
    assert server.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the server received a bad frame from the client: oversized: a length prefix "
                           "of 1099511627776 bytes, the limit is 2097152"), last  # fmt: skip


def _server_error(procs):
    server, client = procs
    try:
        _, err = server.communicate(timeout=120)
    finally:
        client.kill()
        client.wait()
    assert server.returncode == 3, err
    return err.strip().splitlines()[-1]


def test_dist_with_a_shared_secret_matches_direct():
    procs = _start_pair("exchange", 60, secrets=(SECRET, SECRET))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    server, client = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    assert client["loss"] == _direct_loss()
    # Counted on top of the frames: the handshake (a 37-byte hello, a 32-byte proof) and, for the 2
    # frames, an 8-byte length and a 32-byte MAC each.
    extra = (8 + 37) + (8 + 32) + 2 * (8 + 32)
    sent = _run_local()["client_bytes_sent"] + extra
    assert client["client_bytes_sent"] == server["server_bytes_received"] == sent


AUTH_FAILURES = {
    "no secret on the client": ((SECRET, None), "exchange", "the client did not authenticate"),
    "another secret": ((SECRET, GUESS), "exchange", "the client failed authentication: it does not hold"),
    "no secret on the server": ((None, SECRET), "exchange", "the client authenticates with a shared secret and"),
    "a tampered frame": ((SECRET, SECRET), "rogue-tamper", "frame 1 from the client failed its MAC check"),
    "a replayed frame": ((SECRET, SECRET), "rogue-replay", "frame 2 from the client failed its MAC check"),
}


@pytest.mark.parametrize("case", AUTH_FAILURES)
def test_a_peer_without_the_secret_or_with_forged_frames_is_refused(case):
    secrets, mode, message = AUTH_FAILURES[case]
    last = _server_error(_start_pair(mode, 20, secrets))
    assert message in last, last


def test_a_short_secret_is_refused_and_hosl_token_makes_a_strong_one(tmp_path, monkeypatch, capsys):
    """A secret of fewer than 16 bytes falls to offline guessing from one recorded handshake: it is
    refused from a file and from the environment. `python -m hosl.token FILE` writes 32 random bytes
    as hex, readable by the owner only, and never overwrites a file."""
    from hosl import auth
    from hosl import token as token_cli

    weak = tmp_path / "weak"
    weak.write_text("s3cret\n")
    with pytest.raises(auth.AuthError, match=f"--auth-token-file {weak} holds a secret of 6 bytes, fewer than 16"):
        auth.read_secret(str(weak))
    monkeypatch.setenv(auth.ENV, "hunter2")
    with pytest.raises(auth.AuthError, match=r"\$HOSL_AUTH_TOKEN holds a secret of 7 bytes.*python -m hosl.token"):
        auth.read_secret(None)
    path = tmp_path / "token"
    assert token_cli.main([str(path)]) == 0
    text = path.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", text) and path.stat().st_mode & 0o777 == 0o600
    assert auth.read_secret(str(path)) == text.encode()
    assert token_cli.main([str(path)]) == 2 and path.read_text().strip() == text  # never overwritten
    assert "exists" in capsys.readouterr().err
    other = tmp_path / "other"
    assert token_cli.main([str(other)]) == 0 and other.read_text() != path.read_text()  # fresh each time
    capsys.readouterr()
    assert token_cli.main(["-"]) == 0 and re.fullmatch(r"[0-9a-f]{64}", capsys.readouterr().out.strip())
    assert token_cli.main([]) == 2 and token_cli.main(["--help"]) == 2


def test_dist_link_needs_its_environment(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LinkError, match="torchrun --nproc-per-node 2"):
        dist_link()


def test_local_timeout_and_close():
    client, server = local_links(slots=1, slot_bytes=4096, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(LinkTimeout, match="client got no frame from the server within 0.2 s"):
        client.recv()
    assert 0.15 < time.monotonic() - start < 5
    assert client.broken

    client, server = local_links(slots=1, slot_bytes=4096, timeout=0.2)
    client.send(Frame(Kind.HELLO))
    with pytest.raises(LinkTimeout, match="could not send for 0.2 s"):  # backpressure: one slot, not taken
        client.send(Frame(Kind.HELLO))

    client, server = local_links(slots=2, slot_bytes=4096, timeout=30)
    threading.Timer(0.2, server.close).start()
    start = time.monotonic()
    with pytest.raises(LinkError, match="the server closed the link"):
        client.recv()
    assert time.monotonic() - start < 10


def test_peer_failure_message_arrives():
    client, server = local_links(slots=2, slot_bytes=4096, timeout=5)
    with pytest.raises(KeyError):
        with server:
            {}["missing"]
    with pytest.raises(PeerError, match="the server failed: KeyError: 'missing'"):
        client.recv()


def test_local_counts_bytes_and_checks_slot_size():
    client, server = local_links(slots=2, slot_bytes=4096, timeout=5)
    frame = Frame(Kind.ACT, step=3, probe=1, sign=-1, tensors={"hidden": torch.randn(2, 3, 8)})
    client.send(frame)
    got = server.recv()
    assert (got.kind, got.step, got.probe, got.sign) == (Kind.ACT, 3, 1, -1)
    torch.testing.assert_close(got.tensors["hidden"], frame.tensors["hidden"], rtol=0, atol=0)
    assert client.bytes_sent == server.bytes_received == encode_frame(frame).numel()
    with pytest.raises(LinkError, match="slot_bytes"):
        client.send(Frame(Kind.ACT, tensors={"hidden": torch.zeros(2048)}))


def test_compression_applies_to_activations_only():
    client, server = local_links(slots=4, slot_bytes=1 << 16, timeout=5, compression="int8")
    x = torch.randn(4, 64)
    client.send(Frame(Kind.ACT, tensors={"hidden": x}))
    client.send(Frame(Kind.LOSS, tensors={"loss": x}))
    act, loss = server.recv(), server.recv()
    assert not torch.equal(act.tensors["hidden"], x)
    torch.testing.assert_close(act.tensors["hidden"], x, rtol=0, atol=x.abs().max().item() / 127)
    assert torch.equal(loss.tensors["loss"], x)
    assert client.bytes_sent < 2 * encode_frame(Frame(Kind.ACT, tensors={"hidden": x})).numel()


def test_an_emulated_network_delays_each_frame_by_half_a_round_trip_and_its_bytes():
    """Network(rtt 100 ms, 8 Mbit/s = 1 MB/s): a frame of about 200 kB is received no earlier than
    0.2 s (its bytes) + 0.05 s (half the round trip) after it was sent, and a second one sent at once
    queues behind the first (0.4 s + 0.05 s). Lower bounds only: the emulator may be late, never early."""
    from hosl.transport import Network

    client, server = local_links(timeout=10)
    client.network = server.network = Network(rtt_ms=100, mbit=8)
    payload = {"hidden": torch.zeros(50_000)}  # 200,000 bytes of float32
    start = time.perf_counter()
    client.send(Frame(Kind.ACT, step=0, tensors=payload))
    client.send(Frame(Kind.ACT, step=0, tensors=payload))
    server.recv()
    first = time.perf_counter() - start
    server.recv()
    second = time.perf_counter() - start
    assert first >= 0.25 and second >= 0.45, (first, second)
    server.send(Frame(Kind.LOSS, step=0, meta={"loss": 1.0}))  # the other way: half a round trip
    start = time.perf_counter()
    client.recv()
    assert time.perf_counter() - start >= 0.05
    with pytest.raises(ValueError, match="rtt_ms >= 0"):
        Network(rtt_ms=-1)
