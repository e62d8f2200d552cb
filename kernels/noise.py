# Fused seeded-noise kernels: x[i] += sum_k scale_k * z(seed_k, offset + i), in place, with z
# regenerated from the seed inside the kernel and never stored. Installed as hosl.kernels.noise;
# hosl.noise checks the arguments and calls add_noise_, add_noise_rows_ and gaussian_ below.
# Importing this module imports Triton, which runs kernels on a CPU only through its interpreter
# (TRITON_INTERPRET=1 in the environment before Triton is first imported).
#
# Layout. Noise position p is lane p % 4 of Philox counter p // 4, and one Philox4x32-10 call gives
# a counter's four lanes. A program works on a 2-D tile [BLOCK, 4 * VEC]: row r holds VEC whole
# consecutive counters, i.e. 4 * VEC consecutive elements of x, so each thread's elements are
# contiguous and x moves in 128-bit vectors (VEC = 1 for float32, 2 for the 16-bit types). The
# normals are computed per counter (a [BLOCK, 1] column of the tile) and placed into the tile by
# lane with selects on the tile's own column index, so z is born in the layout x is loaded in: no
# layout conversion, no shared memory, no barrier.
#
# Alignment. The body of a pass is its whole groups of VEC counters, addressed from `body`, a view
# of x starting on a whole counter (and, for VEC = 2, on a 16-byte boundary where the memory
# allows), so the compiler sees offsets that are multiples of 4 * VEC elements and masks that are
# constant over a row. One extra program, the edge, does the at most 2 counters before the body and
# the at most 2 after its last whole group, element by element. A pass is one launch. The rows
# kernel does the same on tables whose rows are whole groups (offset and width multiples of
# 4 * VEC, as real embedding tables are); other tables go lane by lane (_apply_by_lane), in scalar
# accesses, still with no layout conversion.
#
# Terms. Passes of one or two terms (16 of the 17 passes of a Q = 8 step) take their seeds and
# scales as scalar arguments (NUM_TERMS = 1 or 2: two compilations); longer ones (NUM_TERMS = 0)
# read (seed words, scale bits) triples from a small device tensor that the launcher stages
# without blocking the host. A seed travels as two 32-bit words, so its argument type never
# depends on its value.
#
# Rademacher directions (_signs_kernel, _signs_rows_kernel): r(seed, p) = +-1 is bit p % 32 of word
# (p % 128) // 32 of Philox counter p // 128. A program's tile is [BLOCK, 128]: row c holds counter
# c's 128 positions, the words computed once per row and a column's bit picked by select; scale * r
# is scale with its sign bit flipped (exact), and the terms add in float32 in order as for z.
#
# Numerics: the same steps as hosl/reference.py and csrc/noise.h, op for op, so the backends agree
# bit for bit. That needs: launches with enable_fp_fusion=False (no FMA contraction); div_rn and
# sqrt_rn (Triton's plain float32 `/` and sqrt are approximate on NVIDIA GPUs); and bfloat16
# rounding by hand (the interpreter truncates float32 -> bfloat16 casts). The results do not depend
# on BLOCK, VEC or num_warps, so tuning them changes no bit.
import functools
import struct

import torch
import triton
import triton.language as tl
import triton.testing

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
    q = (qq & 3).to(tl.uint32)
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
    # Rotate by the quadrant in bits, as csrc/noise.h does: odd quadrants swap cos and sin; cos is
    # negated in quadrants 1 and 2, sin in 2 and 3. A negation flips the sign bit, as C++'s and
    # torch's unary minus do (Triton's `-x` is `0 - x`, which gives +0 for x = +0).
    swap = 0 - (q & 1)
    cs_bits = cs.to(tl.uint32, bitcast=True)
    sn_bits = sn.to(tl.uint32, bitcast=True)
    neg_cos = ((q ^ (q >> 1)) & 1) << 31
    neg_sin = (q >> 1) << 31
    cos_t = (((cs_bits & ~swap) | (sn_bits & swap)) ^ neg_cos).to(tl.float32, bitcast=True)
    sin_t = (((sn_bits & ~swap) | (cs_bits & swap)) ^ neg_sin).to(tl.float32, bitcast=True)
    return radius * cos_t, radius * sin_t


@triton.jit
def _normals_by_lane(k0, k1, counter, lane):
    """z at lane `lane` ([1, L] ints in [0, 4)) of each counter ([R, 1] int64): an [R, L] tile, each
    lane's normal picked by a select, so the tile has the layout of the columns it is computed in
    (no join, no reshape)."""
    x0, x1, x2, x3 = _philox((counter & 0xFFFFFFFF).to(tl.uint32), (counter >> 32).to(tl.uint32), k0, k1)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    return tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))


@triton.jit
def _normals(k0, k1, counter, col, VEC: tl.constexpr):
    """z of a [R, 4 * VEC] tile whose row r holds counters counter[r] + [0, VEC), col = [0, 4 * VEC)."""
    lane = col % 4
    counter = counter[:, None]
    z = _normals_by_lane(k0, k1, counter, lane)
    for v in tl.static_range(1, VEC):
        z = tl.where(col // 4 == v, _normals_by_lane(k0, k1, counter + v, lane), z)
    return z


@triton.jit
def _round_to_bf16(acc):
    # Round to nearest even by hand; NaN becomes a quiet NaN with its sign.
    bits = acc.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    out = tl.where(nan, (bits >> 16) | 0x0040, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _term(k, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS: tl.constexpr):
    """Term k's Philox key (the seed's two 32-bit words, passed as signed 32-bit ints) and scale:
    from the scalar arguments (NUM_TERMS 1 or 2, k a compile-time index) or from the staged
    (lo, hi, scale bits) triples (NUM_TERMS 0)."""
    if NUM_TERMS == 0:
        lo = tl.load(terms_ptr + 3 * k)
        hi = tl.load(terms_ptr + 3 * k + 1)
        scale = tl.load(terms_ptr + 3 * k + 2).to(tl.float32, bitcast=True)
    elif k == 0:
        lo, hi, scale = a_lo, a_hi, a_scale
    else:
        lo, hi, scale = b_lo, b_hi, b_scale
    return lo.to(tl.uint32, bitcast=True), hi.to(tl.uint32, bitcast=True), scale


@triton.jit
def _store(ptrs, acc, mask):
    """float32 acc rounded once (to nearest even) into the pointer's dtype and stored."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, _round_to_bf16(acc), mask=mask)
    elif ptrs.dtype.element_ty == tl.float16:
        tl.store(ptrs, acc.to(tl.float16), mask=mask)  # round to nearest even on every target
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _apply(
    ptrs,
    mask,
    counter,
    col,
    a_lo,
    a_hi,
    a_scale,
    b_lo,
    b_hi,
    b_scale,
    terms_ptr,
    num_terms,
    NUM_TERMS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    VEC: tl.constexpr,
):
    """The accumulate-and-store of a tile: *ptrs += sum_k scale_k * z(seed_k, .) in float32, in
    the order of the terms, rounded once into the pointer's dtype. With ACCUMULATE false, *ptrs =
    z of the first term (its scale unused)."""
    if ACCUMULATE:
        acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if NUM_TERMS == 0:
            for k in range(num_terms):
                k0, k1, scale = _term(k, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS)
                acc = acc + scale * _normals(k0, k1, counter, col, VEC)
        else:
            for k in tl.static_range(NUM_TERMS):
                k0, k1, scale = _term(k, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS)
                acc = acc + scale * _normals(k0, k1, counter, col, VEC)
    else:
        k0, k1, _ = _term(0, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS)
        acc = _normals(k0, k1, counter, col, VEC)
    _store(ptrs, acc, mask)


@triton.jit
def _add_by_lane(acc0, acc1, acc2, acc3, k0, k1, scale, counter):
    x0, x1, x2, x3 = _philox((counter & 0xFFFFFFFF).to(tl.uint32), (counter >> 32).to(tl.uint32), k0, k1)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    return acc0 + scale * z0, acc1 + scale * z1, acc2 + scale * z2, acc3 + scale * z3


@triton.jit
def _apply_by_lane(
    ptr, first, lo, hi, counter, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, num_terms,
    NUM_TERMS: tl.constexpr,
):  # fmt: skip
    """_apply for elements whose alignment the compiler cannot know: lane l of each counter in a
    vector of its own (ptr + l, element first + l, stride 4 between counters), so the loads, the
    normals and the stores share one 1-D layout; a tile of such rows would be loaded in a
    coalescing layout and converted once per term. Adds to the elements with index in [lo, hi)."""
    m0 = (first >= lo) & (first < hi)
    m1 = (first + 1 >= lo) & (first + 1 < hi)
    m2 = (first + 2 >= lo) & (first + 2 < hi)
    m3 = (first + 3 >= lo) & (first + 3 < hi)
    acc0 = tl.load(ptr, mask=m0, other=0.0).to(tl.float32)
    acc1 = tl.load(ptr + 1, mask=m1, other=0.0).to(tl.float32)
    acc2 = tl.load(ptr + 2, mask=m2, other=0.0).to(tl.float32)
    acc3 = tl.load(ptr + 3, mask=m3, other=0.0).to(tl.float32)
    if NUM_TERMS == 0:
        for k in range(num_terms):
            k0, k1, scale = _term(k, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS)
            acc0, acc1, acc2, acc3 = _add_by_lane(acc0, acc1, acc2, acc3, k0, k1, scale, counter)
    else:
        for k in tl.static_range(NUM_TERMS):
            k0, k1, scale = _term(k, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS)
            acc0, acc1, acc2, acc3 = _add_by_lane(acc0, acc1, acc2, acc3, k0, k1, scale, counter)
    _store(ptr, acc0, m0)
    _store(ptr + 1, acc1, m1)
    _store(ptr + 2, acc2, m2)
    _store(ptr + 3, acc3, m3)


@triton.jit
def _counter_base(lo, hi):
    """An int64 from its two 32-bit words passed as signed 32-bit ints."""
    return (hi.to(tl.int64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)


_SCALARS = ["c_lo", "c_hi", "a_lo", "a_hi", "b_lo", "b_hi", "num_terms", "size_class"]


@triton.jit(do_not_specialize=["n", "head", "before", "groups", "tail", *_SCALARS])
def _noise_kernel(
    x_ptr,
    body_ptr,
    n,
    head,
    before,
    groups,
    tail,
    c_lo,
    c_hi,
    a_lo,
    a_hi,
    a_scale,
    b_lo,
    b_hi,
    b_scale,
    terms_ptr,
    num_terms,
    size_class,
    NUM_TERMS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # x holds positions [p0, p0 + n). The body, x[head:], starts on counter `base`, the first whole
    # counter (ceil(p0 / 4)) or, for VEC = 2, the next one where that puts the body on a 16-byte
    # boundary. Body programs own BLOCK groups of VEC counters each; the last program (when the
    # launcher adds it) is the edge: the `before` (0 to 2) counters before base that x touches
    # and the `tail` (0 to 2) counters after the last whole group, whole or partial. size_class is
    # the tuning key.
    base = _counter_base(c_lo, c_hi)
    pid = tl.program_id(0)
    if pid < tl.cdiv(groups, BLOCK):
        group = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        col = tl.arange(0, 4 * VEC)[None, :]
        ptrs = body_ptr + (group * (4 * VEC))[:, None] + col
        mask = tl.broadcast_to((group < groups)[:, None], [BLOCK, 4 * VEC])
        counter = base + group * VEC
        _apply(
            ptrs, mask, counter, col, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, num_terms,
            NUM_TERMS, ACCUMULATE, VEC,
        )  # fmt: skip
    else:
        # Slots 0, 1: the counters base - 2, base - 1 (the head's: `before` of them are x's);
        # slots 2, 3: the `tail` counters after the last whole group. (The names differ from the
        # body's: Triton needs a name bound in both branches to keep its type.)
        slot = tl.arange(0, 4).to(tl.int64)
        e_counter = tl.where(slot < 2, base - 2 + slot, base + groups.to(tl.int64) * VEC + slot - 2)
        e_used = tl.where(slot < 2, slot + before >= 2, slot - 2 < tail)  # tensor compares: bool when interpreted too
        e_col = tl.arange(0, 4)[None, :]
        e_idx = ((e_counter - base) * 4 + head)[:, None] + e_col
        e_mask = e_used[:, None] & (e_idx >= 0) & (e_idx < n)
        _apply(
            x_ptr + e_idx, e_mask, e_counter, e_col, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, num_terms,
            NUM_TERMS, ACCUMULATE, 1,
        )  # fmt: skip


@triton.jit(do_not_specialize=["width", "row_groups", "offset", *_SCALARS])
def _noise_rows_kernel(
    x_ptr,
    rows_ptr,
    width,
    row_groups,
    offset,
    c_lo,
    c_hi,
    a_lo,
    a_hi,
    a_scale,
    b_lo,
    b_hi,
    b_scale,
    terms_ptr,
    num_terms,
    size_class,
    NUM_TERMS: tl.constexpr,
    ALIGNED: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Program (i, b) works on table row r = rows[i], at the positions the row has in the dense
    # layout, so each element gets exactly the value _noise_kernel gives it. ALIGNED (the offset
    # and the width multiples of 4 * VEC, as for the embedding tables of real models): the row is
    # row_groups whole groups of VEC counters, c_lo/c_hi the table's first counter, and the
    # program takes groups [b * BLOCK, (b + 1) * BLOCK) as the dense body does. Otherwise a row
    # need not start on a counter and shares its first and last counters with the rows beside it:
    # the program covers counters [(offset + r * width) // 4 + b * BLOCK, ...) lane by lane
    # (_apply_by_lane) and keeps to the row's own elements.
    row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    block = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    if ALIGNED:
        group = row * row_groups + block
        col = tl.arange(0, 4 * VEC)[None, :]
        ptrs = x_ptr + (group * (4 * VEC))[:, None] + col
        mask = tl.broadcast_to((block < row_groups)[:, None], [BLOCK, 4 * VEC])
        counter = _counter_base(c_lo, c_hi) + group * VEC
        _apply(
            ptrs, mask, counter, col, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, num_terms,
            NUM_TERMS, True, VEC,
        )  # fmt: skip
    else:
        start = row * width.to(tl.int64)
        u_counter = (offset.to(tl.int64) + start) // 4 + block
        u_first = u_counter * 4 - offset.to(tl.int64)
        _apply_by_lane(
            x_ptr + u_first, u_first, start, start + width, u_counter, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale,
            terms_ptr, num_terms, NUM_TERMS,
        )  # fmt: skip


@triton.jit
def _signs(k0, k1, counter, col):
    """r, +1.0 or -1.0, on an [R, 128] tile: row r the 128 positions of counter[r] ([R] int64), col =
    [1, 128] column indices; 1.0 with its sign bit set where the position's bit is. scale * r is
    exact, a sign flip (-0.0 for scale +0.0 and r = -1, as C++'s XOR of the sign bit gives)."""
    x0, x1, x2, x3 = _philox((counter & 0xFFFFFFFF).to(tl.uint32), (counter >> 32).to(tl.uint32), k0, k1)
    w = col // 32
    word = tl.where(w == 0, x0[:, None], tl.where(w == 1, x1[:, None], tl.where(w == 2, x2[:, None], x3[:, None])))
    return ((((word >> (col % 32).to(tl.uint32)) & 1) << 31) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _apply_signs(
    ptrs, mask, counter, col, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, num_terms,
    NUM_TERMS: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    """_apply for r: *ptrs += sum_k scale_k * r(seed_k, .) in float32 in the order of the terms,
    rounded once; with ACCUMULATE false, *ptrs = r of the first term."""
    if ACCUMULATE:
        acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        if NUM_TERMS == 0:
            for k in range(num_terms):
                k0, k1, scale = _term(k, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS)
                acc = acc + scale * _signs(k0, k1, counter, col)
        else:
            for k in tl.static_range(NUM_TERMS):
                k0, k1, scale = _term(k, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS)
                acc = acc + scale * _signs(k0, k1, counter, col)
    else:
        k0, k1, _ = _term(0, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, NUM_TERMS)
        acc = _signs(k0, k1, counter, col)
    _store(ptrs, acc, mask)


@triton.jit(do_not_specialize=["n", "lead", "c_lo", "c_hi", "a_lo", "a_hi", "b_lo", "b_hi", "num_terms"])
def _signs_kernel(
    x_ptr, n, lead, c_lo, c_hi, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, num_terms,
    NUM_TERMS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # x holds positions [p0, p0 + n): counter c_lo/c_hi is p0 // 128 and x[0] its column lead = p0 % 128.
    # Program pid takes counters [pid * BLOCK, (pid + 1) * BLOCK) from there.
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    col = tl.arange(0, 128)[None, :]
    idx = c[:, None] * 128 + col - lead
    mask = (idx >= 0) & (idx < n)
    _apply_signs(
        x_ptr + idx, mask, _counter_base(c_lo, c_hi) + c, col, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale,
        terms_ptr, num_terms, NUM_TERMS, ACCUMULATE,
    )  # fmt: skip


@triton.jit(do_not_specialize=["width", "offset", "a_lo", "a_hi", "b_lo", "b_hi", "num_terms"])
def _signs_rows_kernel(
    x_ptr, rows_ptr, width, offset, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms_ptr, num_terms,
    NUM_TERMS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Program (i, b) works on table row rows[i], whose positions [p0, p0 + width) start at column
    # p0 % 128 of counter p0 // 128: it takes that row's counters [b * BLOCK, (b + 1) * BLOCK).
    row = tl.load(rows_ptr + tl.program_id(0)).to(tl.int64)
    p0 = offset.to(tl.int64) + row * width
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    col = tl.arange(0, 128)[None, :]
    idx = c[:, None] * 128 + col - p0 % 128  # within the row
    mask = (idx >= 0) & (idx < width)
    _apply_signs(
        x_ptr + row * width + idx, mask, p0 // 128 + c, col, a_lo, a_hi, a_scale, b_lo, b_hi, b_scale,
        terms_ptr, num_terms, NUM_TERMS, True,
    )  # fmt: skip


# Tile rows per program (BLOCK) and warps, tuned per kernel, dtype, number of terms and size class
# on the device where the kernel first runs: the noise contract makes z independent of them, so
# any choice gives the same bits. The candidates put 2 to 16 counters on each thread. Under the
# interpreter each program is a Python-level trip through the kernel, so it runs one large BLOCK.
CONFIGS = [
    triton.Config({"BLOCK": 128}, num_warps=4),
    triton.Config({"BLOCK": 256}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=8),
    triton.Config({"BLOCK": 1024}, num_warps=8),
]
INTERPRETER_BLOCK = 1 << 14
# Smallest rows program: a narrow row still gets 16 tile rows, so tensor shapes stay ordinary.
_MIN_ROW_BLOCK = 16

INTERPRETED = type(_noise_kernel).__name__ == "InterpretedFunction"


def _fitting(configs, named_args, **kwargs):
    """The candidates whose BLOCK the pass's work fills, at least the smallest: a smaller pass is
    one program whatever the BLOCK, and a single candidate is taken without timing."""
    work = named_args["groups"] if "groups" in named_args else named_args["row_groups"]
    return [c for c in configs if c.kwargs["BLOCK"] <= work] or configs[:1]


def tuned(kernel, do_bench=None):
    """`kernel` under Triton's autotuner over CONFIGS, keyed by size class, number of terms and
    dtype. The kernels write in place, so the tuner restores x after each trial (restore_value) and
    the call that tunes still adds its noise once. do_bench: the tuner's timer (default Triton's,
    with short warm-up and repetition: a training run meets a few dozen keys)."""
    if do_bench is None:
        do_bench = functools.partial(triton.testing.do_bench, warmup=5, rep=20)
    return triton.autotune(
        CONFIGS,
        key=["size_class", "NUM_TERMS"],
        prune_configs_by={"early_config_prune": _fitting},
        restore_value=["x_ptr"],
        do_bench=do_bench,
    )(kernel)


KERNELS = {"dense": _noise_kernel, "rows": _noise_rows_kernel}
# The tuned launchers, by kernel; empty under the interpreter, which runs INTERPRETER_BLOCK.
_TUNED = {} if INTERPRETED else {name: tuned(kernel) for name, kernel in KERNELS.items()}


def _i32(word):
    """A 32-bit word as the signed int Triton passes as i32 (the kernel bitcasts it back)."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _words(value):
    return _i32(value & 0xFFFFFFFF), _i32(value >> 32)


def _f32_bits(value):
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _terms(seeds, scales, device):
    """The kernels' term arguments (a_lo, a_hi, a_scale, b_lo, b_hi, b_scale, terms, num_terms) and
    their NUM_TERMS. seeds: ints in [0, 2**63); scales: Python floats holding float32 values. One or
    two terms go as scalars; more as (lo, hi, scale bits) int32 triples in one device tensor,
    copied from pinned memory without blocking the host on CUDA."""
    count = len(seeds)
    if count <= 2:
        b_seed, b_scale = (seeds[1], scales[1]) if count == 2 else (0, 0.0)
        return (*_words(seeds[0]), scales[0], *_words(b_seed), b_scale, None, count), count
    triples = [w for s, c in zip(seeds, scales) for w in (*_words(s), _f32_bits(c))]
    return (0, 0, 0.0, 0, 0, 0.0, stage(torch.tensor(triples, dtype=torch.int32), device), count), 0


def stage(host, device):
    """A small CPU tensor on `device`: on CUDA through pinned memory and a non-blocking copy, which
    the stream orders before the launch that reads it and which does not wait for the device
    (torch's pinned-memory cache keeps the buffer until the copy is done)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _vec(dtype):
    """Counters per tile row: 4 * VEC elements make one 128-bit vector."""
    return 1 if dtype == torch.float32 else 2


def _launch(x, seeds, scales, offset, accumulate):
    n = x.numel()
    if n == 0:
        return x
    vec = _vec(x.dtype)
    first, end = offset // 4, (offset + n + 3) // 4  # the counters x touches: [first, end)
    base = (offset + 3) // 4  # the first whole counter
    if vec > 1 and (x.data_ptr() + (4 * base - offset) * x.element_size()) % 16 == 8 and base < (offset + n) // 4:
        base += 1  # a 16-bit body one counter (8 bytes) off a 16-byte boundary starts on the next
    head = 4 * base - offset  # the body's first element in x
    groups = max(0, (offset + n) // 4 - base) // vec
    before, tail = base - first, max(0, end - (base + groups * vec))
    edge = int(before > 0 or tail > 0)
    flat = x.view(-1)
    body = flat[min(head, n) :]
    terms, num_terms = _terms(seeds, scales, x.device)
    args = (flat, body, n, head, before, groups, tail, *_words(base), *terms, n.bit_length())
    consts = dict(NUM_TERMS=num_terms, ACCUMULATE=accumulate, VEC=vec, enable_fp_fusion=False)
    if "dense" in _TUNED:
        _TUNED["dense"][lambda meta: (triton.cdiv(groups, meta["BLOCK"]) + edge,)](*args, **consts)
    else:
        grid = (triton.cdiv(groups, INTERPRETER_BLOCK) + edge,)
        _noise_kernel[grid](*args, **consts, BLOCK=INTERPRETER_BLOCK)
    return x


# Counters per program of the Rademacher kernels (128 positions each); not tuned: under the
# interpreter a program is a Python-level trip, so it takes many.
SIGNS_BLOCK = 128 if INTERPRETED else 16


def _launch_signs(x, seeds, scales, offset, accumulate):
    n = x.numel()
    if n == 0:
        return x
    counters = (offset % 128 + n + 127) // 128
    terms, num_terms = _terms(seeds, scales, x.device)
    grid = (triton.cdiv(counters, SIGNS_BLOCK),)
    _signs_kernel[grid](
        x.view(-1), n, offset % 128, *_words(offset // 128), *terms,
        NUM_TERMS=num_terms, ACCUMULATE=accumulate, BLOCK=SIGNS_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return x


def add_noise_(x, seeds, scales, offset, dist="gaussian"):
    """x (contiguous, float32/bfloat16/float16) += sum_k scales[k] * z(seeds[k], offset + i), x
    viewed flat (r for dist "rademacher"). seeds: ints in [0, 2**63); scales: floats holding
    float32 values; checked by hosl.noise."""
    if dist == "rademacher":
        return _launch_signs(x, seeds, scales, offset, True)
    return _launch(x, seeds, scales, offset, True)


def gaussian_(out, seed, offset, dist="gaussian"):
    """Fills float32 out with z(seed, offset + i) (r for dist "rademacher")."""
    if dist == "rademacher":
        return _launch_signs(out, [seed], [1.0], offset, False)
    return _launch(out, [seed], [1.0], offset, False)


def add_noise_rows_(table, rows, seeds, scales, offset, dist="gaussian"):
    """For each r in rows and j < width: table[r, j] += sum_k scales[k] * z(seeds[k], offset + r * width + j).
    table: contiguous (num_rows, width), float32/bfloat16/float16; rows: sorted, distinct, valid row
    indices as an int64 CPU tensor; seeds, scales as for add_noise_; checked by hosl.noise."""
    width = table.shape[1]
    if rows.numel() == 0 or width == 0:
        return table
    if dist == "rademacher":
        rows = stage(rows, table.device)
        terms, num_terms = _terms(seeds, scales, table.device)
        grid = (rows.numel(), triton.cdiv((width + 127) // 128 + 1, SIGNS_BLOCK))
        _signs_rows_kernel[grid](
            table, rows, width, offset, *terms, NUM_TERMS=num_terms, BLOCK=SIGNS_BLOCK, enable_fp_fusion=False
        )
        return table
    rows = stage(rows, table.device)
    vec = _vec(table.dtype)
    aligned = offset % (4 * vec) == 0 and width % (4 * vec) == 0
    # Unaligned, a row's positions [p, p + width) touch at most (width + 2) // 4 + 1 counters
    # (p % 4 == 3 is the worst case); programs beyond a row's own last counter store nothing.
    row_groups = width // (4 * vec) if aligned else (width + 2) // 4 + 1
    terms, num_terms = _terms(seeds, scales, table.device)
    size_class = (rows.numel() * width).bit_length()
    args = (table, rows, width, row_groups, offset, *_words(offset // 4), *terms, size_class)
    consts = dict(NUM_TERMS=num_terms, ALIGNED=aligned, VEC=vec if aligned else 1, enable_fp_fusion=False)
    if "rows" in _TUNED:
        grid = lambda meta: (rows.numel(), triton.cdiv(row_groups, meta["BLOCK"]))  # noqa: E731
        _TUNED["rows"][grid](*args, **consts)
    else:
        block = min(INTERPRETER_BLOCK, max(_MIN_ROW_BLOCK, triton.next_power_of_2(row_groups)))
        _noise_rows_kernel[(rows.numel(), triton.cdiv(row_groups, block))](*args, **consts, BLOCK=block)
    return table
