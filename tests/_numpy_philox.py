"""An independent Philox4x32-10 in numpy (uint64 products, all four counter words), and the
float64 Box-Muller of the noise contract, for checking hosl's backends against."""

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    c = [np.asarray(v, dtype=np.uint64) & MASK for v in (c0, c1, c2, c3)]
    k0, k1 = int(k0), int(k1)
    for _ in range(10):
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0),
            p1 & MASK,
            (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
            p0 & MASK,
        ]
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    return c


def words(seed: int, positions: np.ndarray):
    """The Philox words for each position's counter (position // 4), and each position's lane."""
    counter = positions // 4
    c0 = counter & 0xFFFFFFFF
    c1 = counter >> 32
    zeros = np.zeros_like(counter)
    return philox4x32_10(c0, c1, zeros, zeros, seed & 0xFFFFFFFF, seed >> 32), positions % 4


def gaussian_float64(seed: int, offset: int, n: int) -> np.ndarray:
    """z(seed, offset + i) computed in float64 from the same words: the exact Box-Muller value
    that the float32 backends approximate."""
    positions = np.arange(offset, offset + n, dtype=np.uint64)
    (x0, x1, x2, x3), lane = words(seed, positions)
    lane = lane.astype(np.int64)
    a = np.where(lane < 2, x0, x2)
    b = np.where(lane < 2, x1, x3)
    u = ((a >> np.uint64(8)).astype(np.float64) + 1.0) * 2.0**-24
    theta = 2.0 * np.pi * (b >> np.uint64(8)).astype(np.float64) * 2.0**-24
    r = np.sqrt(-2.0 * np.log(u))
    return np.where(lane % 2 == 0, r * np.cos(theta), r * np.sin(theta))
