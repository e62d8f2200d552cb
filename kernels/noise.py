# Fused seeded-noise kernel: x[i] += sum_k scale_k * z(seed_k, offset + i), in place, with z
# regenerated from the seed inside the kernel and never stored.
#
# Design: each program owns BLOCK consecutive Philox counters, i.e. the 4 * BLOCK consecutive noise
# positions [4 * c, 4 * c + 4 * BLOCK), which map onto one contiguous, coalesced slice of x. One
# Philox4x32-10 call per counter feeds all four lanes (tl.randn uses two of the four words). The
# terms loop runs inside the kernel, so restoring one probe and applying the next, or restoring and
# updating with Q probes, is one read and one write of x however many terms there are.
# _noise_rows_kernel does the same on chosen rows of an embedding table: a 2-D grid (row, block of
# the row's counters), each element at the position it has in the dense layout.
#
# Numerics: the same steps as hosl/reference.py and csrc/noise.h, op for op, so the backends agree
# bit for bit. That needs: launches with enable_fp_fusion=False (no FMA contraction); div_rn and
# sqrt_rn (Triton's plain float32 `/` and sqrt are approximate on NVIDIA GPUs); and bfloat16
# rounding by hand (the interpreter truncates float32 -> bfloat16 casts).
import triton
import triton.language as tl

from hosl import reference as ref

_M0: tl.constexpr = tl.constexpr(ref.PHILOX_M0)
_M1: tl.constexpr = tl.constexpr(ref.PHILOX_M1)
_W0: tl.constexpr = tl.constexpr(ref.PHILOX_W0)
_W1: tl.constexpr = tl.constexpr(ref.PHILOX_W1)
_ROUNDS: tl.constexpr = tl.constexpr(ref.PHILOX_ROUNDS)
_LG1: tl.constexpr = tl.constexpr(ref.LG1)
_LG2: tl.constexpr = tl.constexpr(ref.LG2)
_LG3: tl.constexpr = tl.constexpr(ref.LG3)
_LG4: tl.constexpr = tl.constexpr(ref.LG4)
_LN2_HI: tl.constexpr = tl.constexpr(ref.LN2_HI)
_LN2_LO: tl.constexpr = tl.constexpr(ref.LN2_LO)
_SQRT2_BITS: tl.constexpr = tl.constexpr(ref.SQRT2_BITS)
_S1: tl.constexpr = tl.constexpr(ref.S1)
_S2: tl.constexpr = tl.constexpr(ref.S2)
_S3: tl.constexpr = tl.constexpr(ref.S3)
_S4: tl.constexpr = tl.constexpr(ref.S4)
_C1: tl.constexpr = tl.constexpr(ref.C1)
_C2: tl.constexpr = tl.constexpr(ref.C2)
_C3: tl.constexpr = tl.constexpr(ref.C3)
_C4: tl.constexpr = tl.constexpr(ref.C4)
_C5: tl.constexpr = tl.constexpr(ref.C5)
_ANGLE_STEP: tl.constexpr = tl.constexpr(ref.ANGLE_STEP)
_TWO_POW_MINUS_24: tl.constexpr = tl.constexpr(ref.TWO_POW_MINUS_24)

DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


@triton.jit
def _philox(c0, c1, k0, k1):
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(_ROUNDS):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_M1, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(_M0, _c0) ^ c3 ^ k1
        c1 = tl.mul(_M1, _c2, sanitize_overflow=False)
        c3 = tl.mul(_M0, _c0, sanitize_overflow=False)
        k0 = tl.add(k0, _W0, sanitize_overflow=False)
        k1 = tl.add(k1, _W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _log_unit(u):
    bits = u.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    mbits = (bits & 0x007FFFFF) | 0x3F800000
    big = mbits > _SQRT2_BITS
    mbits = tl.where(big, mbits - 0x00800000, mbits)
    e = tl.where(big, e + 1, e)
    f = mbits.to(tl.float32, bitcast=True) - 1.0
    s = tl.math.div_rn(f, f + 2.0)
    z = s * s
    w = z * z
    t1 = w * (w * _LG4 + _LG2)
    t2 = z * (w * _LG3 + _LG1)
    r = t2 + t1
    hfsq = (f * 0.5) * f
    k = e.to(tl.float32)
    return k * _LN2_HI - ((hfsq - (s * (hfsq + r) + k * _LN2_LO)) - f)


@triton.jit
def _box_muller(a, b):
    u = ((a >> 8).to(tl.int32) + 1).to(tl.float32) * _TWO_POW_MINUS_24
    radius = tl.math.sqrt_rn(_log_unit(u) * -2.0)
    # 2 pi y / 2^24 = quadrant * pi / 2 + rem * pi / 2^23, rem in [-2^21, 2^21): exact in integers.
    y = (b >> 8).to(tl.int32)
    qq = (y + (1 << 21)) >> 22
    rem = y - (qq << 22)
    q = qq & 3
    a1 = rem.to(tl.float32) * _ANGLE_STEP
    a2 = a1 * a1
    ps = _S3 + a2 * _S4
    ps = _S2 + a2 * ps
    ps = _S1 + a2 * ps
    sn = a1 + (a1 * a2) * ps
    pc = _C4 + a2 * _C5
    pc = _C3 + a2 * pc
    pc = _C2 + a2 * pc
    pc = _C1 + a2 * pc
    cs = a2 * pc + 1.0
    cos_t = tl.where(q == 0, cs, tl.where(q == 1, _neg(sn), tl.where(q == 2, _neg(cs), sn)))
    sin_t = tl.where(q == 0, sn, tl.where(q == 1, cs, tl.where(q == 2, _neg(sn), _neg(cs))))
    return radius * cos_t, radius * sin_t


@triton.jit
def _neg(x):
    # The sign bit flipped, as C++'s and torch's unary minus do. Triton compiles `-x` as `0 - x`,
    # which gives +0 for x = +0 (sn is +0 when rem is 0), so the GPU's z had +0 where theirs had -0.
    return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)


@triton.jit
def _normals(seed, c_lo, c_hi, BLOCK: tl.constexpr):
    """The 4 * BLOCK normals of BLOCK counters, in position order (counter-major, lane-minor)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    x0, x1, x2, x3 = _philox(c_lo, c_hi, k0, k1)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    # join stacks on a new last axis: join(join(z0, z2), join(z1, z3))[i, m, j] is lane 2 m + j,
    # so the row-major flattening is 4 i + lane, position order.
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * BLOCK])


@triton.jit
def _round_to_bf16(acc):
    # Round to nearest even by hand; NaN becomes a quiet NaN with its sign.
    bits = acc.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    out = tl.where(nan, (bits >> 16) | 0x0040, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=["n", "offset", "counter0", "num_terms"])
def _noise_kernel(
    x_ptr,
    n,
    offset,
    counter0,
    seeds_ptr,
    scales_ptr,
    num_terms,
    ACCUMULATE: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    counter = counter0.to(tl.int64) + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    # The program's positions 4 * counter[0] + [0, 4 * BLOCK) are one contiguous slice of x.
    first = (counter0.to(tl.int64) + pid * BLOCK) * 4 - offset.to(tl.int64)
    idx = first + tl.arange(0, 4 * BLOCK).to(tl.int64)
    mask = (idx >= 0) & (idx < n)
    if ACCUMULATE:
        acc = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        for k in range(num_terms):
            seed = tl.load(seeds_ptr + k)
            scale = tl.load(scales_ptr + k)
            acc = acc + scale * _normals(seed, c_lo, c_hi, BLOCK)
    else:
        acc = _normals(tl.load(seeds_ptr), c_lo, c_hi, BLOCK)
    if DTYPE == 1:
        tl.store(x_ptr + idx, _round_to_bf16(acc), mask=mask)
    elif DTYPE == 2:
        tl.store(x_ptr + idx, acc.to(tl.float16), mask=mask)  # round to nearest even on every target
    else:
        tl.store(x_ptr + idx, acc, mask=mask)


@triton.jit(do_not_specialize=["width", "offset", "num_terms"])
def _noise_rows_kernel(
    x_ptr,
    rows_ptr,
    width,
    offset,
    seeds_ptr,
    scales_ptr,
    num_terms,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (i, b) owns counters [c0 + b * BLOCK, c0 + (b + 1) * BLOCK) of table row rows[i], where
    # c0 = (offset + r * width) // 4: the counters of the row's positions in the dense layout. A row
    # need not start on a counter, so its first and last counters are shared with the rows beside
    # it; the mask keeps the row's own elements, which makes each element's value exactly the one
    # _noise_kernel gives it.
    row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    width = width.to(tl.int64)
    offset = offset.to(tl.int64)
    start = row * width
    block0 = (offset + start) // 4 + tl.program_id(1).to(tl.int64) * BLOCK
    counter = block0 + tl.arange(0, BLOCK).to(tl.int64)
    c_lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    c_hi = (counter >> 32).to(tl.uint32)
    idx = block0 * 4 - offset + tl.arange(0, 4 * BLOCK).to(tl.int64)
    mask = (idx >= start) & (idx < start + width)
    acc = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    for k in range(num_terms):
        seed = tl.load(seeds_ptr + k)
        scale = tl.load(scales_ptr + k)
        acc = acc + scale * _normals(seed, c_lo, c_hi, BLOCK)
    if DTYPE == 1:
        tl.store(x_ptr + idx, _round_to_bf16(acc), mask=mask)
    elif DTYPE == 2:
        tl.store(x_ptr + idx, acc.to(tl.float16), mask=mask)
    else:
        tl.store(x_ptr + idx, acc, mask=mask)


def _launch(x, seeds, scales, offset, accumulate, block):
    n = x.numel()
    if n == 0:
        return x
    counter0 = offset // 4
    num_counters = (offset + n - 1) // 4 - counter0 + 1
    grid = (triton.cdiv(num_counters, block),)
    _noise_kernel[grid](
        x,
        n,
        offset,
        counter0,
        seeds,
        scales,
        seeds.numel(),
        ACCUMULATE=accumulate,
        DTYPE=DTYPE_CODES[str(x.dtype).removeprefix("torch.")],
        BLOCK=block,
        enable_fp_fusion=False,
    )
    return x


def add_noise_(x, seeds, scales, offset, block):
    """x (contiguous, float32/bfloat16/float16) += sum_k scales[k] * z(seeds[k], offset + i).
    seeds: int64 tensor, scales: float32 tensor, both on x's device; checked by hosl.noise."""
    return _launch(x, seeds, scales, offset, True, block)


def gaussian_(out, seed, offset, block):
    """Fills float32 out with z(seed[0], offset + i); seed: a one-element int64 tensor."""
    return _launch(out, seed, seed, offset, False, block)


# Smallest program of the rows kernel: a narrow row (width < 4 * 16) still gets 16 counters, so
# tensor shapes stay ordinary ones (the dense kernel never runs below 256); the waste is a few
# dozen normals per row.
_MIN_ROW_BLOCK = 16


def add_noise_rows_(table, rows, seeds, scales, offset, block):
    """For each r in rows and j < width: table[r, j] += sum_k scales[k] * z(seeds[k], offset + r * width + j).
    table: contiguous (num_rows, width), float32/bfloat16/float16; rows: sorted, distinct, valid int64
    row indices, a tensor on table's device; seeds, scales as for add_noise_; checked by hosl.noise.
    block: the most counters per program."""
    width = table.shape[1]
    if rows.numel() == 0 or width == 0:
        return table
    # A row's positions [p, p + width) touch at most (width + 2) // 4 + 1 counters (p % 4 == 3 is
    # the worst case); programs beyond a row's own last counter store nothing.
    row_counters = (width + 2) // 4 + 1
    block = min(block, max(_MIN_ROW_BLOCK, triton.next_power_of_2(row_counters)))
    grid = (rows.numel(), triton.cdiv(row_counters, block))
    _noise_rows_kernel[grid](
        table,
        rows,
        width,
        offset,
        seeds,
        scales,
        seeds.numel(),
        DTYPE=DTYPE_CODES[str(table.dtype).removeprefix("torch.")],
        BLOCK=block,
        enable_fp_fusion=False,
    )
    return table
