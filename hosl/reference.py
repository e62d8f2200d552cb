"""Pure-PyTorch reference of the noise contract: the "torch" backend, and the one reference that tests
and benchmarks import.

z(seed, j) is the lane j % 4 normal of Philox4x32-10 keyed by the 64-bit seed at counter j // 4.
Words (0, 1) give lanes 0 and 1 and words (2, 3) give lanes 2 and 3 through Box-Muller:

    u = ((a >> 8) + 1) * 2^-24            in (0, 1]
    r = sqrt_rn(-2 * log(u))              log: fdlibm's logf polynomial, below
    theta = 2 pi (b >> 8) / 2^24          reduced exactly in integers to quadrant + [-pi/4, pi/4)
    lanes = (r cos theta, r sin theta)    cos, sin: Taylor polynomials, below

Each float step here is a separate torch op on float32 tensors, so it is rounded on its own, in the
order written, exactly as the C++ kernel (csrc/noise.h) and the Triton kernel (kernels/noise.py)
do it. Two spots need care on the CPU: uint32 products are computed from 16-bit halves in int64
(no uint64 multiply in torch), and sqrt is taken in float64 and rounded to float32, which is the
correctly rounded float32 sqrt (float64 has more than 2 * 24 + 2 bits); torch's own float32 sqrt
on the CPU is not always correctly rounded.

The Rademacher directions r(seed, j) = +1 or -1 take one bit each: bit j % 32 of word (j % 128) // 32
of the same Philox4x32-10 at counter j // 128, -1 where it is set. r times a float32 scale is exact
(a sign flip), so every backend's sum of terms is the same float32 additions in the same order.
"""

from __future__ import annotations

import struct

import torch

# Philox4x32 multipliers and key increments (Salmon et al., SC'11).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _f32(bits: int) -> float:
    """The float32 with these bits, as an (exactly equal) Python float."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# log(1 + f) = f - hfsq + s * (hfsq + R(s^2)), s = f / (2 + f): fdlibm logf's minimax coefficients.
LG1 = _f32(0x3F2AAAAA)
LG2 = _f32(0x3ECCCE13)
LG3 = _f32(0x3E91E9EE)
LG4 = _f32(0x3E789E26)
LN2_HI = _f32(0x3F317180)  # ln 2 with trailing zero bits: k * LN2_HI is exact for |k| < 128
LN2_LO = _f32(0x3717F7D1)
SQRT2_BITS = 0x3FB504F3
# Taylor coefficients of sin (S) and cos (C) on [-pi/4, pi/4], rounded to float32.
S1 = _f32(0xBE2AAAAB)
S2 = _f32(0x3C088889)
S3 = _f32(0xB9500D01)
S4 = _f32(0x3638EF1D)
C1 = -0.5
C2 = _f32(0x3D2AAAAB)
C3 = _f32(0xBAB60B61)
C4 = _f32(0x37D00D01)
C5 = _f32(0xB493F27E)
ANGLE_STEP = _f32(0x34C90FDB)  # float32(pi) / 2^23: radians per unit of the 24-bit angle
TWO_POW_MINUS_24 = 2.0**-24

MASK32 = 0xFFFFFFFF
# Elements per chunk: bounds the reference's temporaries (about 60 bytes per element).
_CHUNK = 1 << 20


def _mulhilo(m: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * b for a uint32 constant m and uint32 values b held in int64."""
    t_lo = (m & 0xFFFF) * b  # < 2^48
    t_hi = (m >> 16) * b  # < 2^48
    mid = t_hi + (t_lo >> 16)  # m * b = mid * 2^16 + (t_lo & 0xFFFF)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (t_lo & 0xFFFF)


def philox(counter: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of the 64-bit counters (int64 tensor; words c0 = low, c1 = high, c2 = c3 = 0)
    under the 64-bit key seed; four int64 tensors holding uint32 words."""
    c0 = counter & MASK32
    c1 = (counter >> 32) & MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def log_unit(u: torch.Tensor) -> torch.Tensor:
    """Natural log of float32 u in [2^-24, 1], step for step as csrc/noise.h computes it."""
    bits = u.view(torch.int32)
    e = (bits >> 23) - 127
    mbits = (bits & 0x007FFFFF) | 0x3F800000
    big = mbits > SQRT2_BITS
    mbits = torch.where(big, mbits - 0x00800000, mbits)
    e = torch.where(big, e + 1, e)
    f = mbits.view(torch.float32) - 1.0
    s = f / (f + 2.0)
    z = s * s
    w = z * z
    t1 = w * (w * _const(LG4, w) + LG2)
    t2 = z * (w * _const(LG3, w) + LG1)
    r = t2 + t1
    hfsq = (f * 0.5) * f
    k = e.to(torch.float32)
    return k * _const(LN2_HI, k) - ((hfsq - (s * (hfsq + r) + k * _const(LN2_LO, k))) - f)


def box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two standard normals (r cos theta, r sin theta) from uint32 words a (radius), b (angle)."""
    u = ((a >> 8) + 1).to(torch.float32) * TWO_POW_MINUS_24
    t = log_unit(u) * -2.0
    radius = t.double().sqrt().float()  # the correctly rounded float32 sqrt
    y = b >> 8
    qq = (y + (1 << 21)) >> 22
    rem = y - (qq << 22)
    q = qq & 3
    a1 = rem.to(torch.float32) * _const(ANGLE_STEP, radius)
    a2 = a1 * a1
    ps = _const(S3, a2) + a2 * _const(S4, a2)
    ps = _const(S2, a2) + a2 * ps
    ps = _const(S1, a2) + a2 * ps
    sn = a1 + (a1 * a2) * ps
    pc = _const(C4, a2) + a2 * _const(C5, a2)
    pc = _const(C3, a2) + a2 * pc
    pc = _const(C2, a2) + a2 * pc
    pc = _const(C1, a2) + a2 * pc
    cs = a2 * pc + 1.0
    cos_t = torch.where(q == 0, cs, torch.where(q == 1, -sn, torch.where(q == 2, -cs, sn)))
    sin_t = torch.where(q == 0, sn, torch.where(q == 1, cs, torch.where(q == 2, -sn, -cs)))
    return radius * cos_t, radius * sin_t


def _normals_chunk(seed: int, start: int, n: int, device: torch.device) -> torch.Tensor:
    """z(seed, start), ..., z(seed, start + n - 1) as a float32 tensor, n > 0."""
    first, last = start // 4, (start + n - 1) // 4
    counter = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = philox(counter, seed)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    z = torch.stack((z0, z1, z2, z3), dim=1).reshape(-1)
    return z[start - 4 * first : start - 4 * first + n]


def gaussian(n: int, seed: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """z(seed, offset + i) for i < n, float32."""
    return _draw("gaussian", n, seed, offset, device)


def _signs_chunk(seed: int, start: int, n: int, device: torch.device) -> torch.Tensor:
    """r(seed, start), ..., r(seed, start + n - 1), +1.0 or -1.0, as a float32 tensor, n > 0."""
    first, last = start // 128, (start + n - 1) // 128
    counter = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = torch.stack(philox(counter, seed), dim=1)  # (counters, 4): bits 0..127 of each counter
    bits = (words[:, :, None] >> torch.arange(32, device=device)) & 1
    r = (1 - 2 * bits).to(torch.float32).reshape(-1)
    return r[start - 128 * first : start - 128 * first + n]


_DRAWS = {"gaussian": _normals_chunk, "rademacher": _signs_chunk}


def _draw(dist: str, n: int, seed: int, offset: int, device) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32, device=device)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        out[lo:hi] = _DRAWS[dist](seed, offset + lo, hi - lo, out.device)
    return out


def rademacher(n: int, seed: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """r(seed, offset + i) for i < n, float32 +1.0 or -1.0."""
    return _draw("rademacher", n, seed, offset, device)


def add_(
    x: torch.Tensor, seeds: list[int], scales: torch.Tensor, offset: int = 0, dist: str = "gaussian"
) -> torch.Tensor:
    """x[i] += sum_k scales[k] * z(seeds[k], offset + i) on contiguous x, in float32 in the order
    of k, rounded once (to nearest even) into x's dtype. scales: float32 tensor on the CPU. dist:
    "gaussian" (z) or "rademacher" (r)."""
    flat = x.view(-1)
    draw = _DRAWS[dist]
    for lo in range(0, flat.numel(), _CHUNK):
        hi = min(flat.numel(), lo + _CHUNK)
        acc = flat[lo:hi].to(torch.float32)
        for seed, scale in zip(seeds, scales.tolist()):
            acc = acc + _const(scale, acc) * draw(seed, offset + lo, hi - lo, flat.device)
        flat[lo:hi] = acc.to(x.dtype)
    return x


def add_rows_(
    table: torch.Tensor, rows, seeds: list[int], scales: torch.Tensor, offset: int = 0, dist: str = "gaussian"
) -> torch.Tensor:
    """For each distinct r in rows (ints) and j < width: table[r, j] += sum_k scales[k] *
    z(seeds[k], offset + r * width + j) on a contiguous 2-D table, one row at a time through add_,
    each row at the position it has in the dense layout."""
    width = table.shape[1]
    for r in sorted(set(int(r) for r in rows)):
        add_(table[r], seeds, scales, offset + r * width, dist)
    return table
