"""The split boundary's wire format: a Frame (what it is, for which step, probe and client, named
tensors, small JSON metadata) to bytes and back, checked end to end with a CRC-32C.

    encode_frame(frame, compression=None) -> 1-D uint8 CPU tensor
    decode_frame(buf, *, max_bytes=MAX_FRAME_BYTES, max_tensors=MAX_TENSORS) -> Frame
                                                                    FrameError for any bad input

FrameQueue moves encoded frames between threads through hosl._C.BoundaryBuffer, a bounded ring of
preallocated slots. The byte work (copies, casts, quantisation, CRC) is C++ in hosl._C and runs
without the GIL; this module lays frames out and parses them.

Wire layout, version 1
----------------------

This is the contract between sender and receiver. Integers are little-endian; offsets are bytes from
the start of the frame.

Header, HEADER_BYTES = 48 bytes:

    offset  size  field          value
    0       4     magic          b"HOSL"
    4       2     version        u16, VERSION = 1
    6       1     kind           u8, a Kind: HELLO 1, BATCH 2, ACT 3, LOSS 4, GRAD 5, CONTROL 6, ERROR 7, SCORES 8,
                                 REPORT 9, ROUND 10
    7       1     sign           i8, -1, 0 or +1
    8       4     flags          u32, 0 (reserved: a version-1 reader rejects anything else)
    12      4     client_id      u32
    16      8     step           u64
    24      4     probe          u32
    28      4     tensor_count   u32
    32      4     meta_bytes     u32, at most MAX_META_BYTES
    36      4     crc32c         u32, CRC-32C (Castagnoli) of the whole frame with these 4 bytes as zeros
    40      8     payload_bytes  u64; the frame is HEADER_BYTES + payload_bytes long, to the byte

Payload, from offset 48. Each item below starts 8-byte aligned; the padding after an item ("pad8",
0 to 7 bytes) is zeros:

    item          size                  content
    metadata      meta_bytes, pad8      UTF-8 JSON of an object; absent (meta_bytes 0) for an empty dict
    then per tensor, in the order of Frame.tensors:
    descriptor    16                    name_bytes u16, dtype u8, encoding u8, ndim u32, data_bytes u64
    shape         8 * ndim              ndim x u64
    name          name_bytes, pad8      UTF-8
    data          data_bytes, pad8      the elements in C order, as the encoding says
    scales        4 * rows, pad8        encoding int8 only: one f32 per row, rows = numel / shape[-1]

    dtype        1 float32, 2 float64, 3 float16, 4 bfloat16, 5 int8, 6 uint8, 7 int16, 8 int32,
                 9 int64, 10 bool (the tensor's own dtype, restored on decode)
    encoding     0 raw (the tensor's bytes), 1 float16, 2 bfloat16, 3 int8 (per row, with scales)
    data_bytes   numel x (the dtype's size for raw, 2 for float16 and bfloat16, 1 for int8)

There are no offsets or pointers in a frame: a reader walks it front to back, so every item's place
follows from the lengths before it, and each length is checked against what is left.

Tensors
-------

Any shape, 0-dim and 0-size included, up to MAX_NDIM dimensions, in the dtypes above (others raise
ValueError). A non-contiguous tensor is sent from a contiguous copy, a CUDA tensor from a CPU copy;
gradients are not sent (the tensor is detached). Decoded tensors are new CPU tensors, contiguous,
with the original dtype and shape, owning their memory: the buffer they were decoded from can be
reused at once.

Compression
-----------

Chosen per call of encode_frame; each descriptor names its encoding, so decode_frame needs no flag.
Only floating tensors with elements are ever compressed, and only when that makes them smaller:
integer and bool tensors (labels, masks, ids) always travel as their exact bytes.

* None: every tensor as its exact bytes.
* "fp16", "bf16": float32 and float64 tensors are rounded to float16 or bfloat16 (to nearest, ties to
  even) and converted back to their dtype on decode; float16 and bfloat16 tensors, already 2 bytes an
  element, go as they are. For x a float32 value and x_hat what comes back:
      fp16   |x - x_hat| <= 2^-11 |x|  for 2^-14 <= |x| <= 65504 (float16's normal range),
             |x - x_hat| <= 2^-25      below 2^-14 (half of float16's smallest subnormal);
      bf16   |x - x_hat| <= 2^-8 |x|   for |x| >= 2^-126,
             |x - x_hat| <= 2^-134     below 2^-126.
  x_hat is exactly torch's x.to(torch.float16).float() (or bfloat16). float64 values are rounded to
  float32 first, which adds at most 2^-24 |x|. A finite value that would round to inf (|x| >= 65520 for
  fp16, |x| >= 2^128 (1 - 2^-9) for bf16) raises ValueError naming the tensor and the element: never a
  silent inf. inf and nan are sent as inf and nan (sign kept; a nan's payload bits may not be).
* "int8": floating tensors with ndim >= 1 are quantised per row, a row being the last dimension. In
  float32, for row r with largest magnitude m_r:
      scale_r = max(m_r / 127, FLT_MIN), or 0 for an all-zero row (sent as f32),
      q = x / scale_r rounded to nearest even, in [-127, 127] (one byte),
      x_hat = q * scale_r, converted to the tensor's dtype on decode;
  and |x - x_hat| <= scale_r (1/2 + 2^-16) for float32 tensors; all-zero rows come back as zeros. For
  float16 and bfloat16 tensors add the final rounding into that dtype (half an ulp of x_hat); for
  float64 ones the rounding of x to float32 (2^-24 |x|). A row holding inf or nan raises ValueError (no
  scale can carry it). 0-dim tensors go raw, and so do tensors whose rows are too short for 1 byte an
  element plus 4 a row to be smaller (float32 with a last dimension of 1, say).

Decoding
--------

decode_frame raises FrameError, saying what was wrong, for any input that is not a well-formed
version-1 frame: too short, bad magic, another version, a length field that disagrees with the
buffer (truncated, trailing bytes) or exceeds max_bytes (oversized), a bad field, a CRC mismatch,
and, after the CRC passed, any descriptor, padding, metadata or data that breaks the layout above
(the CRC catches accidents, not a frame built wrong). It never returns a partly decoded frame.

What a frame can cost the reader is bounded by the caps, whatever its bytes say: at most
max_tensors tensors (the per-tensor work), and at most max_bytes bytes of decoded tensor data in
all (the memory: compression makes a tensor larger once decoded, up to 8x for float64 sent as
int8, so the wire size alone does not bound it). A peer's frame is decoded with the caps of what
its session can legitimately send (hosl.transport.Link.max_frame_bytes).
"""

from __future__ import annotations

import enum
import json
import math
import numbers
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from hosl import _ext

VERSION = 1
MAGIC = b"HOSL"
HEADER_BYTES = 48
MAX_FRAME_BYTES = 1 << 34  # decode_frame's default cap (16 GiB): a corrupt length must not become an allocation
MAX_META_BYTES = 1 << 20  # metadata is small by design; tensors carry the data
MAX_TENSORS = 1024  # decode_frame's default cap on a frame's tensor count (hosl's own frames carry a few)
MAX_NDIM = 64
MAX_NAME_BYTES = (1 << 16) - 1
COMPRESSIONS = (None, "fp16", "bf16", "int8")

_HEADER = struct.Struct("<4sHBbIIQIIIIQ")
_CRC_OFFSET = 36
_DESCRIPTOR = struct.Struct("<HBBIQ")
_ALIGN = 8
assert _HEADER.size == HEADER_BYTES and _DESCRIPTOR.size == 16

_DTYPE_CODES = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int8: 5,
    torch.uint8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.bool: 10,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Wire encodings (the descriptor's encoding byte) and their bytes per element (raw: the dtype's).
_RAW, _FP16, _BF16, _INT8 = 0, 1, 2, 3
_ENCODING_NAMES = {_RAW: "raw", _FP16: "float16", _BF16: "bfloat16", _INT8: "int8"}
_WIRE_ITEMSIZE = {_FP16: 2, _BF16: 2, _INT8: 1}


class Kind(enum.IntEnum):
    """What a frame carries (DESIGN.md, "The split boundary")."""

    HELLO = 1  # client -> server on connecting: protocol version, config hash
    BATCH = 2  # labels, attention mask
    ACT = 3  # the activation at the cut
    LOSS = 4
    GRAD = 5  # the gradient at the cut (first-order methods)
    CONTROL = 6  # checkpoint, stop
    ERROR = 7
    SCORES = 8  # an evaluation batch's rank-classification scores
    REPORT = 9  # a client's projected gradients and rows for a round (hosl.clients)
    ROUND = 10  # the round's list of (client, g, rows), to every client (hosl.clients)


class FrameError(ValueError):
    """Bytes that are not a valid frame: corrupt, truncated, foreign, oversized or inconsistent."""


if _ext._C is not None:
    BufferClosedError = _ext._C.BufferClosedError
else:  # keeps `except BufferClosedError` valid without the extension (nothing can raise it then)

    class BufferClosedError(RuntimeError):
        """A push on a closed BoundaryBuffer, or a pop from a closed one with no frames left."""


def _uint(value, bits: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 1 << bits:
        raise ValueError(f"{what} must be an int in [0, 2**{bits}); got {value!r}")
    return int(value)


@dataclass(eq=False)  # tensors have no single truth value, so frames compare by identity
class Frame:
    """One message across the split boundary.

    kind: what it carries. step (u64), probe (u32), sign (-1, 0 or +1): which ZO step, probe and side
    of the perturbation it belongs to. client_id (u32): which client, as one server serves many.
    tensors: named tensors, in order (names are strings, UTF-8 at most 65535 bytes). meta: a small
    JSON-serialisable dict; it comes back as JSON gives it back (tuples as lists, keys as strings).
    """

    kind: Kind
    step: int = 0
    probe: int = 0
    sign: int = 0
    client_id: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raises ValueError or TypeError for a field the wire cannot carry; normalises kind to a Kind."""
        try:
            self.kind = Kind(self.kind)
        except ValueError:
            raise ValueError(f"kind must be one of {', '.join(k.name for k in Kind)}; got {self.kind!r}") from None
        self.step = _uint(self.step, 64, "step")
        self.probe = _uint(self.probe, 32, "probe")
        self.client_id = _uint(self.client_id, 32, "client_id")
        if isinstance(self.sign, bool) or self.sign not in (-1, 0, 1):
            raise ValueError(f"sign must be -1, 0 or 1; got {self.sign!r}")
        self.sign = int(self.sign)
        if not isinstance(self.tensors, dict):
            raise TypeError(f"tensors must be a dict of name -> tensor; got {type(self.tensors).__name__}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict; got {type(self.meta).__name__}")


def _require():
    C = _ext.require("hosl.boundary")
    if sys.byteorder != "little":  # raw tensor bytes go in host order, and the wire is little-endian
        raise RuntimeError("hosl.boundary supports little-endian hosts only")
    return C


def _pad(n: int) -> int:
    return -n % _ALIGN


def _bytes_of(buf):
    """(memoryview, address of the first byte, owner to keep alive) for a uint8 tensor or a bytes-like object."""
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8:
            raise TypeError(f"a frame is a uint8 tensor; got {buf.dtype}")
        arr = buf.detach().cpu().contiguous().reshape(-1).numpy()  # shares memory when already CPU and contiguous
    elif isinstance(buf, (bytes, bytearray, memoryview)):
        view = memoryview(buf)
        if not view.c_contiguous:
            raise ValueError("a frame's bytes must be contiguous")
        arr = np.frombuffer(view.cast("B"), dtype=np.uint8)
    else:
        raise TypeError(f"expected a uint8 tensor, bytes, bytearray or memoryview; got {type(buf).__name__}")
    return memoryview(arr), arr.__array_interface__["data"][0], arr


def crc32c(data, crc: int = 0, *, portable: bool = False) -> int:
    """CRC-32C of a uint8 tensor or bytes-like object, continuing from crc (chain calls to checksum
    pieces). Runs on the SSE4.2 crc32 instruction when the CPU has it; portable=True forces the
    table code, which gives the same value."""
    C = _require()
    view, ptr, _owner = _bytes_of(data)
    return C.crc32c(ptr, view.nbytes, crc, portable)


# ---------------------------------------------------------------------------------------- encoding


@dataclass
class _Part:
    """One tensor's place in a frame being encoded."""

    name: str
    src: torch.Tensor  # contiguous, CPU
    dtype_code: int
    encoding: int
    data_bytes: int
    row_len: int = 0  # int8 only
    data_offset: int = 0
    scales_offset: int = 0


def _wire_encoding(t: torch.Tensor, compression: str | None) -> int:
    if compression is None or t.dtype not in _FLOATING or t.numel() == 0:
        return _RAW
    if compression == "int8":
        if t.dim() == 0:
            return _RAW
        rows = t.numel() // t.shape[-1]
        return _INT8 if t.numel() + 4 * rows < t.numel() * t.element_size() else _RAW
    if t.element_size() <= 2:  # float16 and bfloat16: casting would not save a byte
        return _RAW
    return _FP16 if compression == "fp16" else _BF16


def _plan(name, tensor, compression) -> _Part:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be strings; got {name!r}")
    try:
        name_bytes = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"tensor name {name!r} is not encodable as UTF-8: {exc}") from None
    if name_bytes > MAX_NAME_BYTES:
        raise ValueError(f"tensor name {name[:40]!r}... is {name_bytes} bytes in UTF-8; at most {MAX_NAME_BYTES}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor {name!r} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.dtype not in _DTYPE_CODES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_CODES)
        raise ValueError(f"tensor {name!r}: unsupported dtype {tensor.dtype}; the wire carries {supported}")
    if tensor.layout != torch.strided:
        raise ValueError(f"tensor {name!r}: only dense (strided) tensors can be sent; got layout {tensor.layout}")
    if tensor.dim() > MAX_NDIM:
        raise ValueError(f"tensor {name!r} has {tensor.dim()} dimensions; at most {MAX_NDIM}")
    src = tensor.detach().cpu().resolve_neg().contiguous()  # each step returns its input when there is nothing to do
    encoding = _wire_encoding(src, compression)
    itemsize = src.element_size() if encoding == _RAW else _WIRE_ITEMSIZE[encoding]
    row_len = src.shape[-1] if encoding == _INT8 else 0
    return _Part(name, src, _DTYPE_CODES[src.dtype], encoding, src.numel() * itemsize, row_len)


def _encode_meta(meta: dict) -> bytes:
    if not meta:
        return b""
    try:
        data = json.dumps(meta, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except TypeError as exc:
        raise TypeError(f"frame.meta must be JSON-serialisable: {exc}") from exc
    except ValueError as exc:  # nan or inf, a circular reference, a lone surrogate
        raise ValueError(f"frame.meta must be JSON-serialisable: {exc}") from exc
    if len(data) > MAX_META_BYTES:
        raise ValueError(f"frame.meta is {len(data)} bytes as JSON; at most {MAX_META_BYTES} (send data as tensors)")
    return data


def encode_frame(frame: Frame, compression: str | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The frame's bytes, as a new 1-D uint8 CPU tensor (see the module docstring for the layout).

    compression: None, "fp16", "bf16" or "int8"; applies to floating tensors only, with the error
    bounds in the module docstring. Raises ValueError for a field or tensor the wire cannot carry, a
    finite value that would overflow fp16/bf16, or a non-finite row under int8.

    out: a 1-D uint8 CPU tensor to write the frame into instead (ValueError if it is too small); the
    result is then its first bytes. Reusing one send buffer saves the page faults of fresh memory,
    which cost more than the encoding itself for frames of megabytes.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}; got {compression!r}")
    if not isinstance(frame, Frame):
        raise TypeError(f"encode_frame takes a Frame; got {type(frame).__name__}")
    C = _require()
    frame.check()
    meta = _encode_meta(frame.meta)
    parts = [_plan(name, t, compression) for name, t in frame.tensors.items()]

    # Lay the frame out. Everything but the tensor data and int8 scales is collected in `pieces`
    # (offset, bytes), padding included, and written first; C++ then fills the data in frame order,
    # checksumming each chunk as it writes it.
    pieces = [(HEADER_BYTES, meta + bytes(_pad(len(meta))))]
    offset = HEADER_BYTES + len(meta) + _pad(len(meta))
    for part in parts:
        name = part.name.encode("utf-8")
        shape = part.src.shape
        head = _DESCRIPTOR.pack(len(name), part.dtype_code, part.encoding, len(shape), part.data_bytes)
        head += struct.pack(f"<{len(shape)}Q", *shape) + name
        head += bytes(_pad(len(head)))
        pieces.append((offset, head))
        offset += len(head)
        part.data_offset = offset
        offset += part.data_bytes
        pieces.append((offset, bytes(_pad(offset))))
        offset += _pad(offset)
        if part.encoding == _INT8:
            part.scales_offset = offset
            offset += 4 * (part.src.numel() // part.row_len)
            pieces.append((offset, bytes(_pad(offset))))
            offset += _pad(offset)
    total = offset

    if out is None:
        out = torch.empty(total, dtype=torch.uint8)
    else:
        _check_bytes_tensor(out, "out")
        if out.numel() < total:
            raise ValueError(f"out holds {out.numel()} bytes; this frame needs {total}")
        out = out[:total]
    view = memoryview(out.numpy())
    view[:HEADER_BYTES] = _HEADER.pack(
        MAGIC,
        VERSION,
        frame.kind,
        frame.sign,
        0,  # flags
        frame.client_id,
        frame.step,
        frame.probe,
        len(parts),
        len(meta),
        0,  # crc32c, filled in last; the CRC covers these bytes as zeros
        total - HEADER_BYTES,
    )
    for at, piece in pieces:
        view[at : at + len(piece)] = piece
    ptr = out.data_ptr()
    crc, done = 0, 0
    for part in parts:
        try:
            crc = C.encode_tensor(
                ptr,
                total,
                crc,
                done,
                part.data_offset,
                part.encoding,
                part.src.data_ptr(),
                part.dtype_code,
                part.src.numel(),
                part.row_len,
                part.scales_offset,
            )
        except ValueError as exc:
            raise ValueError(f"tensor {part.name!r}: {exc}") from None
        done = part.data_offset + part.data_bytes
    crc = C.crc32c(ptr + done, total - done, crc)
    struct.pack_into("<I", view, _CRC_OFFSET, crc)
    return out


# ---------------------------------------------------------------------------------------- decoding


class _Reader:
    """Walks a frame front to back; every step is bounds-checked."""

    def __init__(self, view: memoryview, offset: int):
        self.view = view
        self.offset = offset

    def take(self, nbytes: int, what: str) -> memoryview:
        end = self.offset + nbytes
        if end > len(self.view):
            raise FrameError(
                f"{what} runs past the end of the frame ({nbytes} bytes at offset {self.offset}, "
                f"frame is {len(self.view)} bytes)"
            )
        piece = self.view[self.offset : end]
        self.offset = end
        return piece

    def skip_pad(self, what: str) -> None:
        pad = self.take(_pad(self.offset), f"padding after {what}")
        if any(pad):
            raise FrameError(f"nonzero padding after {what} at offset {self.offset - len(pad)}")


def _read_header(view: memoryview, max_bytes: int) -> tuple:
    n = len(view)
    if n >= 4 and view[:4] != MAGIC:
        raise FrameError(f"bad magic {bytes(view[:4])!r} (expected {MAGIC!r})")
    if n < HEADER_BYTES:
        raise FrameError(f"truncated: {n} bytes, shorter than the {HEADER_BYTES}-byte header")
    fields = _HEADER.unpack_from(view, 0)
    _, version, kind, sign, flags, _, _, _, count, meta_bytes, _, payload = fields
    if version != VERSION:
        raise FrameError(f"unsupported version {version} (this reader understands version {VERSION})")
    total = HEADER_BYTES + payload
    if total > max_bytes:
        raise FrameError(f"oversized: header says {total} bytes, more than max_bytes={max_bytes}")
    if n < total:
        raise FrameError(f"truncated: header says {total} bytes, got {n}")
    if n > total:
        raise FrameError(f"trailing bytes: header says {total} bytes, got {n}")
    if flags != 0:
        raise FrameError(f"unsupported flags 0x{flags:08x} (version {VERSION} defines none)")
    if kind not in Kind._value2member_map_:
        raise FrameError(f"unknown kind {kind}")
    if sign not in (-1, 0, 1):
        raise FrameError(f"bad sign {sign} (must be -1, 0 or 1)")
    if meta_bytes > min(payload, MAX_META_BYTES):
        raise FrameError(f"bad metadata length {meta_bytes} (payload {payload} bytes, limit {MAX_META_BYTES})")
    if count > payload // _DESCRIPTOR.size:
        raise FrameError(f"bad tensor count {count} for a {payload}-byte payload")
    return fields


def _decode_meta(data: memoryview) -> dict:
    if not data:
        return {}
    try:
        meta = json.loads(data.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"bad metadata: not UTF-8 JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise FrameError(f"bad metadata: a JSON {type(meta).__name__}, not an object")
    return meta


def _read_tensor(C, reader: _Reader, frame_ptr: int, index: int, budget: list[int]) -> tuple[str, torch.Tensor]:
    def bad(msg):
        return FrameError(f"bad tensor descriptor #{index}: {msg}")

    where = f"tensor #{index}"
    name_len, dtype_code, encoding, ndim, data_bytes = _DESCRIPTOR.unpack(reader.take(16, f"{where} descriptor"))
    dtype = _CODE_DTYPES.get(dtype_code)
    if dtype is None:
        raise bad(f"unknown dtype code {dtype_code}")
    if encoding not in _ENCODING_NAMES:
        raise bad(f"unknown encoding {encoding}")
    if encoding != _RAW and dtype not in _FLOATING:
        raise bad(f"encoding {_ENCODING_NAMES[encoding]} for a {dtype} tensor (only floating tensors are compressed)")
    if ndim > MAX_NDIM:
        raise bad(f"ndim {ndim} (at most {MAX_NDIM})")
    shape = struct.unpack(f"<{ndim}Q", reader.take(8 * ndim, f"{where} shape"))
    # torch computes C-order strides from the sizes (with 0 counted as 1): they must fit in an int64.
    if math.prod(max(d, 1) for d in shape) >= 1 << 63:
        raise bad(f"shape {list(shape)} is too large")
    try:
        name = reader.take(name_len, f"{where} name").tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise bad("name is not UTF-8") from None
    reader.skip_pad(f"{where} name")
    numel = math.prod(shape)
    itemsize = dtype.itemsize if encoding == _RAW else _WIRE_ITEMSIZE[encoding]
    if data_bytes != numel * itemsize:
        raise bad(
            f"{name!r} has {data_bytes} data bytes; shape {list(shape)} in {_ENCODING_NAMES[encoding]} "
            f"needs {numel * itemsize}"
        )
    if encoding == _INT8 and (ndim == 0 or numel == 0):
        raise bad(f"{name!r}: int8 encoding needs a tensor with dimensions and elements")
    data_offset = reader.offset
    reader.take(data_bytes, f"{where} data")
    reader.skip_pad(f"{where} data")
    row_len, scales_offset = 0, 0
    if encoding == _INT8:
        row_len = shape[-1]
        scales_offset = reader.offset
        reader.take(4 * (numel // row_len), f"{where} int8 scales")
        reader.skip_pad(f"{where} int8 scales")
    budget[0] -= numel * dtype.itemsize
    if budget[0] < 0:
        raise FrameError(f"oversized: tensor #{index} ({name!r}) takes the decoded data past max_bytes")
    out = torch.empty(shape, dtype=dtype)
    bad_row = C.decode_tensor(
        frame_ptr,
        len(reader.view),
        data_offset,
        encoding,
        dtype_code,
        numel,
        row_len,
        scales_offset,
        out.data_ptr(),
    )
    if bad_row >= 0:
        raise FrameError(f"bad tensor data #{index} ({name!r}): int8 scale of row {bad_row} is negative or not finite")
    if dtype == torch.bool and numel and out.view(torch.uint8).max() > 1:
        raise FrameError(f"bad tensor data #{index} ({name!r}): bool bytes other than 0 and 1")
    return name, out


def decode_frame(buf, *, max_bytes: int = MAX_FRAME_BYTES, max_tensors: int = MAX_TENSORS) -> Frame:
    """The Frame in buf (a uint8 tensor, bytes, bytearray or memoryview holding exactly one frame).

    Raises FrameError, saying what was wrong, unless buf is a well-formed version-1 frame of at most
    max_bytes bytes, whose CRC matches, with at most max_tensors tensors holding at most max_bytes
    bytes once decoded. The tensors returned are new CPU tensors; buf can be reused.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes < HEADER_BYTES:
        raise ValueError(f"max_bytes must be an int >= {HEADER_BYTES}; got {max_bytes!r}")
    if isinstance(max_tensors, bool) or not isinstance(max_tensors, numbers.Integral) or max_tensors < 0:
        raise ValueError(f"max_tensors must be an int >= 0; got {max_tensors!r}")
    C = _require()
    view, ptr, _owner = _bytes_of(buf)
    fields = _read_header(view, max_bytes)
    _, _, kind, sign, _, client_id, step, probe, count, meta_bytes, crc, _ = fields
    if count > max_tensors:
        raise FrameError(f"oversized: {count} tensors, more than max_tensors={max_tensors}")

    # The CRC before anything past the header is read: bytes damaged on the way are reported as such.
    header = bytearray(view[:HEADER_BYTES])
    header[_CRC_OFFSET : _CRC_OFFSET + 4] = bytes(4)
    actual = crc32c(header)
    actual = C.crc32c(ptr + HEADER_BYTES, len(view) - HEADER_BYTES, actual)
    if actual != crc:
        raise FrameError(f"CRC mismatch: header says 0x{crc:08x}, the bytes give 0x{actual:08x}")

    reader = _Reader(view, HEADER_BYTES)
    meta = _decode_meta(reader.take(meta_bytes, "metadata"))
    reader.skip_pad("metadata")
    tensors = {}
    budget = [max_bytes]  # decoded bytes left
    for index in range(count):
        name, tensor = _read_tensor(C, reader, ptr, index, budget)
        if name in tensors:
            raise FrameError(f"bad tensor descriptor #{index}: duplicate name {name!r}")
        tensors[name] = tensor
    if reader.offset != len(view):
        raise FrameError(f"trailing bytes: {len(view) - reader.offset} after the last tensor")
    return Frame(Kind(kind), step=step, probe=probe, sign=sign, client_id=client_id, tensors=tensors, meta=meta)


# ------------------------------------------------------------------------------------ FrameQueue


def _check_bytes_tensor(t, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise TypeError(f"{what} must be a 1-D uint8 tensor; got {getattr(t, 'dtype', type(t).__name__)}")
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous CPU tensor")


class FrameQueue:
    """A bounded FIFO of encoded frames between threads: `put(encode_frame(f))` on one side,
    `decode_frame(get())` on the other.

    A thin layer over hosl._C.BoundaryBuffer: `slots` preallocated slots of `slot_bytes` bytes (the
    largest frame). put blocks while every slot is full (backpressure), get while none is; both wait
    without the GIL, up to `timeout` seconds (None: forever) before raising TimeoutError. After
    close(), put raises BufferClosedError and get returns the frames still held, then raises it.
    """

    def __init__(self, slots: int, slot_bytes: int):
        C = _ext.require("hosl.boundary.FrameQueue")
        self.buffer = C.BoundaryBuffer(slots, slot_bytes)
        self._recv = torch.empty(slot_bytes, dtype=torch.uint8)

    def put(self, frame: torch.Tensor, timeout: float | None = None) -> None:
        """Copies an encoded frame (1-D uint8 CPU tensor) into the queue; ValueError if it exceeds slot_bytes."""
        _check_bytes_tensor(frame, "frame")
        self.buffer.push(frame.data_ptr(), frame.numel(), timeout)

    def get(self, timeout: float | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The oldest frame, as a view of `out` (1-D uint8 CPU) or else of the queue's own receive
        tensor. The latter is overwritten by the next get, so use it from one consumer thread and
        decode (decode_frame copies) or clone it before getting again."""
        dst = self._recv if out is None else out
        _check_bytes_tensor(dst, "out")
        n = self.buffer.pop_into(dst.data_ptr(), dst.numel(), timeout)
        return dst[:n]

    def close(self) -> None:
        """Refuses further puts and wakes every waiting put and get."""
        self.buffer.close()

    @property
    def closed(self) -> bool:
        return self.buffer.closed

    def __len__(self) -> int:
        return self.buffer.size
