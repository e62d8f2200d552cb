"""The Triton noise kernel bit for bit against the torch reference: on the CPU under the Triton
interpreter (-m interpreter, TRITON_INTERPRET=1) and on CUDA (-m gpu); and the reference's Philox
words against Triton's own tl.randint4x."""

import pytest
import torch
from test_noise import DTYPES, OFFSETS, SEEDS, assert_bits_equal

from hosl import noise, reference

tiers = [pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_gaussian_triton_bit_identical(device, seed, offset):
    n = 1 << 20
    want = noise.gaussian(n, seed, offset=offset, backend="torch")
    got = noise.gaussian(n, seed, offset=offset, device=device, backend="triton")
    assert_bits_equal(got.cpu(), want)


# Positions whose angle remainder is 0 (seed, position): the sine polynomial gives +0 there, and
# quadrant 1 negates it into the cosine lane, so z is -0.0. Triton's own `-x` is `0 - x` (+0).
SIGNED_ZEROS = [(1, 710032), (2**63 - 1, 67046)]


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("seed,position", SIGNED_ZEROS)
def test_negative_zero_keeps_its_sign(device, seed, position):
    want = noise.gaussian(4, seed, offset=position, backend="torch")
    assert want[0].item() == 0 and torch.signbit(want[0])
    got = noise.gaussian(4, seed, offset=position, device=device, backend="triton")
    assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("terms", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_add_triton_bit_identical(device, dtype, terms):
    n = 100_003
    x = (torch.randn(n, generator=torch.Generator().manual_seed(terms)) * 0.05).to(dtype)
    seeds = [2**40 + 17 * k for k in range(terms)]
    scales = [(-1) ** k * 10 ** -(k % 4) for k in range(terms)]
    want = noise.add_(x.clone(), seeds, scales, offset=5, backend="torch")
    got = noise.add_(x.clone().to(device), seeds, scales, offset=5, backend="triton")
    assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("device", tiers)
def test_block_edges_and_small_shapes(device):
    block = noise._TRITON_BLOCK_GPU if device == "cuda" else noise._TRITON_BLOCK_INTERPRETER
    edge = 4 * block  # positions per program
    for n, offset in [(0, 0), (1, 0), (3, 1), (4097, 3), (edge - 1, 0), (edge + 1, 0), (edge + 1, 3), (2 * edge, 2)]:
        want = noise.gaussian(n, 5, offset=offset, backend="torch")
        assert_bits_equal(noise.gaussian(n, 5, offset=offset, device=device, backend="triton").cpu(), want)
        x = torch.linspace(-1, 1, n, dtype=torch.bfloat16)
        want = noise.add_(x.clone(), [8, 9], [0.5, -0.5], offset=offset, backend="torch")
        got = noise.add_(x.clone().to(device), [8, 9], [0.5, -0.5], offset=offset, backend="triton")
        assert_bits_equal(got.cpu(), want)


@pytest.mark.interpreter
def test_reference_philox_matches_tl_randint4x():
    import triton
    import triton.language as tl

    @triton.jit
    def randint4x_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a, b, c, d = tl.randint4x(seed, offs.to(tl.uint32))
        mask = offs < n
        tl.store(out_ptr + 4 * offs, a, mask=mask)
        tl.store(out_ptr + 4 * offs + 1, b, mask=mask)
        tl.store(out_ptr + 4 * offs + 2, c, mask=mask)
        tl.store(out_ptr + 4 * offs + 3, d, mask=mask)

    n = 4096
    for seed in (0, 3, 2**32 + 7, 2**62 + 11):
        out = torch.empty(4 * n, dtype=torch.int32)
        randint4x_kernel[(triton.cdiv(n, 1024),)](out, seed, n, BLOCK=1024)
        words = torch.stack(reference.philox(torch.arange(n), seed), dim=1).reshape(-1)
        assert torch.equal(out.long() & 0xFFFFFFFF, words)
