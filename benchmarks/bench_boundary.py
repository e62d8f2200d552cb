"""Frame encode + decode: hosl.boundary against torch.save/torch.load and pickle, on activation-sized tensors.

What is measured (bench field "roundtrip"; one record per case and method):

* hosl-raw, hosl-fp16, hosl-bf16, hosl-int8: decode_frame(encode_frame(Frame(Kind.ACT, tensors={"act": x}),
  compression)) with compression None, "fp16", "bf16", "int8". Both calls return fresh memory, as the
  library does by default.
* hosl-raw-mac: hosl-raw with the dist link's frame MAC of an authenticated session (hosl.auth):
  the sender's HMAC-SHA256 tag after the encode, the receiver's check before the decode.
* hosl-raw-out: the same as hosl-raw, encoding into one send buffer reused across calls
  (encode_frame(..., out=buffer)), as a transport would; it saves the page faults of fresh memory.
* hosl-grpc-tls, hosl-grpc-plain: a frame across the grpc transport over loopback, as a session carries
  it: the client link's send (encode, MAC, into the stream) and the server link's receive (gRPC over
  TLS 1.3 with a certificate made here, or plain text; the MAC checked; the decode), timed from the
  send to the received tensor. Needs grpcio and cryptography (pip install '.[test]'); left out
  without them.
* torch.save: torch.save(x, io.BytesIO()) and .getvalue(); torch.load(io.BytesIO(data), weights_only=True).
* pickle: pickle.dumps(x, protocol=5); pickle.loads(data).
* copy: x.clone(), one read and one write of x (fresh memory): what one pass over the data costs here.

Cases: float32 activations, batch x seq x hidden = 16x128x768, 32x256x1024 and 64x512x2048 (6, 32 and
256 MiB); --quick: 4x32x64 and 16x128x768.

GB/s = bytes of x / median (encode + decode) seconds, for every method (copy: / median clone seconds).
wire = bytes of the encoded form. err/absmax = max |x - x_hat| / max |x| for the lossy modes; the exact
methods' outputs are checked equal to x.

Timing: time.perf_counter around the encode and around the decode of each round trip, WARMUP untimed
round trips first, then --repeats timed ones; median and min of the totals. Methods run one after the
other. hosl's byte work (copies, casts, CRC) runs on one thread; torch.save/load and clone may use
torch's intra-op threads (the threads field of each record).

Run from the repository root:

    python benchmarks/bench_boundary.py --quick    # a few seconds
    python benchmarks/bench_boundary.py            # full sizes, about a minute on 2 cores; use an idle machine

Writes one JSON object per measurement to benchmarks/results/bench_boundary.jsonl (--quick:
bench_boundary_quick.jsonl), overwritten each run, and prints a table to stdout (progress to stderr).
"""

from __future__ import annotations

import io
import pickle
import statistics
import time
from pathlib import Path

import torch
from _common import MIB, Recorder, bench_parser, cpu_name, environment, given, log, print_table

import hosl
from hosl.auth import FrameMac
from hosl.boundary import Frame, Kind, decode_frame, encode_frame

WARMUP = 2
SEED = 20240601
SHAPES = [(16, 128, 768), (32, 256, 1024), (64, 512, 2048)]
QUICK_SHAPES = [(4, 32, 64), (16, 128, 768)]
BASELINE = "torch.save"


def wire_bytes(wire):
    if isinstance(wire, int):  # bytes a link sent
        return wire
    if isinstance(wire, tuple):  # (frame, MAC)
        return wire[0].numel() + len(wire[1])
    return wire.numel() if isinstance(wire, torch.Tensor) else len(wire)


def methods(x):
    """name -> (encode() -> wire, decode(wire) -> tensor, exact)."""
    frame = Frame(Kind.ACT, tensors={"act": x})
    send_buffer = encode_frame(frame).clone()  # the right size for the raw frame, pages already touched

    def with_hosl(compression, out=None):
        return lambda: encode_frame(frame, compression, out=out), lambda w: decode_frame(w).tensors["act"]

    def torch_save():
        buf = io.BytesIO()
        torch.save(x, buf)
        return buf.getvalue()

    table = {f"hosl-{c or 'raw'}": (*with_hosl(c), c is None) for c in (None, "fp16", "bf16", "int8")}
    sender, receiver = FrameMac(bytes(32), "client", "server"), FrameMac(bytes(32), "server", "client")

    def encode_mac():
        wire = encode_frame(frame)
        return wire, sender.tag(wire.numpy())

    def decode_mac(pair):
        receiver.check(pair[0].numpy(), pair[1])
        return decode_frame(pair[0]).tensors["act"]

    table["hosl-raw-mac"] = (encode_mac, decode_mac, True)
    table["hosl-raw-out"] = (*with_hosl(None, send_buffer), True)
    for tls in (True, False):
        pair = grpc_pair(tls)
        if pair is not None:
            table[f"hosl-grpc-{'tls' if tls else 'plain'}"] = (*pair.methods(frame), True)
    table[BASELINE] = (torch_save, lambda w: torch.load(io.BytesIO(w), weights_only=True), True)
    table["pickle"] = (lambda: pickle.dumps(x, protocol=5), pickle.loads, True)
    return table


class GrpcPair:
    """Both ends of an authenticated grpc session over loopback (hosl.grpc_link)."""

    def __init__(self, tls: bool, directory: Path):
        import queue
        import threading

        from hosl.grpc_link import TLS, dial, serve

        secret, ends, self.done = bytes(range(32)), queue.Queue(), threading.Event()

        def handler(link):
            link.authenticate(secret)
            ends.put(link)
            self.done.wait()

        cert, key = self_signed(directory) if tls else (None, None)
        self.server = serve(handler, "127.0.0.1:0", TLS(cert=cert, key=key) if tls else None, 120,
                            max_frame_bytes=1 << 30)  # fmt: skip
        self.client = dial(f"localhost:{self.server.port}", TLS(ca=cert) if tls else None, 120)
        self.client.authenticate(secret)
        self.server_end = ends.get(timeout=120)
        self.server_end.max_frame_bytes = 1 << 30

    def methods(self, frame):
        def send():
            before = self.client.bytes_sent
            self.client.send(frame)
            return self.client.bytes_sent - before

        return send, lambda _: self.server_end.recv().tensors["act"]

    def close(self):
        self.done.set()
        self.client.close()
        self.server.stop(0)


_PAIRS: list[GrpcPair] = []


def grpc_pair(tls: bool) -> GrpcPair | None:
    """A session to time frames over, or None without grpcio (and cryptography, for TLS)."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("grpc") is None or (tls and importlib.util.find_spec("cryptography") is None):
        log(f"  grpc-{'tls' if tls else 'plain'}: left out (pip install '.[test]' for grpcio and cryptography)")
        return None
    pair = GrpcPair(tls, Path(tempfile.mkdtemp(prefix="hosl-bench-tls-")))
    _PAIRS.append(pair)
    return pair


def self_signed(directory: Path) -> tuple[str, str]:
    """A self-signed certificate for localhost and its key (PEM files in directory)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def time_round_trips(encode, decode, repeats):
    """Median encode, decode and total seconds and the min total, over `repeats` timed round trips."""
    for _ in range(WARMUP):
        decode(encode())
    enc, dec, total = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        wire = encode()
        t1 = time.perf_counter()
        out = decode(wire)
        t2 = time.perf_counter()
        del wire, out  # freed before the next round, as a steady stream of frames would
        enc.append(t1 - t0)
        dec.append(t2 - t1)
        total.append(t2 - t0)
    return statistics.median(enc), statistics.median(dec), statistics.median(total), min(total)


def time_copy(x, repeats):
    for _ in range(WARMUP):
        x.clone()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = x.clone()
        times.append(time.perf_counter() - t0)
        del y
    return statistics.median(times), min(times)


def measure(rec, device, shape, repeats):
    case = "x".join(map(str, shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    nbytes = x.numel() * x.element_size()
    common = {"bench": "roundtrip", "case": case, "shape": list(shape), "dtype": "float32", "orig_bytes": nbytes}
    for name, (encode, decode, exact) in methods(x).items():
        log(f"  {case} {name} ...")
        wire = encode()
        got = decode(wire)
        if exact and not torch.equal(got, x):
            raise AssertionError(f"{name} did not give x back exactly")
        err = (got - x).abs().max().item() / x.abs().max().item()
        size = wire_bytes(wire)
        del wire, got
        enc_s, dec_s, median_s, min_s = time_round_trips(encode, decode, repeats)
        rec.add(
            device,
            **common,
            method=name,
            wire_bytes=size,
            encode_median_s=enc_s,
            decode_median_s=dec_s,
            median_s=median_s,
            min_s=min_s,
            gbytes_per_s=nbytes / median_s / 1e9,
            max_err_over_absmax=err,
            timer="time.perf_counter",
            repeats=repeats,
        )
    median_s, min_s = time_copy(x, repeats)
    rec.add(
        device,
        **common,
        method="copy",
        wire_bytes=None,
        encode_median_s=None,
        decode_median_s=None,
        median_s=median_s,
        min_s=min_s,
        gbytes_per_s=nbytes / median_s / 1e9,
        max_err_over_absmax=0.0,
        timer="time.perf_counter",
        repeats=repeats,
    )


def fmt_ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def report(records):
    header = [
        "case",
        "MiB",
        "method",
        "wire MiB",
        "wire/x",
        "encode ms",
        "decode ms",
        "total ms",
        "GB/s",
        f"vs {BASELINE}",
        "err/absmax",
    ]
    rows = []
    for case in dict.fromkeys(r["case"] for r in records):
        mine = [r for r in records if r["case"] == case]
        base = next(r for r in mine if r["method"] == BASELINE)
        for r in mine:
            rows.append(
                [
                    case,
                    f"{r['orig_bytes'] / MIB:.1f}",
                    r["method"],
                    "-" if r["wire_bytes"] is None else f"{r['wire_bytes'] / MIB:.2f}",
                    "-" if r["wire_bytes"] is None else f"{r['wire_bytes'] / r['orig_bytes']:.3f}",
                    fmt_ms(r["encode_median_s"]),
                    fmt_ms(r["decode_median_s"]),
                    fmt_ms(r["median_s"]),
                    f"{r['gbytes_per_s']:.2f}",
                    "-" if r["method"] == "copy" else f"{base['median_s'] / r['median_s']:.2f}x",
                    f"{r['max_err_over_absmax']:.1e}" if r["max_err_over_absmax"] else "0",
                ]
            )
    print_table(header, rows, numeric=[False, True, False] + [True] * 8)


def main(argv=None):
    parser = bench_parser(__doc__, "two small cases (a few seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed round trips per method (7; --quick: 5)")
    args = parser.parse_args(argv)
    repeats = given(args.repeats, 5 if args.quick else 7)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1; got {repeats}")

    env = environment()
    device = torch.device("cpu")  # frames are built and read on the CPU; CUDA tensors are copied there first
    print(f"bench_boundary{' --quick' if args.quick else ''}: hosl frames vs torch.save/torch.load and pickle")
    print(f"CPU: {cpu_name()}, {env['threads']} torch threads; hosl's byte work on 1 thread")
    print(
        f"torch {env['torch']}, hosl {env['hosl']} ({Path(hosl.__file__).parent}), git {env['git_sha']}; "
        f"median of {repeats} round trips after {WARMUP} warm-up"
    )
    print()
    path = args.out / ("bench_boundary_quick.jsonl" if args.quick else "bench_boundary.jsonl")
    rec = Recorder(path, env)
    try:
        for shape in QUICK_SHAPES if args.quick else SHAPES:
            measure(rec, device, shape, repeats)
    finally:
        for pair in _PAIRS:
            pair.close()
    report(rec.records)
    print(f"\n{len(rec.records)} records written to {path}")


if __name__ == "__main__":
    main()
