"""The Triton noise kernel bit for bit against the torch reference: on the CPU under the Triton
interpreter (-m interpreter, TRITON_INTERPRET=1) and on CUDA (-m gpu); and the reference's Philox
words against Triton's own tl.randint4x."""

import pytest
import torch
from test_noise import (
    DTYPES,
    NUM_ROWS,
    OFFSETS,
    ROW_CASES,
    ROW_OFFSETS,
    ROW_WIDTHS,
    SEEDS,
    assert_bits_equal,
    dense_on_rows,
    make_table,
    row_terms,
)

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


def positions_per_program(device, dtype):
    """The most noise positions one program of the dense kernel covers on `device`: 4 * VEC per
    tile row, BLOCK rows (the interpreter's, or the largest tuning candidate on a GPU)."""
    kernels, _ = noise._triton_kernels()
    block = kernels.INTERPRETER_BLOCK if device == "cpu" else max(c.kwargs["BLOCK"] for c in kernels.CONFIGS)
    return 4 * kernels._vec(dtype) * block


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_block_edges_and_small_shapes(device, dtype):
    # Each case has a partial counter before the first whole one (offset % 4), whole groups of
    # counters, and leftover counters after them, in every combination the edge program sees.
    edge = positions_per_program(device, dtype)
    cases = [(0, 0), (1, 0), (3, 1), (2, 1), (5, 3), (7, 1), (8, 0), (9, 2), (12, 4), (15, 1), (4097, 3)]
    cases += [(edge - 1, 0), (edge, 0), (edge + 1, 0), (edge + 1, 3), (edge + 5, 2), (2 * edge, 2), (2 * edge + 8, 0)]
    for n, offset in cases:
        want = noise.gaussian(n, 5, offset=offset, backend="torch")
        assert_bits_equal(noise.gaussian(n, 5, offset=offset, device=device, backend="triton").cpu(), want)
        x = torch.linspace(-1, 1, n).to(dtype)
        for seeds, scales in [([8], [0.5]), ([8, 9], [0.5, -0.5]), ([8, 9, 10], [0.5, -0.5, 0.25])]:
            want = noise.add_(x.clone(), seeds, scales, offset=offset, backend="torch")
            got = noise.add_(x.clone().to(device), seeds, scales, offset=offset, backend="triton")
            assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_views_at_every_storage_offset(device, dtype):
    """x a view into a larger buffer at storage offsets 0 to 11, so its memory starts on and off a
    16-byte boundary: for the 16-bit types the launcher then starts the body one counter later
    (where that puts it on a boundary), and the head takes up to 7 elements. The view gets the
    reference's bits and the buffer around it keeps its own."""
    buf = (torch.randn(3000, generator=torch.Generator().manual_seed(4)) * 0.05).to(dtype)
    for start in range(12):
        for n, offset in [(1, start), (9, start), (15, start), (17, start + 1), (1001, start), (1001, 0), (40, 3)]:
            want = noise.add_(buf[start : start + n].clone(), [3, 4], [0.5, -0.5], offset=offset, backend="torch")
            got = buf.clone().to(device)
            noise.add_(got[start : start + n], [3, 4], [0.5, -0.5], offset=offset, backend="triton")
            got = got.cpu()
            assert_bits_equal(got[start : start + n], want)
            assert_bits_equal(torch.cat([got[:start], got[start + n :]]), torch.cat([buf[:start], buf[start + n :]]))


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("terms", [1, 3], ids=lambda t: f"terms={t}")
@pytest.mark.parametrize("offset", ROW_OFFSETS.values(), ids=ROW_OFFSETS.keys())
@pytest.mark.parametrize("width", ROW_WIDTHS, ids=lambda w: f"width={w}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_add_rows_triton_is_dense_add_on_those_rows(device, dtype, width, offset, terms):
    table = make_table(NUM_ROWS, width, dtype, seed=width + terms)
    rows = ROW_CASES["unsorted-repeats"]
    seeds, scales = row_terms(terms)
    want = dense_on_rows(table, rows, seeds, scales, offset)
    got = noise.add_rows_(table.clone().to(device), rows, seeds, scales, offset=offset, backend="triton")
    assert_bits_equal(got.cpu().view(-1), want.view(-1))
    assert not torch.equal(got.cpu()[rows], table[rows])


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("rows", ROW_CASES.values(), ids=ROW_CASES.keys())
def test_add_rows_triton_row_sets(device, rows):
    table = make_table(NUM_ROWS, 3, torch.bfloat16, seed=5)
    want = dense_on_rows(table, rows, [3, 4], [0.5, -0.25], 2**33 + 3)
    if isinstance(rows, torch.Tensor):
        rows = rows.to(device)
    got = noise.add_rows_(table.clone().to(device), rows, [3, 4], [0.5, -0.25], offset=2**33 + 3, backend="triton")
    assert_bits_equal(got.cpu().view(-1), want.view(-1))


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_add_rows_triton_cpp_torch_bit_identical(device, dtype):
    table = make_table(300, 129, dtype, seed=1)
    rows = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))
    seeds, scales = row_terms(3)
    want = noise.add_rows_(table.clone(), rows, seeds, scales, offset=5, backend="torch")
    got = noise.add_rows_(table.clone().to(device), rows, seeds, scales, offset=5, backend="triton")
    assert_bits_equal(got.cpu().view(-1), want.view(-1))
    if noise.available_backends("cpu")["cpp"] is None:
        cpp = noise.add_rows_(table.clone(), rows, seeds, scales, offset=5, backend="cpp")
        assert_bits_equal(got.cpu().view(-1), cpp.view(-1))


@pytest.mark.parametrize("device", tiers)
def test_add_rows_triton_on_a_view_into_a_flat_buffer(device):
    num_rows, width, start = 37, 41, 1234
    flat = make_table(1, 5000, torch.float32, seed=3).view(-1).to(device)
    table = flat[start : start + num_rows * width].view(num_rows, width)
    assert table.storage_offset() == start
    rows = [36, 0, 17, 17, 18, 5]
    dense = noise.add_(flat.cpu().clone(), [9], [0.5], backend="torch")  # .cpu() of a CPU tensor is itself
    want = flat.cpu().clone()
    for r in set(rows):
        lo = start + r * width
        want[lo : lo + width] = dense[lo : lo + width]
    noise.add_rows_(table, rows, [9], [0.5], offset=start, backend="triton")
    assert_bits_equal(flat.cpu(), want)


@pytest.mark.parametrize("device", tiers)
def test_add_rows_triton_row_spans_programs(device):
    # Rows wider than one program, so the grid's second axis has 2 programs. Unaligned (width 4 *
    # block + 2, offset 3): row 2 starts at a position = 3 (mod 4) and touches block + 2 counters,
    # row 1 touches block + 1: its second program reaches past the row and must store nothing
    # there. Aligned (width and offset multiples of 8): whole groups of counters, the second
    # program partly past the row's last group.
    kernels, _ = noise._triton_kernels()
    block = kernels.INTERPRETER_BLOCK if device == "cpu" else max(c.kwargs["BLOCK"] for c in kernels.CONFIGS)
    for width, offset in [(4 * block + 2, 3), (8 * block + 24, 16)]:
        table = make_table(3, width, torch.float16, seed=6)
        want = dense_on_rows(table, [2, 1], [8, 9], [0.5, -0.5], offset)
        got = noise.add_rows_(table.clone().to(device), [2, 1], [8, 9], [0.5, -0.5], offset=offset, backend="triton")
        assert_bits_equal(got.cpu().view(-1), want.view(-1))


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


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_tuned_launch_adds_the_noise_once(monkeypatch, dtype):
    """The autotuned path a GPU takes, run through the interpreter with a CPU timer: every
    candidate BLOCK and num_warps is tried on the same x, and the tuner must restore x after each
    trial, so the call still adds its noise exactly once, with the bits of the reference."""
    kernels, _ = noise._triton_kernels()
    trials = []

    def one_run(kernel_call, quantiles):
        trials.append(1)
        kernel_call()
        return [1.0 + len(trials)] * len(quantiles)  # the first candidate wins

    monkeypatch.setattr(kernels, "_TUNED", {name: kernels.tuned(k, one_run) for name, k in kernels.KERNELS.items()})
    x = (torch.randn(1024 * 4 * kernels._vec(dtype) + 7, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    for seeds, scales in [([4], [0.5]), ([4, 5], [0.5, -0.25]), ([4, 5, 6, 7, 8], [0.5, -0.25, 0.125, 1.0, -1.0])]:
        trials.clear()
        want = noise.add_(x.clone(), seeds, scales, offset=3, backend="torch")
        got = noise.add_(x.clone(), seeds, scales, offset=3, backend="triton")
        assert len(trials) == len(kernels.CONFIGS)
        assert_bits_equal(got, want)
    table = make_table(3, 1024 * 4 * kernels._vec(dtype), dtype, seed=2)  # every candidate's BLOCK fits a row
    trials.clear()
    want = dense_on_rows(table, [2, 1], [8, 9, 10], [0.5, -0.5, 0.25], 16)
    got = noise.add_rows_(table.clone(), [2, 1], [8, 9, 10], [0.5, -0.5, 0.25], offset=16, backend="triton")
    assert len(trials) == len(kernels.CONFIGS)
    assert_bits_equal(got.view(-1), want.view(-1))


@pytest.mark.gpu
def test_passes_do_not_synchronise_the_host():
    """A step's noise passes on CUDA, once tuned, queue their work and return: torch's sync debug
    mode raises on any copy or wait that blocks the host (the old launcher copied the seeds and
    scales to the device from pageable memory on every pass)."""
    x = torch.randn(1 << 20, device="cuda")
    table = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16)
    many = list(range(1, 10))

    def passes():
        noise.add_(x, [1], [1e-3])
        noise.add_(x, [1, 2], [-2e-3, 1e-3])
        noise.add_(x, many, [1e-4] * 9)
        noise.add_rows_(table, [3, 7, 900], [1], [1e-3])
        noise.add_rows_(table, [3, 7, 900], many, [1e-4] * 9)
        noise.Terms([5], [1e-3]).add_(x, offset=7)

    passes()  # tunes: the tuner times its candidates and waits for the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        passes()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("offset", [0, 127, 128 * (2**32 - 3) + 5])
def test_rademacher_triton_bit_identical(device, offset):
    """r over more than one program, from a position mid-counter and across the counter's 32-bit
    word boundary."""
    kernels, _ = noise._triton_kernels()
    n = 128 * kernels.SIGNS_BLOCK * 2 + 301
    want = noise.rademacher(n, 2**62 + 9, offset=offset, backend="torch")
    got = noise.rademacher(n, 2**62 + 9, offset=offset, device=device, backend="triton")
    assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("device", tiers)
@pytest.mark.parametrize("terms", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_add_rademacher_triton_bit_identical(device, dtype, terms):
    """add_ and add_rows_ of r (scalar terms, and staged ones for 5), against the reference; -0.0
    kept where a zero scale meets r = -1."""
    x = (torch.randn(40_009, generator=torch.Generator().manual_seed(terms)) * 0.05).to(dtype)
    x[:64] = -0.0
    seeds = [2**40 + 17 * k for k in range(terms)]
    scales = [0.0, *((-1) ** k * 10 ** -(k % 4) for k in range(1, terms))]
    want = noise.add_(x.clone(), seeds, scales, offset=5, backend="torch", dist="rademacher")
    got = noise.add_(x.clone().to(device), seeds, scales, offset=5, backend="triton", dist="rademacher")
    assert_bits_equal(got.cpu(), want)
    table = make_table(NUM_ROWS, 257, dtype, seed=terms)
    rows = ROW_CASES["unsorted-repeats"]
    dense = noise.add_(table.clone(), seeds, scales, offset=2**33 + 3, backend="torch", dist="rademacher")
    got = noise.add_rows_(table.clone().to(device), rows, seeds, scales, offset=2**33 + 3, backend="triton",
                          dist="rademacher").cpu()  # fmt: skip
    chosen = sorted(set(rows))
    others = [r for r in range(NUM_ROWS) if r not in chosen]
    assert_bits_equal(got[chosen].reshape(-1), dense[chosen].reshape(-1))
    assert_bits_equal(got[others].reshape(-1), table[others].reshape(-1))
