"""--transport grpc against the local run: a client process and a hosl.serve process over loopback with
TLS (certificates made here) give the local run's bits; clients without the CA, the token or the
right certificate are refused in one line while the server goes on serving; a killed client resumes."""

import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import cfg_for

from hosl.train import main, run

grpc = pytest.importorskip("grpc")
x509 = pytest.importorskip("cryptography.x509")

# The small run of test_train, over grpc: every flag both sides take.
RUN = ["--train-examples", "128", "--eval-examples", "32", "--batch-size", "8", "--max-length", "24",
       "--zo-estimator", "central", "--q", "1", "--client-lr", "1e-4", "--log-every", "1",
       "--threads", "1"]  # fmt: skip


def _certificate(name: str, issuer=None, issuer_key=None, ca=False, sans=()):
    """A key and its certificate (PEM bytes): self-signed, or signed by issuer."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        import ipaddress

        names = [x509.IPAddress(ipaddress.ip_address(s)) if s[0].isdigit() else x509.DNSName(s) for s in sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key, cert, key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the server's certificate for localhost from it, a client certificate from it, and a
    second CA with a server certificate of its own (another server)."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca, _, ca_pem = _certificate("hosl test CA", ca=True)
    _, _, server_key, server_pem = _certificate("localhost", ca, ca_key, sans=("localhost", "127.0.0.1"))
    _, _, client_key, client_pem = _certificate("client 1", ca, ca_key)
    other_key, other, _, other_pem = _certificate("another CA", ca=True)
    _, _, stranger_key, stranger_pem = _certificate("stranger", other, other_key)
    files = {"ca": ca_pem, "server.pem": server_pem, "server.key": server_key, "client.pem": client_pem,
             "client.key": client_key, "other-ca": other_pem, "stranger.pem": stranger_pem,
             "stranger.key": stranger_key}  # fmt: skip
    for name, data in files.items():
        (d / name).write_bytes(data)
    token = d / "token"
    token.write_text("5e" * 32)
    return d


class Server:
    """python -m hosl.serve in its own process, on a free port."""

    def __init__(self, out: Path, flags: list[str]):
        cmd = [sys.executable, "-m", "hosl.serve", "--listen", "127.0.0.1:0", "--out", str(out), *RUN, *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "listening on port" not in line:
            raise RuntimeError(f"hosl.serve did not start: {line} {self.proc.stderr.read()}")
        self.port = int(line.split("port ")[1].split()[0])

    def finish(self, timeout=60) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def _tls(pki, **extra):
    flags = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    return flags + [x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _equal(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.slow
def test_a_grpc_run_over_tls_is_the_local_run_and_refusals_leave_the_server_serving(tmp_path, pki, capsys):
    local = run(cfg_for(tmp_path, "local", steps=6, threads=1))
    token = ["--auth-token-file", str(pki / "token")]
    server = Server(tmp_path / "srv", [*_tls(pki), *token, "--steps", "6"])
    target = ["--transport", "grpc", "--server", f"localhost:{server.port}", *RUN, "--steps", "6", "--timeout", "5"]
    try:
        # Refused, each in one line, nothing left in --out; the server goes on.
        cases = [
            ([*token], "over TLS"),  # no --tls-ca: the system's roots do not know the test CA
            ([*token, "--tls-ca", str(pki / "other-ca")], "over TLS"),  # another server's issuer
            (["--tls-ca", str(pki / "ca")], "authenticates with a shared secret and this client has none"),
        ]
        for flags, said in cases:
            out = tmp_path / "refused"
            assert main([*target, *flags, "--out", str(out)]) in (1, 2)
            line = _last_line(capsys)
            assert said in line and line.startswith("error: "), line
            assert not out.exists()
        assert server.proc.poll() is None
        assert main([*target, *token, "--tls-ca", str(pki / "ca"), "--out", str(tmp_path / "grpc")]) == 0
    finally:
        code, err = server.finish()
    assert code == 0, err
    assert _equal(tmp_path / "local" / "client.safetensors", tmp_path / "grpc" / "client.safetensors")
    assert _equal(tmp_path / "local" / "server.safetensors", tmp_path / "srv" / "server.safetensors")
    summary = json.loads((tmp_path / "grpc" / "summary.json").read_text())
    assert summary["final_eval_accuracy"] == local["final_eval_accuracy"]
    assert summary["bytes_up"] > 0


@pytest.mark.slow
def test_mutual_tls_refuses_a_stranger_and_takes_a_client_of_its_ca(tmp_path, pki, capsys):
    server = Server(tmp_path / "srv", [*_tls(pki, tls_client_ca=pki / "ca"), "--steps", "2"])
    target = ["--transport", "grpc", "--server", f"localhost:{server.port}", "--tls-ca", str(pki / "ca"), *RUN,
              "--steps", "2", "--timeout", "5"]  # fmt: skip
    try:
        stranger = ["--tls-cert", str(pki / "stranger.pem"), "--tls-key", str(pki / "stranger.key")]
        for flags in ([], stranger):
            assert main([*target, *flags, "--out", str(tmp_path / "refused")]) == 1
            assert "could not reach the server" in _last_line(capsys)
        client = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
        assert main([*target, *client, "--out", str(tmp_path / "ok")]) == 0
    finally:
        code, err = server.finish()
    assert code == 0, err


@pytest.mark.slow
def test_a_killed_client_resumes_over_grpc_to_the_same_bits(tmp_path, pki):
    """A client killed (SIGKILL) once its checkpoint of step 4 is written is started again with --resume: the
    server, still listening, loads its side of the checkpoint, and both sides end as a run that
    never stopped."""
    straight = tmp_path / "straight"
    run(cfg_for(tmp_path, "straight", steps=200, save_every=4, threads=1))
    token = ["--auth-token-file", str(pki / "token")]
    server = Server(tmp_path / "srv", [*_tls(pki), *token, "--steps", "200", "--save-every", "4"])
    client = [sys.executable, "-m", "hosl.train", "--transport", "grpc", "--server", f"localhost:{server.port}",
              "--tls-ca", str(pki / "ca"), *token, *RUN, "--steps", "200", "--save-every", "4",
              "--out", str(tmp_path / "run")]  # fmt: skip
    try:
        proc = subprocess.Popen([*client, "--timeout", "30"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoint-4" / "manifest.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint-4"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = subprocess.run([*client[:-2], "--resume", str(tmp_path / "run"), "--timeout", "30"],
                                 capture_output=True, text=True)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    finally:
        code, err = server.finish()
    assert code == 0, err
    assert _equal(straight / "client.safetensors", tmp_path / "run" / "client.safetensors")
    assert _equal(straight / "server.safetensors", tmp_path / "srv" / "server.safetensors")


def test_an_unreachable_server_and_bad_grpc_flags_are_one_line(tmp_path, capsys):
    argv = [
        "--transport",
        "grpc",
        "--server",
        "127.0.0.1:1",
        "--insecure",
        "--timeout",
        "2",
        "--out",
        str(tmp_path / "r"),
    ]
    start = time.monotonic()
    assert main(argv) == 1
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[0].startswith("warning: --insecure: plain text") and "could not reach the server at 127.0.0.1:1" in err[-1]
    )
    assert not (tmp_path / "r").exists()
    assert main(["--transport", "grpc", "--out", str(tmp_path / "r")]) == 2
    assert "needs --server HOST:PORT" in _last_line(capsys)
    assert main(["--server", "h:1", "--out", str(tmp_path / "r")]) == 2
    assert "--server is for --transport grpc" in _last_line(capsys)
    assert main(["--clients", "2", "--client-id", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--client-id is for --transport grpc" in _last_line(capsys)
    assert main(["--transport", "grpc", "--server", "h:1", "--clients", "2", "--client-id", "2"]) == 2
    assert "--client-id must be in [0, --clients 2), got 2" in _last_line(capsys)
    many = ["--transport", "grpc", "--server", "h:1", "--clients", "3", "--clients-per-round", "1"]
    assert main([*many, "--relay", "sampled", "--out", str(tmp_path / "r")]) == 2
    assert "drop --relay sampled" in _last_line(capsys)
    assert main([*many, "--save-every", "2", "--out", str(tmp_path / "r")]) == 2
    assert "a grpc client keeps no checkpoint" in _last_line(capsys)
    from hosl.serve import main as serve_main

    assert serve_main(["--listen", "127.0.0.1:0", "--out", str(tmp_path / "s")]) == 2
    assert "needs a shared secret" in _last_line(capsys)
    assert (
        serve_main(["--listen", "127.0.0.1:0", "--out", str(tmp_path / "s"), "--auth-token-file", "/nonexistent"]) == 2
    )
    assert "--auth-token-file" in _last_line(capsys)
    serve = ["--listen", "127.0.0.1:0", "--insecure"]
    assert serve_main([*serve, "--resume", str(tmp_path / "s")]) == 2
    assert "hosl.serve --resume is for --clients > 1" in _last_line(capsys)
    (tmp_path / "s" / "checkpoint-4").mkdir(parents=True)
    assert serve_main([*serve, "--clients", "2", "--out", str(tmp_path / "s")]) == 2
    assert f"--out {tmp_path / 's'} holds checkpoints of a run: --resume" in _last_line(capsys)


def test_bad_link_files_are_bad_input_and_a_lost_run_is_status_1(tmp_path, pki, capsys, monkeypatch):
    """A certificate that cannot be read, half a client pair and an address that cannot be listened on are
    bad input on both sides (one line, exit status 2, nothing written); clients lost while hosl.serve runs
    are status 1, as a lost peer is for hosl.train."""
    from hosl import serve
    from hosl.transport import LinkError

    token = ["--auth-token-file", str(pki / "token")]
    dial = ["--transport", "grpc", "--server", "127.0.0.1:1", *token, "--timeout", "2", "--out", str(tmp_path / "r")]
    assert main([*dial, "--tls-ca", str(tmp_path / "nothing")]) == 2
    assert f"cannot read --tls-ca {tmp_path / 'nothing'}" in _last_line(capsys)
    assert main([*dial, "--tls-ca", str(pki / "ca"), "--tls-cert", str(pki / "client.pem")]) == 2
    assert "a client certificate needs both --tls-cert and --tls-key" in _last_line(capsys)
    assert not (tmp_path / "r").exists()
    out = ["--out", str(tmp_path / "s")]
    missing = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(tmp_path / "nothing")]
    assert serve.main(["--listen", "127.0.0.1:0", *token, *missing, *out]) == 2
    assert f"cannot read --tls-key {tmp_path / 'nothing'}" in _last_line(capsys)
    assert serve.main(["--listen", "256.0.0.1:0", "--insecure", *out]) == 2
    assert "cannot listen on 256.0.0.1:0" in _last_line(capsys)

    def lost(cfg):
        raise LinkError("client 0 left at round 3 (--on-client-loss fail): gone")

    monkeypatch.setattr(serve, "serve_run", lost)
    assert serve.main(["--listen", "127.0.0.1:0", "--insecure", *out]) == 1
    assert "client 0 left at round 3" in _last_line(capsys)


@pytest.mark.slow
def test_hostile_streams_end_their_own_session_and_the_server_serves_on(tmp_path, pki):
    """Raw gRPC streams to hosl.serve: a message over the run's frame limit (refused by gRPC before it
    is read), bytes that are no handshake, a well-formed frame before the handshake: each ends its own
    session, the server says so in one line, and a client of the run then trains to the end."""
    token = ["--auth-token-file", str(pki / "token")]
    server = Server(tmp_path / "srv", [*token, "--insecure", "--steps", "2"])
    from hosl.boundary import Frame, Kind, encode_frame
    from hosl.grpc_link import METHOD

    try:
        hello = encode_frame(Frame(Kind.HELLO, meta={"protocol": 2})).numpy().tobytes()
        codes = []
        for message in (b"\0" * (64 << 20), b"not a handshake", hello):
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                call = channel.stream_stream(METHOD)(iter([message]))
                try:
                    list(call)  # the server's handshake message and ERROR frame, then the end of the stream
                    codes.append("ok")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
            assert server.proc.poll() is None
        # gRPC refuses the oversized message itself; the others get hosl's ERROR frame and the end
        assert codes == ["RESOURCE_EXHAUSTED", "ok", "ok"], codes
        argv = ["--transport", "grpc", "--server", f"127.0.0.1:{server.port}", "--insecure", *token, *RUN,
                "--steps", "2", "--out", str(tmp_path / "ok")]  # fmt: skip
        assert main(argv) == 0
    finally:
        code, err = server.finish()
    assert code == 0, err
    ended = [line for line in err.splitlines() if line.startswith("session ended")]
    assert len(ended) == 3, err


@pytest.mark.slow
def test_a_restarted_server_resumes_from_its_checkpoint(tmp_path, pki):
    """Both sides killed (SIGKILL) once checkpoint-4 is written; a new hosl.serve on the same --out and
    the client with --resume end with the bits of a run that never stopped."""
    straight = tmp_path / "straight"
    run(cfg_for(tmp_path, "straight", steps=200, save_every=4, threads=1))
    token = ["--auth-token-file", str(pki / "token")]
    server_flags = [*_tls(pki), *token, "--steps", "200", "--save-every", "4"]
    server = Server(tmp_path / "srv", server_flags)
    client = [sys.executable, "-m", "hosl.train", "--transport", "grpc", "--tls-ca", str(pki / "ca"), *token, *RUN,
              "--steps", "200", "--save-every", "4", "--timeout", "30"]  # fmt: skip
    proc = subprocess.Popen([*client, "--server", f"localhost:{server.port}", "--out", str(tmp_path / "run")],
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoint-4" / "manifest.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint-4"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        server.finish()
        server = Server(tmp_path / "srv", server_flags)
        resumed = subprocess.run([*client, "--server", f"localhost:{server.port}", "--resume", str(tmp_path / "run")],
                                 capture_output=True, text=True)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    finally:
        proc.kill()
        code, err = server.finish()
    assert code == 0, err
    assert _equal(straight / "client.safetensors", tmp_path / "run" / "client.safetensors")
    assert _equal(straight / "server.safetensors", tmp_path / "srv" / "server.safetensors")


# -- many clients: hosl.federation ------------------------------------------------------------------------

MANY = ["--clients", "3", "--eval-every", "0"]


def _client_cmd(port: int, pki, i: int, out: Path, steps: int, host: str = "localhost") -> list[str]:
    return [sys.executable, "-m", "hosl.train", "--transport", "grpc", "--server", f"{host}:{port}",
            "--tls-ca", str(pki / "ca"), "--auth-token-file", str(pki / "token"), *RUN, *MANY,
            "--steps", str(steps), "--client-id", str(i), "--timeout", "60", "--out", str(out)]  # fmt: skip


def _rounds_logged(run_dir: Path) -> int:
    path = run_dir / "zo_log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _wait(what, test, procs, limit=180) -> None:
    deadline = time.monotonic() + limit
    while not test():
        failed = [p.args[-1] for p in procs if p.poll() not in (None, 0)]
        assert not failed and time.monotonic() < deadline, f"waiting for {what}: failed {failed}"
        time.sleep(0.05)


def _digest(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["client_weights_sha256"]


@pytest.mark.slow
def test_three_grpc_clients_from_the_start_are_the_local_three_client_run(tmp_path, pki):
    """hosl.serve --clients 3 --min-clients 3 and three client processes over TLS: every client's weights
    and the server's are the bits of the same run with --clients 3 in one process (hosl.clients)."""
    local = run(cfg_for(tmp_path, "local", steps=6, threads=1, clients=3, eval_every=0))
    server = Server(tmp_path / "srv", [*_tls(pki), "--auth-token-file", str(pki / "token"), *MANY, "--steps", "6",
                                        "--min-clients", "3"])  # fmt: skip
    procs = []
    try:
        for i in range(3):
            cmd = [*_client_cmd(server.port, pki, i, tmp_path / f"c{i}", 6), "--min-clients", "3"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for p in procs:
            assert p.wait(timeout=180) == 0, p.stderr.read()[-2000:]
    finally:
        for p in procs:
            p.kill()
        code, err = server.finish()
    assert code == 0, err
    assert {_digest(tmp_path / f"c{i}") for i in range(3)} == {local["client_weights_sha256"]}
    assert _equal(tmp_path / "local" / "server.safetensors", tmp_path / "srv" / "server.safetensors")


@pytest.mark.slow
def test_clients_join_late_drop_and_come_back_and_all_end_with_the_same_weights(tmp_path, pki):
    """One long-lived server, three client processes: client 1's connection is cut mid-run (it dials again
    in the same process), client 2 starts late, client 0 is killed and started again from nothing. The
    run never stops; every client ends with the same weights, which hosl.replay rebuilds from each one's
    log of rounds, and the server's log names who joined and left."""
    from _procs import Proxy

    from hosl.replay import main as replay

    steps = 60
    token = ["--auth-token-file", str(pki / "token")]
    server = Server(tmp_path / "srv", [*_tls(pki), *token, *MANY, "--steps", str(steps), "--min-clients", "2",
                                        "--timeout", "60"])  # fmt: skip
    proxy = Proxy(server.port)
    cmd = {i: [*_client_cmd(server.port, pki, i, tmp_path / f"c{i}", steps), "--min-clients", "2"] for i in range(3)}
    cmd[1] = [*_client_cmd(proxy.port, pki, 1, tmp_path / "c1", steps), "--min-clients", "2"]  # through the proxy

    def start(c):
        return subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    procs = {0: start(cmd[0]), 1: start(cmd[1])}
    try:
        _wait("client 1's fifth round", lambda: _rounds_logged(tmp_path / "c1") >= 5, procs.values())
        assert proxy.cut() >= 1
        # Late: client 2 catches up from the server's log. Client 0 is paused meanwhile, so the rounds wait for
        # it (up to --timeout) instead of running out before client 2 has started.
        procs[0].send_signal(signal.SIGSTOP)
        procs[2] = start(cmd[2])
        _wait("client 2's catching up", lambda: _rounds_logged(tmp_path / "c2") >= 5, procs.values())
        procs[0].send_signal(signal.SIGCONT)
        _wait("client 2's first rounds", lambda: _rounds_logged(tmp_path / "c2") >= 12, procs.values())
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        procs["0b"] = start([*cmd[0], "--out", str(tmp_path / "c0b")])  # the same client, started afresh
        for name, p in procs.items():
            if name != 0:
                assert p.wait(timeout=300) == 0, (name, p.stderr.read()[-3000:])
    finally:
        for p in procs.values():
            p.kill()
        proxy.close()
        code, err = server.finish()
    assert code == 0, err
    digests = {name: _digest(tmp_path / name) for name in ("c0b", "c1", "c2")}
    assert len(set(digests.values())) == 1, digests
    assert json.loads((tmp_path / "c1" / "summary.json").read_text())["rejoined"] >= 1
    assert "client 0 left" in err and "client 2 joined" in err, err
    for name in digests:
        assert replay([str(tmp_path / name)]) == 0


@pytest.mark.slow
def test_a_restarted_many_client_server_resumes_and_new_clients_catch_up(tmp_path, pki):
    """hosl.serve --clients 2 --save-every 4 and both clients killed (SIGKILL) once checkpoint-4 is written;
    the server started again with --resume and two clients started afresh (new --out) that catch up from
    its restored log of rounds. Server and clients end with the bits of --clients 2 in one process that
    never stopped."""
    steps = 12
    local = run(cfg_for(tmp_path, "local", steps=steps, threads=1, clients=2, eval_every=0))
    many = ["--clients", "2", "--eval-every", "0", "--steps", str(steps), "--min-clients", "2"]
    flags = [*_tls(pki), "--auth-token-file", str(pki / "token"), *many, "--save-every", "4"]
    server = Server(tmp_path / "srv", flags)

    def client(i, out):
        cmd = [*_client_cmd(server.port, pki, i, tmp_path / out, steps), *many]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    procs = [client(0, "c0"), client(1, "c1")]
    try:
        _wait("the server's checkpoint-4", lambda: (tmp_path / "srv" / "checkpoint-4" / "manifest.json").exists(),
              procs)  # fmt: skip
        for p in [server.proc, *procs]:
            p.send_signal(signal.SIGKILL)
        server.finish()
        server = Server(tmp_path / "srv", [*flags, "--resume", str(tmp_path / "srv")])
        procs = [client(0, "c0b"), client(1, "c1b")]
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    finally:
        for p in procs:
            p.kill()
        code, err = server.finish()
    assert code == 0, err
    assert "resuming the run" in err
    assert {_digest(tmp_path / "c0b"), _digest(tmp_path / "c1b")} == {local["client_weights_sha256"]}
    assert _equal(tmp_path / "local" / "server.safetensors", tmp_path / "srv" / "server.safetensors")
