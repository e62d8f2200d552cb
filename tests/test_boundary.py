"""hosl.boundary vs its contract: exact round trips, torch casts and error bounds, CRC vectors, FrameError, FIFO."""

import math
import os
import platform
import random
import struct
import threading
import time

import numpy as np
import pytest
import torch

from hosl import _ext, boundary
from hosl.boundary import Frame, FrameError, FrameQueue, Kind, decode_frame, encode_frame

_C = _ext._C
pytestmark = pytest.mark.skipif(_C is None, reason=f"hosl._C did not load: {_ext.load_error}")

DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "i16": torch.int16,
    "i32": torch.int32,
    "i64": torch.int64,
    "bool": torch.bool,
}
FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BITS = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
SHAPES = [(), (0,), (1,), (7,), (4099,), (3, 5), (13, 0, 3), (2, 3, 17), (31, 127), (1, 1, 1, 1)]
FLT_MIN = torch.finfo(torch.float32).tiny
INT8_SLACK = 0.5 + 2**-16  # the documented bound, in units of the row's scale


def shape_id(shape):
    return "x".join(map(str, shape)) or "scalar"


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype in FLOATING:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def assert_identical(got, want):
    """Same dtype, shape and bits (nan included), and a contiguous CPU tensor."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert got.device.type == "cpu" and got.is_contiguous()
    if want.dtype in BITS:
        got, want = got.view(BITS[want.dtype]), want.contiguous().view(BITS[want.dtype])
    assert torch.equal(got, want.contiguous())


def round_trip(frame, compression=None):
    return decode_frame(encode_frame(frame, compression))


def forge(buf):
    """A bytearray of a frame with its CRC recomputed: the frame a careless or hostile sender would make."""
    buf = bytearray(buf)
    buf[36:40] = bytes(4)
    struct.pack_into("<I", buf, 36, boundary.crc32c(bytes(buf)))
    return buf


def crc32c_bitwise(data, crc=0):
    """CRC-32C one bit at a time, straight from the definition (reflected polynomial 0x82F63B78)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------------------- exact round trips


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_round_trip_exact(dtype, shape):
    x = make(shape, dtype, seed=len(shape))
    got = round_trip(Frame(Kind.ACT, tensors={"x": x}))
    assert list(got.tensors) == ["x"]
    assert_identical(got.tensors["x"], x)


@pytest.mark.parametrize("dtype", FLOATING, ids=["fp32", "fp64", "fp16", "bf16"])
def test_round_trip_special_values(dtype):
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3.5], dtype=torch.float64)
    x = x.to(dtype)
    assert_identical(round_trip(Frame(Kind.ACT, tensors={"x": x})).tensors["x"], x)


def test_non_contiguous_inputs_are_sent_as_copies():
    base = torch.randn(6, 10, 4)
    column = torch.randn(5, 1)
    cases = {  # name: (what is sent, what must come back)
        "transposed": (base.transpose(0, 2), base.transpose(0, 2).contiguous()),
        "strided": (base[::2, 1::3], base[::2, 1::3].contiguous()),
        "expanded": (column.expand(5, 7), column.repeat(1, 7)),
        "offset": (base.view(-1)[3:50], base.view(-1)[3:50].clone()),
        "negative-view": (torch._neg_view(base), -base),  # lazily negated: the bytes hold +base
    }
    got = round_trip(Frame(Kind.ACT, tensors={k: v[0] for k, v in cases.items()})).tensors
    for name, (_, want) in cases.items():
        assert_identical(got[name], want)


def test_large_and_many_tensors_round_trip():
    tensors = {f"t{i}": make((i + 1, 257), DTYPES[k], seed=i) for i, k in enumerate(DTYPES)}
    tensors["act"] = torch.randn(8, 512, 257)
    got = round_trip(Frame(Kind.ACT, tensors=tensors))
    assert list(got.tensors) == list(tensors)
    for name, t in tensors.items():
        assert_identical(got.tensors[name], t)


def test_requires_grad_tensor_is_detached():
    x = torch.randn(3, 4, requires_grad=True)
    got = round_trip(Frame(Kind.GRAD, tensors={"x": x * 2})).tensors["x"]
    assert not got.requires_grad and torch.equal(got, x.detach() * 2)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.name)
def test_header_fields_and_meta_round_trip(kind):
    meta = {"config_hash": "9f2c", "lr": 1e-6, "layers": [1, 2, 3], "nested": {"ok": True, "none": None}, "ü": "✓"}
    for step, probe, sign, client in [(0, 0, 0, 0), (2**64 - 1, 2**32 - 1, -1, 2**32 - 1), (12345, 7, 1, 3)]:
        frame = Frame(
            kind, step=step, probe=probe, sign=sign, client_id=client, tensors={"": torch.ones(2)}, meta=meta
        )
        got = round_trip(frame)
        assert (got.kind, got.step, got.probe, got.sign, got.client_id) == (kind, step, probe, sign, client)
        assert isinstance(got.kind, Kind) and got.meta == meta and list(got.tensors) == [""]


def test_meta_comes_back_as_json_gives_it():
    got = round_trip(Frame(Kind.HELLO, meta={"shape": (2, 3), 5: "five"}))
    assert got.meta == {"shape": [2, 3], "5": "five"} and got.tensors == {}


def test_tensor_order_and_unicode_names_kept():
    names = ["zeta", "alpha", "λ-layer.3", "labels", "🙂"]
    frame = Frame(Kind.BATCH, tensors={n: torch.tensor([i]) for i, n in enumerate(names)})
    assert list(round_trip(frame).tensors) == names


def test_empty_frame():
    buf = encode_frame(Frame(Kind.CONTROL))
    assert buf.numel() == boundary.HEADER_BYTES
    got = decode_frame(buf)
    assert got.kind == Kind.CONTROL and got.tensors == {} and got.meta == {}


@pytest.mark.parametrize("form", ["tensor", "bytes", "bytearray", "memoryview"])
def test_decode_accepts_buffers_and_returns_owned_tensors(form):
    x = torch.randn(4, 33)
    frame_bytes = encode_frame(Frame(Kind.ACT, tensors={"x": x}, meta={"a": 1}))
    raw = bytearray(frame_bytes.numpy().tobytes())
    buf = {
        "tensor": frame_bytes,
        "bytes": bytes(raw),
        "bytearray": raw,
        "memoryview": memoryview(raw),
    }[form]
    got = decode_frame(buf)
    raw[:] = bytes(len(raw))  # the caller reuses its buffer
    frame_bytes.zero_()
    assert torch.equal(got.tensors["x"], x) and got.meta == {"a": 1}


def test_encode_into_out_buffer():
    frame = Frame(Kind.ACT, tensors={"x": torch.randn(3, 50)})
    want = encode_frame(frame, "int8")
    out = torch.full((want.numel() + 100,), 0xAB, dtype=torch.uint8)
    got = encode_frame(frame, "int8", out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
    with pytest.raises(ValueError, match=f"needs {want.numel()}"):
        encode_frame(frame, "int8", out=torch.empty(want.numel() - 1, dtype=torch.uint8))


def test_encoding_is_deterministic_over_garbage_memory():
    """Every byte of a frame is written (padding included), whatever the fresh memory held."""
    frame = Frame(Kind.ACT, tensors={"a": torch.randn(3), "bb": torch.arange(5, dtype=torch.int16)}, meta={"k": 1})
    want = encode_frame(frame, "int8")
    for fill in (0x00, 0xFF, 0x5A):
        out = torch.full_like(want, fill)
        assert torch.equal(encode_frame(frame, "int8", out=out), want)


@pytest.mark.gpu
def test_cuda_tensors_are_copied_to_cpu():
    x = torch.randn(5, 7, device="cuda")
    got = round_trip(Frame(Kind.ACT, tensors={"x": x}), "bf16").tensors["x"]
    assert got.device.type == "cpu" and torch.equal(got, x.cpu().bfloat16().float())
    assert torch.equal(decode_frame(encode_frame(Frame(Kind.ACT, tensors={"x": x})).cuda()).tensors["x"], x.cpu())


def test_layout_matches_the_documented_table():
    """Parses a frame by hand from the module docstring's table, independently of decode_frame."""
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    frame = Frame(Kind.GRAD, step=77, probe=5, sign=-1, client_id=9, tensors={"x": x}, meta={"m": 1})
    buf = encode_frame(frame, "int8").numpy().tobytes()
    assert buf[0:4] == b"HOSL"
    assert struct.unpack_from("<HBbIIQIIIIQ", buf, 4) == (1, 5, -1, 0, 9, 77, 5, 1, 7, crc_of(buf), len(buf) - 48)
    assert buf[48:55] == b'{"m":1}' and buf[55:56] == b"\0"
    assert struct.unpack_from("<HBBIQ", buf, 56) == (1, 1, 3, 2, 6)  # name 1 byte, float32, int8, 2-D, 6 bytes
    assert struct.unpack_from("<2Q", buf, 72) == (2, 3) and buf[88:89] == b"x" and buf[89:96] == bytes(7)
    q = np.frombuffer(buf, dtype=np.int8, count=6, offset=96).reshape(2, 3)
    scales = np.frombuffer(buf, dtype=np.float32, count=2, offset=104)
    want_scales = np.float32([2, 5]) / np.float32(127)
    np.testing.assert_array_equal(scales, want_scales)
    np.testing.assert_array_equal(q, np.round(x.numpy() / want_scales[:, None]))  # float32, ties to even
    assert buf[102:104] == bytes(2) and len(buf) == 112


def crc_of(buf):
    return crc32c_bitwise(buf[:36] + bytes(4) + buf[40:])


# ----------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"kind": 0}, ValueError, "kind must be one of"),
        ({"kind": Kind.ACT, "step": -1}, ValueError, "step"),
        ({"kind": Kind.ACT, "step": 2**64}, ValueError, "step"),
        ({"kind": Kind.ACT, "probe": 2**32}, ValueError, "probe"),
        ({"kind": Kind.ACT, "client_id": 1.5}, ValueError, "client_id"),
        ({"kind": Kind.ACT, "sign": 2}, ValueError, "sign"),
        ({"kind": Kind.ACT, "tensors": [torch.ones(1)]}, TypeError, "tensors"),
        ({"kind": Kind.ACT, "meta": "x"}, TypeError, "meta"),
    ],
)
def test_bad_frame_fields(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Frame(**kwargs)


def test_bad_tensors_and_meta_rejected_at_encode():
    def enc(compression=None, **kw):
        return encode_frame(Frame(Kind.ACT, **kw), compression)

    with pytest.raises(ValueError, match="unsupported dtype torch.complex64"):
        enc(tensors={"z": torch.ones(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="unsupported dtype torch.uint16"):
        enc(tensors={"u": torch.ones(2, dtype=torch.uint16)})
    with pytest.raises(ValueError, match="compression must be one of"):
        enc("fp8", tensors={"x": torch.ones(2)})
    with pytest.raises(TypeError, match="names must be strings"):
        enc(tensors={3: torch.ones(2)})
    with pytest.raises(ValueError, match="at most 65535"):
        enc(tensors={"n" * 65536: torch.ones(2)})
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        enc(tensors={"x": [1.0]})
    with pytest.raises(ValueError, match="dense"):
        enc(tensors={"s": torch.eye(3).to_sparse()})
    with pytest.raises(ValueError, match="dimensions"):
        enc(tensors={"d": torch.ones([1] * 65)})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        enc(meta={"s": {1, 2}})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        enc(meta={"x": float("nan")})
    with pytest.raises(ValueError, match="at most"):
        enc(meta={"big": "x" * boundary.MAX_META_BYTES})
    with pytest.raises(ValueError, match="max_bytes"):
        decode_frame(enc(), max_bytes=10)
    with pytest.raises(TypeError, match="uint8"):
        decode_frame(torch.zeros(64, dtype=torch.int32))


def test_without_the_extension_encode_and_decode_say_why(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "load_error", "ImportError: simulated")
    with pytest.raises(_ext.ExtensionUnavailableError, match="hosl.boundary.*simulated"):
        encode_frame(Frame(Kind.ACT))
    with pytest.raises(_ext.ExtensionUnavailableError, match="simulated"):
        decode_frame(b"")
    with pytest.raises(_ext.ExtensionUnavailableError, match="FrameQueue"):
        FrameQueue(2, 64)


# ------------------------------------------------------------------------------------ compression


def spread_floats(n, seed, low=-30, high=4.5):
    """float32 values spread over many binades (log-uniform magnitudes, random signs), with zeros."""
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = (mag * sign).float()
    x[:: max(1, n // 50)] = 0.0
    return x


@pytest.mark.parametrize("compression,wire", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp16_bf16_equal_torch_casts_and_bounds(compression, wire):
    x = spread_floats(200_003, seed=1, high=4.8 if wire == torch.float16 else 38)
    if wire == torch.float16:
        x = x.clamp(-65519.0, 65519.0)
    got = round_trip(Frame(Kind.ACT, tensors={"x": x}), compression).tensors["x"]
    assert_identical(got, x.to(wire).float())
    err = (got.double() - x.double()).abs()
    a = x.double().abs()
    if wire == torch.float16:
        normal = (a >= 2**-14) & (a <= 65504)
        assert (err[normal] <= 2**-11 * a[normal]).all()
        assert (err[a < 2**-14] <= 2**-25).all()
    else:
        normal = a >= 2**-126
        assert (err[normal] <= 2**-8 * a[normal]).all()
        assert (err[~normal] <= 2**-134).all()


@pytest.mark.parametrize("compression,wire", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp16_bf16_float64_goes_through_float32(compression, wire):
    x = spread_floats(10_007, seed=2, high=4.5).double() * (1 + 1e-9)
    got = round_trip(Frame(Kind.ACT, tensors={"x": x}), compression).tensors["x"]
    assert_identical(got, x.float().to(wire).double())


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_half_tensors_are_sent_as_they_are(compression):
    x = {"h": torch.randn(100).half(), "b": torch.randn(100).bfloat16()}
    frame = Frame(Kind.ACT, tensors=x)
    assert encode_frame(frame, compression).numel() == encode_frame(frame).numel()
    got = round_trip(frame, compression).tensors
    assert_identical(got["h"], x["h"])
    assert_identical(got["b"], x["b"])


def test_fp16_overflow_raises_and_specials_pass():
    ok = torch.tensor([65504.0, -65519.99, float("inf"), -float("inf"), float("nan"), -0.0, 6e-8])
    got = round_trip(Frame(Kind.ACT, tensors={"x": ok}), "fp16").tensors["x"]
    assert_identical(got[torch.arange(7) != 4], ok.half().float()[torch.arange(7) != 4])
    assert torch.isnan(got[4])
    for bad, index in [(65520.0, 3), (-1e6, 0), (3e38, 8)]:
        x = torch.zeros(11)
        x[index] = bad
        with pytest.raises(ValueError, match=rf"tensor 'act': value .* at flat index {index} overflows float16"):
            encode_frame(Frame(Kind.ACT, tensors={"act": x}), "fp16")


def test_bf16_overflow_raises():
    fmax = torch.finfo(torch.float32).max
    assert torch.isinf(torch.tensor(fmax).bfloat16())
    with pytest.raises(ValueError, match="flat index 1 overflows bfloat16"):
        encode_frame(Frame(Kind.ACT, tensors={"x": torch.tensor([1.0, fmax])}), "bf16")
    with pytest.raises(ValueError, match="overflows bfloat16"):  # finite in float64, inf in float32
        encode_frame(Frame(Kind.ACT, tensors={"x": torch.tensor([1e300], dtype=torch.float64)}), "bf16")
    with pytest.raises(ValueError, match="overflows float16"):
        encode_frame(Frame(Kind.ACT, tensors={"x": torch.tensor([1e300], dtype=torch.float64)}), "fp16")


def int8_reference(x):
    """The documented int8 recipe in torch float32: per-row scale, round half to even, dequantise."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, torch.clamp(amax / 127, min=FLT_MIN), torch.zeros_like(amax))
    q = torch.where(scale > 0, torch.round(x32 / torch.where(scale > 0, scale, 1)), 0).clamp(-127, 127)
    q = q.to(torch.int8).float()  # the byte on the wire: a -0.0 from round() comes back as +0.0
    return (q * scale).to(x.dtype), scale


def int8_rows(rows, cols, seed):
    """Rows of very different scales: log-uniform row magnitudes, an all-zero row, a one-spike row,
    a row of subnormals, a row at the top of float32's range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x *= 10 ** (torch.rand(rows, 1, generator=g, dtype=torch.float64) * 60 - 30)
    x = x.float()
    x[0] = 0
    x[1] = 0
    x[1, cols // 2] = -3.0
    x[2] = torch.randn(cols, generator=g) * 1e-41
    x[3] = torch.randn(cols, generator=g).sign() * 3e38
    return x


@pytest.mark.parametrize("cols", [1 << 10, 131, 2])
def test_int8_matches_reference_and_bound(cols):
    x = int8_rows(97, cols, seed=cols)
    got = round_trip(Frame(Kind.ACT, tensors={"x": x}), "int8").tensors["x"]
    want, scale = int8_reference(x)
    assert_identical(got, want)
    err = (got.double() - x.double()).abs()
    assert (err <= scale.double() * INT8_SLACK).all()
    assert (got[0] == 0).all() and got[1, cols // 2] == -3.0 and (got[1].count_nonzero() == 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"])
def test_int8_other_float_dtypes(dtype):
    x = (torch.randn(40, 300, dtype=torch.float64) * torch.logspace(-3, 3, 40, dtype=torch.float64)[:, None]).to(dtype)
    got = round_trip(Frame(Kind.ACT, tensors={"x": x}), "int8").tensors["x"]
    want, scale = int8_reference(x)
    assert_identical(got, want)
    # The final rounding into the dtype: half an ulp, relative in the normal range, absolute below.
    out_ulp, out_sub = {torch.float16: (2**-11, 2**-25), torch.bfloat16: (2**-8, 2**-134), torch.float64: (0, 0)}[
        dtype
    ]
    in_round = 2**-24 if dtype == torch.float64 else 0
    bound = scale.double() * INT8_SLACK + out_ulp * got.double().abs() + out_sub + in_round * x.double().abs()
    assert ((got.double() - x.double()).abs() <= bound).all()


def test_int8_sizes_and_what_stays_raw():
    x = torch.randn(64, 256)
    sizes = {c: encode_frame(Frame(Kind.ACT, tensors={"x": x}), c).numel() for c in boundary.COMPRESSIONS}
    head = 48 + 16 + 2 * 8 + 8  # header, descriptor, shape, name padded
    assert sizes[None] == head + 64 * 256 * 4
    assert sizes["fp16"] == sizes["bf16"] == head + 64 * 256 * 2
    assert sizes["int8"] == head + 64 * 256 + 64 * 4
    # 0-dim and rows too short to gain go raw, exactly.
    for t in (torch.tensor(1.2345), torch.randn(50, 1), torch.randn(0, 4)):
        frame = Frame(Kind.LOSS, tensors={"t": t})
        assert encode_frame(frame, "int8").numel() == encode_frame(frame).numel()
        assert_identical(round_trip(frame, "int8").tensors["t"], t)
    bf = torch.randn(50, 5).bfloat16()  # 1 + 4/5 bytes an element < 2: quantised
    assert not torch.equal(round_trip(Frame(Kind.ACT, tensors={"b": bf}), "int8").tensors["b"], bf)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_int8_non_finite_row_raises(bad):
    x = torch.randn(5, 8)
    x[3, 2] = bad
    with pytest.raises(ValueError, match="tensor 'h': row 3 holds inf or nan"):
        encode_frame(Frame(Kind.ACT, tensors={"h": x}), "int8")
    with pytest.raises(ValueError, match=r"row 0 holds inf or nan \(as float32\)"):
        encode_frame(Frame(Kind.ACT, tensors={"h": torch.tensor([[1e300, 1.0]], dtype=torch.float64)}), "int8")


@pytest.mark.parametrize("compression", boundary.COMPRESSIONS)
def test_integer_and_bool_tensors_exact_under_every_compression(compression):
    tensors = {k: make((3, 41), d, seed=5) for k, d in DTYPES.items() if d not in FLOATING}
    tensors["labels"] = torch.randint(-100, 50_000, (4, 128))
    got = round_trip(Frame(Kind.BATCH, tensors=tensors), compression).tensors
    for name, t in tensors.items():
        assert_identical(got[name], t)


def wire_form(x, encoding, portable):
    """One tensor's wire bytes and CRC through _C.encode_tensor, on the portable or the native path."""
    frame = torch.zeros(2 * x.numel() + 8, dtype=torch.uint8)
    crc = _C.encode_tensor(
        frame.data_ptr(), frame.numel(), 0, 0, 0, encoding, x.data_ptr(), 1, x.numel(), 0, 0, portable
    )
    return frame, crc


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100_003])
def test_fp16_native_and_portable_paths_agree(n):
    x = spread_floats(n, seed=n, high=4.8).clamp(-65519, 65519)
    x[:: max(1, n // 7)] = float("inf")
    fast, crc_fast = wire_form(x, 1, portable=False)
    slow, crc_slow = wire_form(x, 1, portable=True)
    assert torch.equal(fast, slow) and crc_fast == crc_slow
    for portable in (False, True):
        y = torch.empty(n)
        assert _C.decode_tensor(fast.data_ptr(), fast.numel(), 0, 1, 1, n, 0, 0, y.data_ptr(), portable) == -1
        assert_identical(y, x.half().float())
    big = x.clone()
    big[n // 2] = 7e4
    for portable in (False, True):
        with pytest.raises(ValueError, match=f"flat index {n // 2} overflows float16"):
            wire_form(big, 1, portable)


def test_c_layer_rechecks_ranges():
    frame = torch.zeros(64, dtype=torch.uint8)
    x = torch.randn(20)
    with pytest.raises(ValueError, match="runs past the frame"):
        _C.encode_tensor(frame.data_ptr(), 64, 0, 0, 0, 0, x.data_ptr(), 1, 20, 0, 0)
    with pytest.raises(ValueError, match="runs past the frame"):
        _C.decode_tensor(frame.data_ptr(), 64, 40, 1, 1, 20, 0, 0, x.data_ptr())
    with pytest.raises(ValueError, match="floating dtypes only"):
        _C.encode_tensor(frame.data_ptr(), 64, 0, 0, 0, 3, x.data_ptr(), 8, 4, 4, 8)
    with pytest.raises(ValueError, match="does not divide"):
        _C.encode_tensor(frame.data_ptr(), 64, 0, 0, 0, 3, x.data_ptr(), 1, 10, 3, 16)
    with pytest.raises(ValueError, match="scales must follow"):
        _C.encode_tensor(frame.data_ptr(), 64, 0, 0, 8, 3, x.data_ptr(), 1, 8, 4, 0)
    with pytest.raises(ValueError, match="unknown dtype code 11"):
        _C.decode_tensor(frame.data_ptr(), 64, 0, 0, 11, 1, 0, 0, x.data_ptr())


# ------------------------------------------------------------------------------------------ CRC32C


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_crc32c_known_vectors(portable):
    # RFC 3720 (iSCSI) appendix B.4, and the common check value.
    vectors = [
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"", 0),
    ]
    for data, want in vectors:
        assert boundary.crc32c(data, portable=portable) == want, data
        assert crc32c_bitwise(data) == want


def test_crc32c_native_equals_portable_and_bitwise_on_random_input():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    # Lengths around the native loop's block sizes (3 x 8192 and 3 x 256 bytes) and random ones, at
    # every alignment.
    lengths = [0, 1, 7, 8, 9, 767, 768, 769, 24575, 24576, 24577, 49153, 199_992] + list(rng.integers(0, 70_000, 30))
    for i, n in enumerate(lengths):
        start = i % 8
        piece = data[start : start + n]
        native = boundary.crc32c(piece)
        assert native == boundary.crc32c(piece, portable=True), (start, n)
        if n <= 800:
            assert native == crc32c_bitwise(piece)
        cut = n // 3
        assert boundary.crc32c(piece[cut:], boundary.crc32c(piece[:cut])) == native  # chaining


def test_crc32c_uses_the_instruction_where_there_is_one():
    if platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"):
        pytest.skip("the crc32 instruction path exists on x86-64 only")
    with open("/proc/cpuinfo") as f:
        assert _C.crc32c_hardware() == (" sse4_2" in f.read())


# ------------------------------------------------------------------------------ corruption: FrameError


def small_frames():
    g = torch.Generator().manual_seed(7)
    frames = []
    for i, compression in enumerate([None, "fp16", "bf16", "int8", None, "int8"]):
        tensors = {"act": torch.randn(2, 3 + i, generator=g), "labels": torch.randint(0, 9, (3,), generator=g)}
        if i % 2:
            tensors["mask"] = torch.rand(4, generator=g) > 0.5
        meta = {"i": i} if i % 3 else {}
        frame = Frame(Kind(1 + i % 7), step=i, probe=i, sign=i % 3 - 1, client_id=i, tensors=tensors, meta=meta)
        frames.append(bytes(encode_frame(frame, compression).numpy()))
    return frames


def test_random_corruptions_all_raise_frame_error():
    frames = small_frames()
    # Pairs of frames with the same layout and different data, for header/payload splices.
    g = torch.Generator().manual_seed(8)
    twins = [
        [
            bytes(encode_frame(Frame(Kind.ACT, step=s, tensors={"x": torch.randn(3, 5, generator=g)})).numpy())
            for s in (1, 2)
        ]
        for _ in range(4)
    ]
    rng = random.Random(9)
    failures = []
    trials = 10_000
    for trial in range(trials):
        buf = bytearray(rng.choice(frames))
        how = trial % 7
        if how == 0:  # one bit
            bit = rng.randrange(8 * len(buf))
            buf[bit // 8] ^= 1 << bit % 8
        elif how == 1:  # 2 to 16 bits anywhere
            for bit in rng.sample(range(8 * len(buf)), rng.randint(2, 16)):
                buf[bit // 8] ^= 1 << bit % 8
        elif how == 2:  # truncated
            del buf[rng.randrange(len(buf)) :]
        elif how == 3:  # bytes appended
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif how == 4:  # one frame's header on another's payload (same lengths: only the CRC can tell)
            a, b = rng.sample(rng.choice(twins), 2)
            cut = rng.randrange(17, 49)  # past the first byte of step, where the two headers start to differ
            buf = bytearray(a[:cut] + b[cut:])
        elif how == 5:  # a burst of random bytes over a random span
            start = rng.randrange(len(buf))
            end = min(len(buf), start + rng.randint(1, 12))
            old = bytes(buf[start:end])
            while bytes(buf[start:end]) == old:
                buf[start:end] = bytes(rng.randrange(256) for _ in range(end - start))
        else:  # garbage, half of it starting like a frame
            buf = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            if trial % 2:
                buf[:6] = b"HOSL\x01\x00"
        try:
            decode_frame(bytes(buf))
        except FrameError:
            continue
        except Exception as exc:  # noqa: BLE001 - anything but FrameError is a failure to report
            failures.append((how, f"{type(exc).__name__}: {exc}"))
        else:
            failures.append((how, "decoded without error"))
    assert not failures, f"{len(failures)} of {trials} corruptions not reported as FrameError: {failures[:5]}"


def test_header_errors_say_what_was_wrong():
    good = bytearray(encode_frame(Frame(Kind.ACT, tensors={"x": torch.randn(4)})).numpy())
    n = len(good)

    def expect(buf, match, **kw):
        with pytest.raises(FrameError, match=match):
            decode_frame(bytes(buf), **kw)

    expect(b"", "truncated: 0 bytes, shorter than the 48-byte header")
    expect(b"HOSLxx", "truncated")
    expect(b"GIF89a" + bytes(60), "bad magic b'GIF8'")
    foreign = bytearray(good)
    foreign[4:6] = (7).to_bytes(2, "little")
    expect(foreign, "unsupported version 7")
    expect(good[:-5], f"truncated: header says {n} bytes, got {n - 5}")
    expect(good + b"\0", f"trailing bytes: header says {n} bytes, got {n + 1}")
    expect(good, f"oversized: header says {n} bytes, more than max_bytes={n - 1}", max_bytes=n - 1)
    huge = bytearray(good)
    struct.pack_into("<Q", huge, 40, 2**63)
    expect(huge, "oversized")
    flipped = bytearray(good)
    flipped[-1] ^= 0x10
    expect(flipped, "CRC mismatch")
    for offset, value, match in [(6, 0, "unknown kind 0"), (7, 5, "bad sign 5"), (8, 1, "unsupported flags")]:
        bad = bytearray(good)
        bad[offset] = value
        expect(bad, match)
    decode_frame(bytes(good), max_bytes=n)


def descriptor_at(buf, meta_bytes=0):
    return 48 + meta_bytes + (-meta_bytes % 8)


FORGERIES = {
    # name: (edit of the frame bytes of {"x": 2x3 float32} with meta {"m": 1} (7 bytes), expected message)
    "unknown dtype": (lambda b, d: b.__setitem__(d + 2, 99), "unknown dtype code 99"),
    "unknown encoding": (lambda b, d: b.__setitem__(d + 3, 9), "unknown encoding 9"),
    "ndim too large": (lambda b, d: struct.pack_into("<I", b, d + 4, 65), "ndim 65"),
    "ndim runs past the end": (lambda b, d: struct.pack_into("<I", b, d + 4, 60), "runs past the end"),
    "ndim off by one": (lambda b, d: struct.pack_into("<I", b, d + 4, 1), "bad tensor descriptor #0"),
    "shape disagrees with bytes": (lambda b, d: struct.pack_into("<Q", b, d + 16, 3), "needs 36"),
    "data_bytes disagrees": (lambda b, d: struct.pack_into("<Q", b, d + 8, 32), "has 32 data bytes"),
    "huge shape": (lambda b, d: struct.pack_into("<2Q", b, d + 16, 2**20, 2**20), "needs 4398046511104"),
    "shape too large": (lambda b, d: struct.pack_into("<2Q", b, d + 16, 2**40, 2**40), "too large"),
    "strides overflow": (lambda b, d: struct.pack_into("<2Q", b, d + 16, 0, 2**63), "too large"),
    "name past the end": (lambda b, d: struct.pack_into("<H", b, d, 5000), "runs past the end"),
    "name not utf-8": (lambda b, d: b.__setitem__(d + 32, 0xFF), "name is not UTF-8"),
    "nonzero padding": (lambda b, d: b.__setitem__(d + 33, 1), "nonzero padding"),
    "meta not json": (lambda b, d: b.__setitem__(48, ord("[")), "bad metadata"),
    "meta padding": (lambda b, d: b.__setitem__(55, 7), "nonzero padding after metadata"),
    "one tensor too many": (lambda b, d: struct.pack_into("<I", b, 28, 2), "tensor #1 descriptor runs past the end"),
    "one tensor too few": (lambda b, d: struct.pack_into("<I", b, 28, 0), "trailing bytes: 64 after the last"),
    "meta length too long": (lambda b, d: struct.pack_into("<I", b, 32, 200), "bad metadata length"),
    "meta length off": (lambda b, d: struct.pack_into("<I", b, 32, 6), "bad metadata"),
    "fp16 encoding of int data": (lambda b, d: (b.__setitem__(d + 2, 8), b.__setitem__(d + 3, 1)), "only floating"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_frames_with_valid_crc_raise_frame_error(name):
    edit, match = FORGERIES[name]
    buf = bytearray(encode_frame(Frame(Kind.ACT, tensors={"x": torch.randn(2, 3)}, meta={"m": 1})).numpy())
    edit(buf, descriptor_at(buf, meta_bytes=7))
    with pytest.raises(FrameError, match=match):
        decode_frame(bytes(forge(buf)))


def test_int8_encoding_of_a_0_dim_tensor_is_a_frame_error():
    """A 0-dim tensor has no rows to quantise: a forged int8 descriptor on one is refused, not an IndexError."""
    buf = bytearray(encode_frame(Frame(Kind.LOSS, tensors={"loss": torch.tensor(1.5)})).numpy())
    d = descriptor_at(buf)
    buf[d + 3] = 3  # encoding int8
    struct.pack_into("<Q", buf, d + 8, 1)  # one byte of data, as int8 would hold a 1-element tensor
    with pytest.raises(FrameError, match="int8 encoding needs a tensor with dimensions"):
        decode_frame(bytes(forge(buf)))


def test_caps_bound_what_a_frame_costs_to_decode():
    # Zero-size tensors cost no bytes to send but work to decode: at most max_tensors of them.
    many = Frame(Kind.ACT, tensors={f"t{i}": torch.empty(0) for i in range(40)})
    buf = encode_frame(many)
    assert len(decode_frame(buf).tensors) == 40
    with pytest.raises(FrameError, match="oversized: 40 tensors, more than max_tensors=39"):
        decode_frame(buf, max_tensors=39)
    # float64 sent as int8 decodes to 8x its wire bytes: the decoded data are capped by max_bytes too.
    x = torch.randn(64, 256, dtype=torch.float64)
    buf = encode_frame(Frame(Kind.ACT, tensors={"x": x}), "int8")
    assert x.nbytes > 7 * buf.numel()
    assert decode_frame(buf, max_bytes=x.nbytes).tensors["x"].shape == x.shape
    with pytest.raises(FrameError, match="takes the decoded data past max_bytes"):
        decode_frame(buf, max_bytes=x.nbytes - 1)


def test_forged_data_errors():
    x = torch.randn(3, 10)
    buf = bytearray(encode_frame(Frame(Kind.ACT, tensors={"x": x}), "int8").numpy())
    scales_at = len(buf) - 16  # 3 f32 scales, padded to 16
    for bad_scale in (-1.0, float("nan"), float("inf")):
        forged = bytearray(buf)
        struct.pack_into("<f", forged, scales_at + 4, bad_scale)
        with pytest.raises(FrameError, match="int8 scale of row 1 is negative or not finite"):
            decode_frame(bytes(forge(forged)))
    mask = bytearray(encode_frame(Frame(Kind.BATCH, tensors={"m": torch.ones(5, dtype=torch.bool)})).numpy())
    mask[-4] = 2  # the data sit at the end: 5 bool bytes, then 3 of padding
    with pytest.raises(FrameError, match="bool bytes other than 0 and 1"):
        decode_frame(bytes(forge(mask)))
    dup = bytearray(encode_frame(Frame(Kind.ACT, tensors={"a": torch.ones(1), "b": torch.ones(1)})).numpy())
    dup[dup.index(b"b", 48 + 16 + 8 + 8 + 8)] = ord("a")
    with pytest.raises(FrameError, match="duplicate name 'a'"):
        decode_frame(bytes(forge(dup)))
    deep = bytearray(encode_frame(Frame(Kind.HELLO, meta={"k": "v" * 20_000})).numpy())
    deep[48 : 48 + 20_008] = b"[" * 20_008  # nested far past the JSON parser's recursion limit
    with pytest.raises(FrameError, match="bad metadata"):
        decode_frame(bytes(forge(deep)))


def test_random_forged_mutations_never_escape_as_other_errors():
    """After the CRC passed, a frame with any bytes changed decodes or raises FrameError; nothing else."""
    frames = small_frames()
    rng = random.Random(11)
    outcomes = {"decoded": 0, "FrameError": 0}
    for _ in range(2000):
        buf = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(48, len(buf))] = rng.choice([0, 1, 2, 7, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        try:
            decode_frame(bytes(forge(buf)))
            outcomes["decoded"] += 1
        except FrameError:
            outcomes["FrameError"] += 1
    assert outcomes["decoded"] > 0 and outcomes["FrameError"] > 0, outcomes


def fuzz_frames():
    """Frames of every shape class the decoder branches on (0-dim, 0-size, float64, int8, bool, meta),
    each with the offsets and element counts of its tensor descriptors, walked from the documented layout."""
    g = torch.Generator().manual_seed(12)
    frames = small_frames()
    cases = [
        ({"loss": torch.tensor(0.5)}, None),
        ({"n": torch.tensor(3, dtype=torch.int8), "loss": torch.tensor(0.5, dtype=torch.float64)}, None),
        ({"e": torch.empty(0, 3), "x": torch.randn(4, 8, dtype=torch.float64, generator=g)}, "int8"),
        ({"x": torch.randn(3, 1, 5, generator=g).to(torch.bfloat16), "b": torch.ones(2, dtype=torch.bool)}, "fp16"),
        ({f"z{i}": torch.empty(0) for i in range(6)}, None),
    ]
    for tensors, compression in cases:
        frames.append(bytes(encode_frame(Frame(Kind.GRAD, tensors=tensors, meta={"k": [1, 2]}), compression).numpy()))
    walked = []
    for buf in frames:
        count, meta_bytes = struct.unpack_from("<II", buf, 28)
        at, descriptors = 48 + meta_bytes + (-meta_bytes % 8), []
        for _ in range(count):
            name_bytes, _, encoding, ndim, data_bytes = struct.unpack_from("<HBBIQ", buf, at)
            shape = struct.unpack_from(f"<{ndim}Q", buf, at + 16)
            descriptors.append((at, math.prod(shape)))
            at += 16 + 8 * ndim + name_bytes
            at += -at % 8 + data_bytes
            at += -at % 8
            if encoding == 3:
                at += 4 * (math.prod(shape) // shape[-1])
                at += -at % 8
        assert at == len(buf)
        walked.append((buf, descriptors))
    return walked


def mutate(rng, buf, descriptors):
    """1 to 6 edits: bytes anywhere past the magic, whole length fields, and descriptor fields set to
    values that agree with each other often enough to pass the early checks (a dtype with an encoding,
    a data length that matches a shape)."""
    buf = bytearray(buf)
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if descriptors and kind < 0.5:
            at, numel = rng.choice(descriptors)
            field = rng.randrange(4)
            if field == 0:
                buf[at + 2] = rng.choice([*range(1, 11), 0, 99])  # dtype
            elif field == 1:
                buf[at + 3] = rng.choice([0, 1, 2, 3, 9])  # encoding
            elif field == 2:
                struct.pack_into("<I", buf, at + 4, rng.choice([0, 1, 2, 3, 64, 2**31]))  # ndim
            else:
                struct.pack_into("<Q", buf, at + 8, numel * rng.choice([0, 1, 2, 4, 8, 2**40]) % 2**64)  # data_bytes
        elif kind < 0.7:  # a whole little-endian field: lengths, counts, shapes
            at, width = rng.randrange(8, len(buf)), rng.choice([2, 4, 8])
            value = rng.choice([0, 1, 2**31, 2**40, 2**63, rng.randrange(2 ** (8 * width))])
            buf[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")[: len(buf) - at]
        else:
            buf[rng.randrange(8, len(buf))] = rng.choice([0, 1, 2, 3, 7, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    return forge(buf)


@pytest.mark.slow
def test_fuzzed_frames_only_ever_raise_frame_error_in_bounded_time_and_memory():
    """20,000 mutated frames with a valid CRC, decoded with a session's caps: each decodes or raises
    FrameError, within a bounded time, and what it decodes to stays within the caps."""
    import resource

    frames = fuzz_frames()
    rng = random.Random(13)
    max_bytes, max_tensors = 1 << 16, 8
    outcomes = {"decoded": 0, "FrameError": 0}
    slowest, rss_before = 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20_000):
        buf = bytes(mutate(rng, *rng.choice(frames)))
        start = time.perf_counter()
        try:
            frame = decode_frame(buf, max_bytes=max_bytes, max_tensors=max_tensors)
            outcomes["decoded"] += 1
            assert len(frame.tensors) <= max_tensors
            assert sum(t.nbytes for t in frame.tensors.values()) <= max_bytes
        except FrameError:
            outcomes["FrameError"] += 1
        slowest = max(slowest, time.perf_counter() - start)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert outcomes["decoded"] > 100 and outcomes["FrameError"] > 10_000, outcomes
    assert slowest < 0.5, f"one frame took {slowest:.3f} s to decode"
    assert rss_growth < 64 << 20, f"peak memory grew by {rss_growth / 2**20:.0f} MiB"


# ------------------------------------------------------------------------- BoundaryBuffer, FrameQueue


def payload(seq):
    """Frame `seq` of the FIFO tests: its number, then 0 to 199 bytes that depend on it."""
    n = (seq * 7919) % 200
    return struct.pack("<Q", seq) + ((np.arange(n, dtype=np.uint64) * 31 + seq) % 251).astype(np.uint8).tobytes()


def push_bytes(buffer, data, timeout=None):
    arr = np.frombuffer(data, dtype=np.uint8)
    buffer.push(arr.ctypes.data, arr.size, timeout)


class Receiver:
    def __init__(self, capacity):
        self.buf = np.zeros(capacity, dtype=np.uint8)

    def pop(self, buffer, timeout=None):
        n = buffer.pop_into(self.buf.ctypes.data, self.buf.size, timeout)
        return self.buf[:n].tobytes()


def run_threads(*targets, timeout=60):
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported to the main thread below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guard(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def test_buffer_fifo_one_producer_one_consumer():
    buffer = _C.BoundaryBuffer(3, 256)
    count = 10_000
    received = []

    def produce():
        for seq in range(count):
            push_bytes(buffer, payload(seq), timeout=30)

    def consume():
        rx = Receiver(256)
        for _ in range(count):
            received.append(rx.pop(buffer, timeout=30))

    run_threads(produce, consume)
    assert len(received) == count and buffer.size == 0
    bad = [seq for seq, data in enumerate(received) if data != payload(seq)]
    assert not bad, f"{len(bad)} frames out of order or damaged, first at {bad[0]}"


def test_buffer_many_producers_and_consumers():
    buffer = _C.BoundaryBuffer(2, 256)
    per_producer, producers, consumers = 1500, 3, 2
    got = [[] for _ in range(consumers)]

    def produce(p):
        def run():
            for i in range(per_producer):
                push_bytes(buffer, payload(p * per_producer + i), timeout=30)

        return run

    def consume(c):
        def run():
            rx = Receiver(256)
            while True:
                try:
                    got[c].append(rx.pop(buffer, timeout=30))
                except _C.BufferClosedError:
                    return

        return run

    consumer_threads = [threading.Thread(target=consume(c)) for c in range(consumers)]
    for t in consumer_threads:
        t.start()
    run_threads(*(produce(p) for p in range(producers)))
    buffer.close()
    for t in consumer_threads:
        t.join(30)
    seqs = [struct.unpack_from("<Q", d)[0] for chunk in got for d in chunk]
    assert sorted(seqs) == list(range(producers * per_producer))  # none lost, none twice
    for chunk in got:
        assert all(d == payload(struct.unpack_from("<Q", d)[0]) for d in chunk)
        for p in range(producers):  # each producer's frames come out in the order it pushed them
            mine = [s for s in (struct.unpack_from("<Q", d)[0] for d in chunk) if s // per_producer == p]
            assert mine == sorted(mine)


def test_buffer_backpressure_and_timeouts():
    buffer = _C.BoundaryBuffer(2, 64)
    rx = Receiver(64)
    with pytest.raises(TimeoutError, match="pop_into timed out"):
        rx.pop(buffer, timeout=0)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        rx.pop(buffer, timeout=0.2)
    assert 0.19 <= time.monotonic() - start < 2.0
    push_bytes(buffer, b"a", timeout=0)
    push_bytes(buffer, b"bb", timeout=0)
    assert buffer.size == 2 and len(buffer) == 2
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="push timed out"):
        push_bytes(buffer, b"ccc", timeout=0.2)
    assert 0.19 <= time.monotonic() - start < 2.0
    assert rx.pop(buffer) == b"a"
    push_bytes(buffer, b"ccc", timeout=0)
    assert [rx.pop(buffer, timeout=0) for _ in range(2)] == [b"bb", b"ccc"]
    with pytest.raises(ValueError, match="timeout"):
        rx.pop(buffer, timeout=-1)


@pytest.mark.parametrize("side", ["pop", "push"])
def test_close_wakes_a_blocked_thread(side):
    buffer = _C.BoundaryBuffer(1, 16)
    if side == "push":
        push_bytes(buffer, b"full")
    outcome = []

    def blocked():
        start = time.monotonic()
        try:
            if side == "pop":
                Receiver(16).pop(buffer)
            else:
                push_bytes(buffer, b"more")
        except _C.BufferClosedError as exc:
            outcome.append((str(exc), time.monotonic() - start))

    t = threading.Thread(target=blocked, daemon=True)  # daemon: a regression fails the test instead of hanging
    t.start()
    time.sleep(0.2)  # the thread is waiting, without the GIL: this thread runs meanwhile
    assert t.is_alive()
    buffer.close()
    t.join(5)
    assert not t.is_alive() and len(outcome) == 1
    message, waited = outcome[0]
    assert "closed" in message and 0.15 < waited < 5


def test_close_drains_then_refuses():
    buffer = _C.BoundaryBuffer(4, 16)
    for data in (b"one", b"two"):
        push_bytes(buffer, data)
    buffer.close()
    assert buffer.closed
    with pytest.raises(_C.BufferClosedError, match="push on a closed buffer"):
        push_bytes(buffer, b"three")
    rx = Receiver(16)
    assert [rx.pop(buffer), rx.pop(buffer)] == [b"one", b"two"]
    with pytest.raises(_C.BufferClosedError, match="closed buffer with no frames left"):
        rx.pop(buffer)
    assert issubclass(_C.BufferClosedError, RuntimeError) and boundary.BufferClosedError is _C.BufferClosedError


def test_buffer_size_errors():
    buffer = _C.BoundaryBuffer(2, 8)
    with pytest.raises(ValueError, match="a 9-byte frame does not fit in a 8-byte slot"):
        push_bytes(buffer, bytes(9))
    push_bytes(buffer, b"12345678")
    with pytest.raises(ValueError, match="next frame is 8 bytes, more than the 4-byte destination"):
        Receiver(4).pop(buffer)
    assert buffer.size == 1 and Receiver(8).pop(buffer) == b"12345678"  # it stayed
    for slots, slot_bytes in [(0, 8), (2, 0), (-1, 8)]:
        with pytest.raises(ValueError, match="must be >= 1"):
            _C.BoundaryBuffer(slots, slot_bytes)
    assert (buffer.slots, buffer.slot_bytes) == (2, 8)
    assert repr(buffer) == "BoundaryBuffer(slots=2, slot_bytes=8, size=0, closed=False)"


def test_frame_queue_moves_frames_between_threads():
    queue = FrameQueue(slots=3, slot_bytes=4096)
    count = 2000
    received = []

    def produce():
        for step in range(count):
            x = torch.full((4, 8), float(step))
            queue.put(encode_frame(Frame(Kind.ACT, step=step, tensors={"x": x}), "bf16"), timeout=30)
        queue.close()

    def consume():
        out = torch.empty(4096, dtype=torch.uint8)
        while True:
            try:
                frame = decode_frame(queue.get(timeout=30, out=out))
            except boundary.BufferClosedError:
                return
            received.append((frame.step, frame.tensors["x"][0, 0].item()))

    run_threads(produce, consume)
    assert received == [(s, float(torch.tensor(float(s)).bfloat16())) for s in range(count)]
    assert queue.closed and len(queue) == 0
    with pytest.raises(TypeError, match="1-D uint8"):
        queue.put(torch.zeros(3))
