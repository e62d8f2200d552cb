"""hosl.noise on the CPU: the cpp backend bit for bit against the torch reference, the reference
against an independent numpy Philox and float64 Box-Muller, the law of z, and input checks."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from _numpy_philox import gaussian_float64, philox4x32_10, words
from scipy import stats

from hosl import _ext, noise, reference

SEEDS = [0, 1, 2**32 + 7, 2**63 - 1]
OFFSETS = [0, 3, 2**33 + 1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CODE = noise._DTYPE_CODES  # the dtype codes hosl._C takes (csrc/dtype.h)
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    ia, ib = a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])
    diff = (ia != ib).nonzero()
    assert diff.numel() == 0, (
        f"{diff.numel()} elements differ, first at {diff[0].item()}: {a[diff[0]]} vs {b[diff[0]]}"
    )


# ---------------------------------------------------------------- the reference's integers and math


def test_numpy_philox_known_answers():
    # Random123's known-answer vectors for philox4x32-10.
    out = philox4x32_10(0, 0, 0, 0, 0, 0)
    assert [int(v) for v in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = 0xFFFFFFFF
    out = philox4x32_10(f, f, f, f, f, f)
    assert [int(v) for v in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    out = philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(v) for v in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed", SEEDS)
def test_reference_philox_matches_numpy(seed):
    rng = np.random.default_rng(seed % 1000)
    counters = np.concatenate([np.arange(0, 1000), rng.integers(0, 2**61, 1000), [2**32 - 1, 2**32, 2**61 - 1]])
    got = reference.philox(torch.from_numpy(counters.astype(np.int64)), seed)
    want, _ = words(seed, counters.astype(np.uint64) * 4)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy().astype(np.uint64), w)


@pytest.mark.parametrize("seed,offset", [(0, 0), (2**63 - 1, 2**33 + 1), (12345, 7)])
def test_reference_close_to_float64_box_muller(seed, offset):
    n = 200_003
    z = reference.gaussian(n, seed, offset).double().numpy()
    exact = gaussian_float64(seed, offset, n)
    # log, sin and cos are polynomials and every step rounds in float32: a few float32 ulps.
    err = np.abs(z - exact)
    assert err.max() <= 8 * np.finfo(np.float32).eps * np.maximum(1.0, np.abs(exact)).max()
    assert np.median(err / np.maximum(np.abs(exact), 1e-3)) < 2 * np.finfo(np.float32).eps


# ------------------------------------------------------------------------ cpp == torch, bit for bit


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_gaussian_cpp_bit_identical(seed, offset):
    n = 1 << 20
    assert_bits_equal(
        noise.gaussian(n, seed, offset=offset, backend="cpp"), noise.gaussian(n, seed, offset=offset, backend="torch")
    )


@pytest.mark.parametrize("first_counter", [2**32 - 37, 2**33 - 5, 2**61 - 512])
def test_gaussian_cpp_across_a_counter_word_boundary(first_counter):
    """Counters whose low 32-bit word wraps inside a tile (the AVX2 Philox carries into the high
    word per lane), and the last counters of the position range (positions < 2**63)."""
    n = 4 * 512
    offset = 4 * first_counter
    assert_bits_equal(
        noise.gaussian(n, 99, offset=offset, backend="cpp"), noise.gaussian(n, 99, offset=offset, backend="torch")
    )


@pytest.mark.parametrize("terms", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_add_cpp_bit_identical(dtype, terms):
    n = 100_003
    x = (torch.randn(n, generator=torch.Generator().manual_seed(terms)) * 0.05).to(dtype)
    seeds = [2**40 + 17 * k for k in range(terms)]
    scales = [(-1) ** k * 10 ** -(k % 4) for k in range(terms)]
    a, b = x.clone(), x.clone()
    noise.add_(a, seeds, scales, offset=5, backend="cpp")
    noise.add_(b, seeds, scales, offset=5, backend="torch")
    assert_bits_equal(a, b)
    assert not torch.equal(a, x)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_add_rounds_once_to_nearest_even(backend, dtype):
    # Independent of reference.add_: sum in float32 with plain torch ops, then one cast (torch
    # rounds to nearest even).
    n = 50_001
    x = (torch.rand(n, generator=torch.Generator().manual_seed(3)) * 4 - 2).to(dtype)
    seeds, scales = [11, 12], [0.3, -0.02]
    expected = x.float()
    for s, c in zip(seeds, scales):
        expected = expected + torch.tensor(c, dtype=torch.float32) * noise.gaussian(n, s, offset=9, backend="torch")
    got = noise.add_(x.clone(), seeds, scales, offset=9, backend=backend)
    assert_bits_equal(got, expected.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_special_values_survive(dtype):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 65504.0], dtype=torch.float32)
    x = x.to(dtype)
    for backend in ("cpp", "torch"):
        y = noise.add_(x.clone(), [1], [1e-3], backend=backend)
        assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == -float("inf")
        assert torch.isfinite(y[3:-1]).all()
        # 65504 is float16's largest value: the noise may carry it to inf there, as one rounding of the
        # float32 sum does (in bfloat16 and float32 it stays finite).
        z = noise.gaussian(x.numel(), 1, backend="torch")[-1]
        want = (x[-1].float() + torch.tensor(1e-3) * z).to(dtype)
        assert_bits_equal(y[-1:], want.reshape(1))
        assert torch.isfinite(y[-1]) or dtype == torch.float16


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 255, 256, 257, 1009, 4097, 65_537])
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 1021])
def test_shapes(n, offset):
    assert_bits_equal(
        noise.gaussian(n, 99, offset=offset, backend="cpp"), noise.gaussian(n, 99, offset=offset, backend="torch")
    )
    x = torch.linspace(-1, 1, n)
    assert_bits_equal(
        noise.add_(x.clone(), [5, 6], [0.5, 0.25], offset=offset, backend="cpp"),
        noise.add_(x.clone(), [5, 6], [0.5, 0.25], offset=offset, backend="torch"),
    )


def test_multidimensional_x_is_viewed_flat():
    x = torch.zeros(3, 5, 7)
    noise.add_(x, [4], [1.0], offset=2)
    assert_bits_equal(x.view(-1), noise.gaussian(105, 4, offset=2))


def _noise_isas() -> list[str]:
    return _ext._C.noise_isas() if _ext._C is not None else ["base"]  # without it, the test skips


@pytest.mark.parametrize("isa", _noise_isas())
def test_every_instruction_set_copy_gives_the_references_bits(isa):
    """The C++ kernel has a copy per instruction set (avx512, avx2, base on x86-64) and uses the
    widest this CPU runs: each copy it runs, against the torch reference, for z, for add_ in every
    dtype with several terms, across a counter word boundary, and for rows."""
    _C = _ext.require("this test")
    before = _C.noise_isa()
    _C.set_noise_isa(isa)
    try:
        assert _C.noise_isa() == isa
        for offset in (3, 4 * (2**32 - 37)):
            n = (1 << 16) + 5
            assert_bits_equal(
                noise.gaussian(n, 2**62 + 1, offset=offset, backend="cpp"),
                noise.gaussian(n, 2**62 + 1, offset=offset, backend="torch"),
            )
        for dtype in DTYPES.values():
            x = (torch.randn(20_011, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
            a = noise.add_(x.clone(), [7, 2**40, 9], [0.5, -1e-3, 2.0], offset=11, backend="cpp")
            b = noise.add_(x.clone(), [7, 2**40, 9], [0.5, -1e-3, 2.0], offset=11, backend="torch")
            assert_bits_equal(a, b)
            table = make_table(50, 33, dtype, seed=6)
            rows = [49, 3, 4, 4, 20]
            a = noise.add_rows_(table.clone(), rows, [4], [0.25], offset=7, backend="cpp")
            b = noise.add_rows_(table.clone(), rows, [4], [0.25], offset=7, backend="torch")
            assert_bits_equal(a.view(-1), b.view(-1))
    finally:
        _C.set_noise_isa(before)
    with pytest.raises(ValueError, match="not sse9"):
        _C.set_noise_isa("sse9")


# ---------------------------------------------------------------------- independence of the split


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_gaussian_independent_of_chunking(backend):
    n, seed = 300_007, 2**62 + 5
    whole = noise.gaussian(n, seed, backend=backend)
    cuts = [0, 1, 2, 7, 4096, 4099, 100_000, 250_001, n]
    pieces = [noise.gaussian(b - a, seed, offset=a, backend=backend) for a, b in zip(cuts, cuts[1:])]
    assert_bits_equal(whole, torch.cat(pieces))


def test_cpp_independent_of_thread_count():
    _C = _ext.require("this test")
    n = (1 << 20) + 13
    results = []
    for threads in (1, 2, 3, 7):
        out = torch.empty(n)
        _C.gaussian(out.data_ptr(), n, 77, 3, threads)
        x = torch.linspace(-1, 1, n, dtype=torch.bfloat16)
        _C.add_noise(x.data_ptr(), n, CODE[torch.bfloat16], [1, 2, 3], [0.1, -0.2, 0.3], 3, threads)
        results.append((out, x))
    for out, x in results[1:]:
        assert_bits_equal(out, results[0][0])
        assert_bits_equal(x, results[0][1])


# The C++ kernel runs its threads from a persistent pool (csrc/pool.cpp). POOL_N elements make 2
# ranges at 2 threads and 3 at 3 (a thread takes at least kMinPerThread = 2**15, csrc/noise.cpp).
POOL_N = 3 * (1 << 15) + 5


def _pool_add(_C, x: torch.Tensor, seed: int, threads: int) -> torch.Tensor:
    y = x.clone()
    _C.add_noise(y.data_ptr(), y.numel(), CODE[y.dtype], [seed, seed + 1], [0.5, -0.25], 3, threads)
    return y


def test_cpp_pool_call_after_call_and_from_two_threads_at_once():
    """Hundreds of consecutive calls at 2 and 3 threads, each checked as soon as it returns (a call
    must not return before every range is written), give the 1-thread bits; so do calls from two
    Python threads at once (the GIL is released inside), each on tensors of its own."""
    _C = _ext.require("this test")
    xs = {dtype: torch.linspace(-1, 1, POOL_N, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    seeds = range(400)
    # torch's own ops (clone, compare) on one thread, per calling thread: the kernel's thread count is
    # its argument, and torch's OpenMP threads waiting beside the pool's can slow a 2-core machine a lot.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = {(dtype, s): _pool_add(_C, x, s, 1) for dtype, x in xs.items() for s in seeds}
        for s in seeds:
            assert_bits_equal(_pool_add(_C, xs[torch.float32], s, 2 + s % 2), want[torch.float32, s])
    finally:
        torch.set_num_threads(torch_threads)

    start = threading.Barrier(2)
    got = {}

    def caller(dtype, threads):
        torch.set_num_threads(1)
        start.wait()
        got[dtype] = [_pool_add(_C, xs[dtype], s, threads) for s in seeds[:200]]

    callers = [threading.Thread(target=caller, args=(d, t), daemon=True) for d, t in zip(xs, (2, 3))]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)  # daemon: a hang fails the test instead of hanging it
        assert not t.is_alive(), "a call from a Python thread never returned"
    for dtype in xs:
        assert len(got[dtype]) == 200
        for s, y in zip(seeds, got[dtype]):
            assert_bits_equal(y, want[dtype, s])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_cpp_pool_in_a_forked_child():
    """A child forked after the pool ran, while another thread is inside a call (so the pool's lock
    may be held and its workers busy), gets a pool of its own: its 2-thread call gives the bits of a
    1-thread call in the parent, it exits instead of waiting on the parent's threads, and (where
    /proc shows it) it has started a worker of its own rather than counting on the parent's."""
    _C = _ext.require("this test")
    x = torch.linspace(-1, 1, POOL_N)
    want = _pool_add(_C, x, 5, 1).numpy().tobytes()
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            _pool_add(_C, x, 6, 2)

    hammer = threading.Thread(target=busy, daemon=True)
    hammer.start()
    try:
        for _ in range(10):
            y = x.clone()
            pid = os.fork()
            if pid == 0:  # the child never returns into pytest; numpy compares (no torch threads here)
                status = 2
                try:
                    _C.add_noise(y.data_ptr(), POOL_N, CODE[torch.float32], [5, 6], [0.5, -0.25], 3, 2)
                    status = 0 if y.numpy().tobytes() == want else 1
                    if status == 0 and os.path.isdir("/proc/self/task") and len(os.listdir("/proc/self/task")) < 2:
                        status = 3
                finally:
                    os._exit(status)
            deadline = time.monotonic() + 60
            while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            if done[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child's 2-thread call did not return within 60 s")
            code = os.waitstatus_to_exitcode(done[1])
            why = {1: "its 2-thread call gave other bits", 3: "it started no worker: its pool is the parent's"}
            assert code == 0, f"the forked child exited with {code}: {why.get(code, 'it failed')}"
    finally:
        stop.set()
        hammer.join(timeout=60)
    assert not hammer.is_alive()


def test_cpp_pool_lets_the_process_exit():
    """After 2- and 3-thread calls from two threads, the interpreter exits with status 0: the pool's
    workers are stopped and joined at exit, not waited on forever."""
    code = textwrap.dedent(
        f"""
        import threading
        import torch
        from hosl import noise
        def calls(threads):
            torch.set_num_threads(threads)
            x = torch.zeros({POOL_N})
            for _ in range(50):
                noise.add_(x, [1], [1.0], backend="cpp")
        other = threading.Thread(target=calls, args=(3,))
        other.start()
        calls(2)
        other.join()
        print("done")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "done\n", out.stderr


# ------------------------------------------------------------------------------------- the z law


def test_moments_and_ks():
    z = noise.gaussian(1_000_000, 2024).double()
    assert abs(z.mean().item()) < 0.005
    assert abs(z.std().item() - 1) < 0.005
    result = stats.kstest(z.numpy(), "norm")
    assert result.pvalue > 0.01, result
    # Tails: P(|z| > 3) = 0.0026998; four standard errors of slack.
    tail = (z.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 4 * (0.0027 / 1e6) ** 0.5


def test_lanes_counters_and_seeds_uncorrelated():
    n = 1 << 20
    z = noise.gaussian(n, 7).double().view(-1, 4)  # rows: counters, columns: lanes
    bound = 5 / (n // 4) ** 0.5
    corr = torch.corrcoef(z.T)
    assert (corr - torch.eye(4, dtype=torch.float64)).abs().max() < bound
    for lane in range(4):  # the same lane at neighbouring counters
        c = torch.corrcoef(torch.stack([z[:-1, lane], z[1:, lane]]))[0, 1]
        assert abs(c) < bound
    # Seeds that differ in one bit, low or high word, and seeds far apart.
    base = noise.gaussian(n, 7).double()
    for other in (6, 7 + 2**32, 2**63 - 1):
        c = torch.corrcoef(torch.stack([base, noise.gaussian(n, other).double()]))[0, 1]
        assert abs(c) < 5 / n**0.5


# ---------------------------------------------------------------------------- in-place round trip


def test_round_trip_fp32():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1 << 16, generator=g) * 0.02
    mu = 1e-3
    x = x0.clone()
    noise.add_(x, [42], [mu])
    assert not torch.equal(x, x0)
    noise.add_(x, [42], [-mu])
    # (x + p) - p with p = mu z rounded once: within one ulp of the larger of |x| and |p|.
    p = mu * noise.gaussian(x.numel(), 42).abs()
    ulp = torch.finfo(torch.float32).eps * torch.maximum(x0.abs(), p)
    assert ((x - x0).abs() <= ulp).all()


def test_round_trip_drift_over_1000_cycles():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4096, generator=g) * 0.02
    x = x0.clone()
    mu = 1e-3
    for step in range(1000):
        noise.add_(x, [step], [mu])
        noise.add_(x, [step], [-mu])
    # Each cycle adds at most one rounding error of about ulp(|x| + mu |z|), a random walk.
    # Measured on this data: max |drift| 8.8e-8, mean 2.1e-9 (about one ulp of a typical weight).
    # Bound: 1e-6, a thousandth of mu and a third of 1000 worst-case ulps at |x| = 0.05.
    drift = (x - x0).abs()
    assert drift.max().item() < 1e-6
    assert drift.mean().item() < 1e-8


# --------------------------------------------------------------------------------- bad input


def test_errors():
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="contiguous"):
        noise.add_(torch.zeros(4, 4).t(), [1], [1.0])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
        noise.add_(x, [-1], [1.0])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
        noise.add_(x, [2**63], [1.0])
    with pytest.raises(ValueError, match="1 to 64"):
        noise.add_(x, list(range(65)), [1.0] * 65)
    with pytest.raises(ValueError, match="1 to 64"):
        noise.add_(x, [], [])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        noise.add_(torch.zeros(10, dtype=torch.int32), [1], [1.0])
    with pytest.raises(ValueError, match="2 seeds but 1 scales"):
        noise.add_(x, [1, 2], [1.0])
    with pytest.raises(ValueError, match="finite"):
        noise.add_(x, [1], [float("nan")])
    with pytest.raises(TypeError, match="ints"):
        noise.add_(x, [1.5], [1.0])
    with pytest.raises(TypeError, match="int64"):
        noise.add_(x, torch.tensor([1], dtype=torch.int32), [1.0])
    with pytest.raises(ValueError, match="offset"):
        noise.add_(x, [1], [1.0], offset=-1)
    with pytest.raises(ValueError, match="offset"):
        noise.add_(x, [1], [1.0], offset=2**63 - 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        noise.add_(x, [1], [1.0], backend="cuda")
    with pytest.raises(ValueError, match="n must be"):
        noise.gaussian(-1, 0)
    assert torch.equal(x, torch.zeros(10)), "a rejected call must not touch x"


def test_tensor_seeds_and_scales_accepted():
    a = noise.add_(torch.zeros(100), torch.tensor([3, 4]), torch.tensor([0.5, 2.0]))
    b = noise.add_(torch.zeros(100), [3, 4], [0.5, 2.0])
    assert_bits_equal(a, b)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("HOSL_NOISE_BACKEND", raising=False)
    assert noise.resolve_backend(None, "cpu") == "cpp"
    monkeypatch.setenv("HOSL_NOISE_BACKEND", "torch")
    assert noise.resolve_backend(None, "cpu") == "torch"
    assert noise.resolve_backend("cpp", "cpu") == "cpp"  # an explicit backend wins
    monkeypatch.setenv("HOSL_NOISE_BACKEND", "fast")
    with pytest.raises(ValueError, match="HOSL_NOISE_BACKEND"):
        noise.resolve_backend(None, "cpu")


def test_unusable_backend_says_why(monkeypatch):
    with pytest.raises(noise.BackendUnavailableError, match="CPU tensors"):
        noise.resolve_backend("cpp", "meta")
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "load_error", "ImportError: simulated")
    with pytest.raises(noise.BackendUnavailableError, match="hosl._C.*simulated"):
        noise.add_(torch.zeros(4), [1], [1.0], backend="cpp")
    assert noise.resolve_backend(None, "cpu") == "torch"  # automatic choice falls back


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    kernels, interpreted = noise._triton_kernels()
    if interpreted:
        pytest.skip("Triton was imported with TRITON_INTERPRET=1")
    with pytest.raises(noise.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        noise.add_(torch.zeros(4), [1], [1.0], backend="triton")


def test_add_bumps_autograd_version():
    x = torch.zeros(8)
    before = x._version
    noise.add_(x, [1], [1.0], backend="cpp")
    assert x._version > before


# ------------------------------------------------------------------ rows of a table: add_rows_

NUM_ROWS = 11
ROW_WIDTHS = [1, 3, 64, 257]  # odd widths: rows start at positions that are not multiples of 4
ROW_OFFSETS = {"offset=0": 0, "offset=2**33+3": 2**33 + 3}
ROW_CASES = {
    "unsorted-repeats": [7, 2, 10, 2, 0, 7, 7, 5],
    "empty": [],
    "single": [4],
    "last": [NUM_ROWS - 1],
    "all-reversed": list(range(NUM_ROWS))[::-1],
    "int64-tensor": torch.tensor([9, 1, 9, 3]),
    "int32-tensor": torch.tensor([6, 0, 6], dtype=torch.int32),
}


def make_table(num_rows: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return (torch.randn(num_rows, width, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def row_terms(terms: int) -> tuple[list[int], list[float]]:
    return [2**40 + 17 * k for k in range(terms)], [(-1) ** k * 10 ** -(k % 3) for k in range(terms)]


def dense_on_rows(table: torch.Tensor, rows, seeds, scales, offset: int) -> torch.Tensor:
    """What add_rows_ must give: the dense reference add_ on a clone, kept on the given rows only."""
    dense = noise.add_(table.clone(), seeds, scales, offset=offset, backend="torch")
    want = table.clone()
    chosen = sorted(set(torch.as_tensor(rows, dtype=torch.int64).tolist()))
    want[chosen] = dense[chosen]
    return want


@pytest.mark.parametrize("terms", [1, 3], ids=lambda t: f"terms={t}")
@pytest.mark.parametrize("offset", ROW_OFFSETS.values(), ids=ROW_OFFSETS.keys())
@pytest.mark.parametrize("width", ROW_WIDTHS, ids=lambda w: f"width={w}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_add_rows_is_dense_add_on_those_rows(backend, dtype, width, offset, terms):
    table = make_table(NUM_ROWS, width, dtype, seed=width + terms)
    rows = ROW_CASES["unsorted-repeats"]  # duplicates applied once, the last row, row 0
    seeds, scales = row_terms(terms)
    want = dense_on_rows(table, rows, seeds, scales, offset)
    got = noise.add_rows_(table.clone(), rows, seeds, scales, offset=offset, backend=backend)
    assert_bits_equal(got.view(-1), want.view(-1))  # chosen rows as dense, every other row as it was
    assert not torch.equal(got[rows], table[rows])


@pytest.mark.parametrize("rows", ROW_CASES.values(), ids=ROW_CASES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_add_rows_row_sets(backend, rows):
    table = make_table(NUM_ROWS, 3, torch.bfloat16, seed=5)
    want = dense_on_rows(table, rows, [3, 4], [0.5, -0.25], 2**33 + 3)
    got = noise.add_rows_(table.clone(), rows, [3, 4], [0.5, -0.25], offset=2**33 + 3, backend=backend)
    assert_bits_equal(got.view(-1), want.view(-1))
    assert torch.equal(got, table) == (len(rows) == 0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_add_rows_cpp_bit_identical(dtype):
    table = make_table(300, 129, dtype, seed=1)
    rows = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(2))
    seeds, scales = row_terms(3)
    a = noise.add_rows_(table.clone(), rows, seeds, scales, offset=5, backend="cpp")
    b = noise.add_rows_(table.clone(), rows, seeds, scales, offset=5, backend="torch")
    assert_bits_equal(a.view(-1), b.view(-1))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_add_rows_on_a_view_into_a_flat_buffer(backend, dtype):
    """An embedding that is a view into a flat parameter buffer, at element offset `start`, noised
    at noise offset `start`: the whole buffer's dense noise, on those rows' elements only."""
    num_rows, width, start = 37, 41, 1234
    flat = make_table(1, 5000, dtype, seed=3).view(-1)
    table = flat[start : start + num_rows * width].view(num_rows, width)
    assert table.storage_offset() == start
    rows = [36, 0, 17, 17, 18, 5]
    dense = noise.add_(flat.clone(), [9], [0.5], backend="torch")
    want = flat.clone()
    for r in set(rows):
        lo = start + r * width
        want[lo : lo + width] = dense[lo : lo + width]
    noise.add_rows_(table, rows, [9], [0.5], offset=start, backend=backend)
    assert_bits_equal(flat, want)  # elements outside the table untouched too


def test_add_rows_cpp_independent_of_thread_count():
    # 2 threads split rows once more than 2 * 32768 elements are chosen: here 24 rows of 4099,
    # in runs of neighbouring rows that the split may cut.
    table = make_table(64, 4099, torch.bfloat16, seed=4)
    rows = [r for r in range(64) if r % 8 < 3] + [40, 1, 1]
    seeds, scales = row_terms(2)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(noise.add_rows_(table.clone(), rows, seeds, scales, offset=3, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    _C = _ext.require("this test")
    for n in (3, 7):  # more threads than the machine has cores: the split alone is tested
        x = table.clone()
        r = torch.unique(torch.tensor(rows))
        _C.add_noise_rows(x.data_ptr(), 64, 4099, r.data_ptr(), r.numel(), CODE[torch.bfloat16], seeds, scales, 3, n)
        results.append(x)
    for got in results[1:]:
        assert_bits_equal(got.view(-1), results[0].view(-1))
    assert_bits_equal(results[0].view(-1), dense_on_rows(table, rows, seeds, scales, 3).view(-1))


def rejects_rows_call(error, match, *args, **kwargs):
    with pytest.raises(error, match=match) as info:
        noise.add_rows_(*args, **kwargs)
    assert "\n" not in str(info.value), "errors are one line"


def test_add_rows_errors():
    table = torch.zeros(NUM_ROWS, 4)
    for bad in (-1, NUM_ROWS):
        message = rf"^row index {bad} is out of range for a table of 11 rows$"
        rejects_rows_call(ValueError, message, table, [0, bad, 2], [1], [1.0])
        rejects_rows_call(ValueError, message, table, torch.tensor([0, bad, 2]), [1], [1.0])
    rejects_rows_call(ValueError, "out of range", table, [2**70], [1], [1.0])
    rejects_rows_call(TypeError, "rows must be ints", table, [1.0, 2.0], [1], [1.0])
    rejects_rows_call(TypeError, "integer tensor.*float32", table, torch.tensor([1.0]), [1], [1.0])
    rejects_rows_call(ValueError, "rows must be 1-D", table, torch.zeros(2, 2, dtype=torch.int64), [1], [1.0])
    rejects_rows_call(ValueError, r"table must be 2-D .*\(44,\)", table.view(-1), [0], [1], [1.0])
    rejects_rows_call(ValueError, "table must be contiguous", torch.zeros(4, 6).t(), [0], [1], [1.0])
    rejects_rows_call(TypeError, "float32, bfloat16 or float16", table.int(), [0], [1], [1.0])
    rejects_rows_call(ValueError, "add_rows_ takes 1 to 64", table, [0], [], [])
    rejects_rows_call(ValueError, "offset", table, [0], [1], [1.0], offset=2**63 - 43)
    assert torch.equal(table, torch.zeros(NUM_ROWS, 4)), "a rejected call must not touch the table"


def test_cpp_rows_recheck_what_would_corrupt_memory():
    _C = _ext.require("this test")
    table = torch.zeros(NUM_ROWS, 4)
    for rows, message in [([3, NUM_ROWS], "outside a table of 11 rows"), ([3, 2], "sorted"), ([2, 2], "distinct")]:
        r = torch.tensor(rows)
        with pytest.raises(ValueError, match=message):
            fp32 = CODE[torch.float32]
            _C.add_noise_rows(table.data_ptr(), NUM_ROWS, 4, r.data_ptr(), r.numel(), fp32, [1], [1.0], 0, 1)
    assert torch.equal(table, torch.zeros(NUM_ROWS, 4))


def test_add_rows_bumps_autograd_version():
    table = torch.zeros(3, 5)
    before = table._version
    noise.add_rows_(table, [1], [1], [1.0], backend="cpp")
    assert table._version > before


def test_the_noise_and_the_frames_number_dtypes_alike():
    """One dtype numbering in hosl._C (csrc/dtype.h): the noise kernels take the wire's codes."""
    from hosl import boundary

    assert CODE == {d: boundary._DTYPE_CODES[d] for d in CODE}
    _C = _ext.require("this test")
    x = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="the noise's dtype code must be 1"):
        _C.add_noise(x.data_ptr(), 8, boundary._DTYPE_CODES[torch.int8], [1], [1.0], 0, 1)


def test_terms_checked_once_give_the_functions_bits():
    """noise.Terms (what a scratch probe uses on each module in turn) against add_ and add_rows_ on
    copies: the same bits, on float32 and bfloat16, dense and on rows; bad tensors still refused."""
    terms = noise.Terms([11, 12], [0.5, -0.25])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1000).to(dtype)
        a, b = x.clone(), x.clone()
        terms.add_(a, offset=77)
        noise.add_(b, [11, 12], [0.5, -0.25], offset=77)
        assert torch.equal(a, b) and not torch.equal(a, x)
        t = torch.randn(9, 13).to(dtype)
        a, b = t.clone(), t.clone()
        terms.add_rows_(a, noise.checked_rows([7, 2, 2], 9), offset=5)
        noise.add_rows_(b, [2, 7], [11, 12], [0.5, -0.25], offset=5)
        assert torch.equal(a, b) and torch.equal(a[0], t[0]) and not torch.equal(a[2], t[2])
    with pytest.raises(ValueError, match="contiguous"):
        terms.add_(torch.zeros(4, 4).t())
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        terms.add_(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        noise.checked_rows([9], 9)


# --- stochastic rounding (weights without a float32 master) -----------------------------------------


def _bf16_stochastic_by_bits(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """bfloat16 is float32 with its low 16 bits cut: the neighbour toward zero is x's bits with them
    cleared, the one away from zero one bfloat16 ulp further, taken where u > 1 - low16 / 2^16."""
    bits = x.view(torch.int32).long() & 0xFFFFFFFF
    low = (bits & 0xFFFF).double() / 65536
    toward = bits & 0xFFFF0000
    chosen = torch.where(u.double() > 1 - low, toward + 0x10000, toward)
    chosen = torch.where(chosen >= 1 << 31, chosen - (1 << 32), chosen).to(torch.int32)
    return chosen.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def _f16_stochastic_by_numpy(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """float16: the two neighbours from numpy's nextafter, the probability in float64."""
    xs = x.numpy().astype(np.float64)
    nearest = xs.astype(np.float16)
    toward = np.where(np.abs(nearest.astype(np.float64)) > np.abs(xs), np.nextafter(nearest, np.float16(0)), nearest)
    away = np.nextafter(toward, np.copysign(np.float16(np.inf), xs).astype(np.float16))
    p = np.abs(xs - toward.astype(np.float64)) / np.abs(away.astype(np.float64) - toward.astype(np.float64))
    return torch.from_numpy(np.where(u.numpy() > 1 - p, away, toward))


def test_uniform_is_two_gaussians_radius_and_uniform():
    """u = exp(-(z1^2 + z2^2) / 2) from the pair of normals at positions 2j and 2j + 1, computed here
    in float64; uniform by the KS test, and the same whatever the chunking."""
    u = noise.uniform_(torch.empty(200_000), 11, offset=5)
    z = noise.gaussian(400_000, 11, offset=10).double().numpy()
    expected = np.exp(-(z[0::2] ** 2 + z[1::2] ** 2) / 2)
    np.testing.assert_allclose(u.double().numpy(), expected, rtol=1e-6, atol=0)
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    assert torch.equal(noise.uniform_(torch.empty(1000), 11, offset=105), u[100:1100])
    with pytest.raises(TypeError, match="float32"):
        noise.uniform_(torch.empty(3, dtype=torch.bfloat16), 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_stochastic_against_its_neighbours_by_other_means(dtype):
    """Each value goes to the neighbour the bits (bfloat16) or numpy's nextafter (float16) say, for
    the same u, on both signs, on values of dtype itself, zeros, subnormals and large values."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(5000) * 0.02, torch.randn(5000) * 300, torch.randn(100) * 1e-6,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5 + 2**-12])])  # fmt: skip
    x = torch.cat([x, x.to(dtype).float()])  # values of dtype come back as they are
    u = noise.uniform_(torch.empty_like(x), 3)
    got = noise.round_stochastic(x, dtype, u)
    expected = _bf16_stochastic_by_bits(x, u) if dtype == torch.bfloat16 else _f16_stochastic_by_numpy(x, u)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    half = x.numel() // 2
    assert torch.equal(got[half:], x[half:].to(dtype))
    assert (got[:half].float() != x[:half].to(dtype).float()).any()  # not round-to-nearest


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_stochastic_is_unbiased(dtype):
    """A value a tenth of an ulp above 1 rounds up a tenth of the time: the mean is the value, where
    round-to-nearest would give 1."""
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    x = torch.full((400_000,), 1.0 + 0.1 * ulp)
    got = noise.round_stochastic(x, dtype, noise.uniform_(torch.empty_like(x), 9)).double()
    assert set(got.unique().tolist()) == {1.0, 1.0 + ulp}
    assert abs(got.mean().item() - (1.0 + 0.1 * ulp)) < 0.003 * ulp
    assert abs(noise.round_stochastic(-x, dtype, noise.uniform_(torch.empty_like(x), 9)).double().mean().item()
               + (1.0 + 0.1 * ulp)) < 0.003 * ulp  # fmt: skip


def test_round_stochastic_special_values_and_errors():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30])
    got = noise.round_stochastic(x, torch.float16, torch.full((5,), 0.5))
    assert got[0] == float("inf") and got[1] == float("-inf") and torch.isnan(got[2])
    assert got[3] == 65504 and got[4] == -65504  # float16: finite past the largest rounds to the largest
    got = noise.round_stochastic(x, torch.bfloat16, torch.full((5,), 0.5))
    assert got[0] == float("inf") and got[1] == float("-inf") and torch.isnan(got[2])
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        noise.round_stochastic(x, torch.float32, x)
    with pytest.raises(ValueError, match="one shape"):
        noise.round_stochastic(x, torch.bfloat16, x[:2])


# ------------------------------------------------------------------ the Triton launcher's structure


class _Recorder:
    """Stands in for a tuned Triton kernel: records each launch's grid and arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


@pytest.mark.parametrize("terms", [1, 2, 9])
def test_triton_pass_is_one_launch_and_stages_only_long_term_lists(monkeypatch, terms):
    """Without running a kernel: every pass is one launch whatever its size and offset (the edges
    ride in the same grid), seeds and scales of one- and two-term passes travel as scalar
    arguments (nothing is copied to the device, so nothing can block the host there), and only
    longer lists are staged, once per pass."""
    kernels, _ = noise._triton_kernels()
    recorder, staged = _Recorder(), []
    monkeypatch.setattr(kernels, "_TUNED", {"dense": recorder, "rows": recorder})
    monkeypatch.setattr(kernels, "stage", lambda host, device: staged.append(host) or host)
    seeds, scales = list(range(1, terms + 1)), [0.5] * terms
    for n, offset in [(1, 0), (3, 1), (4096, 0), (100_003, 5), (16, 3)]:
        kernels.add_noise_(torch.zeros(n), seeds, scales, offset)
    kernels.add_noise_rows_(torch.zeros(10, 64), torch.tensor([1, 4]), seeds, scales, 0)
    assert len(recorder.launches) == 6
    assert len(staged) == (0 if terms <= 2 else 6) + 1  # + the rows list
    for (_, args, kwargs), name in zip(recorder.launches, ["dense"] * 5 + ["rows"]):
        assert kwargs["NUM_TERMS"] == (terms if terms <= 2 else 0)
        terms_arg = args[kernels.KERNELS[name].arg_names.index("terms_ptr")]
        if terms <= 2:
            assert terms_arg is None
        else:
            assert terms_arg.dtype == torch.int32 and terms_arg.numel() == 3 * terms


# --------------------------------------------------------------------------- Rademacher directions


def rademacher_numpy(seed: int, offset: int, n: int) -> np.ndarray:
    """r(seed, offset + i) from the numpy Philox, written from the contract: bit p % 32 of word
    (p % 128) // 32 of counter p // 128, -1 where it is set."""
    positions = np.arange(offset, offset + n, dtype=np.uint64)
    counter = positions // np.uint64(128)
    zeros = np.zeros_like(counter)
    out = philox4x32_10(
        counter & np.uint64(0xFFFFFFFF), counter >> np.uint64(32), zeros, zeros, seed & 0xFFFFFFFF, seed >> 32
    )
    lane = (positions % np.uint64(128)).astype(np.int64)
    word = np.choose(lane // 32, [w.astype(np.uint64) for w in out])
    bit = (word >> (lane % 32).astype(np.uint64)) & np.uint64(1)
    return np.where(bit == 1, -1.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("offset", [*OFFSETS, 127, 128 * (2**32 - 3) + 5])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_rademacher_against_numpy_philox(backend, seed, offset):
    """r from each backend equals r written from the contract over an independent Philox, across a
    counter's 128 bits, its four words and (last offset) the counter's 32-bit word boundary."""
    n = 4 * 128 * 3 + 37
    got = noise.rademacher(n, seed, offset=offset, backend=backend)
    np.testing.assert_array_equal(got.numpy(), rademacher_numpy(seed, offset, n))


@pytest.mark.parametrize("isa", _noise_isas())
@pytest.mark.parametrize("terms", [1, 2, 9])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_add_rademacher_cpp_bit_identical_on_every_instruction_set(dtype, terms, isa):
    """add_ of r, each C++ copy against the torch reference: float32 sums in the order of the terms,
    rounded once; and add_rows_ against the dense pass on those rows."""
    _C = _ext.require("this test")
    before = _C.noise_isa()
    _C.set_noise_isa(isa)
    try:
        x = (torch.randn(20_011, generator=torch.Generator().manual_seed(terms)) * 0.05).to(dtype)
        seeds = [7 + k * 2**40 for k in range(terms)]
        scales = [(-1) ** k * 10.0 ** -(k % 4) for k in range(terms)]
        a = noise.add_(x.clone(), seeds, scales, offset=131, backend="cpp", dist="rademacher")
        b = noise.add_(x.clone(), seeds, scales, offset=131, backend="torch", dist="rademacher")
        assert_bits_equal(a, b)
        table = make_table(50, 33, dtype, seed=6)
        rows = [49, 3, 4, 4, 20]
        got = noise.add_rows_(table.clone(), rows, seeds, scales, offset=7, backend="cpp", dist="rademacher")
        dense = noise.add_(table.clone(), seeds, scales, offset=7, backend="torch", dist="rademacher")
        chosen = sorted(set(rows))
        assert_bits_equal(got[chosen].reshape(-1), dense[chosen].reshape(-1))
        others = [r for r in range(50) if r not in chosen]
        assert_bits_equal(got[others].reshape(-1), table[others].reshape(-1))
    finally:
        _C.set_noise_isa(before)


def test_rademacher_independent_of_thread_count_and_chunking():
    _C = _ext.require("this test")
    n, seed = (1 << 20) + 13, 2**62 + 5
    whole = noise.rademacher(n, seed, offset=3, backend="torch")
    for threads in (1, 2, 3, 7):
        out = torch.empty(n)
        _C.gaussian(out.data_ptr(), n, seed, 3, threads, 1)
        assert_bits_equal(out, whole)
        x = torch.linspace(-1, 1, n, dtype=torch.bfloat16)
        _C.add_noise(x.data_ptr(), n, CODE[torch.bfloat16], [1, 2], [0.1, -0.2], 3, threads, 1)
        want = noise.add_(torch.linspace(-1, 1, n, dtype=torch.bfloat16), [1, 2], [0.1, -0.2], offset=3,
                          backend="torch", dist="rademacher")  # fmt: skip
        assert_bits_equal(x, want)
    cuts = [0, 1, 127, 128, 129, 4099, 100_000, n]
    pieces = [noise.rademacher(b - a, seed, offset=3 + a, backend="cpp") for a, b in zip(cuts, cuts[1:])]
    assert_bits_equal(whole, torch.cat(pieces))


def test_rademacher_law():
    """Values +-1 only, half each, uncorrelated with their neighbours and across seeds: E[r r^T] = I."""
    n = 1 << 20
    r = noise.rademacher(n, 2024).double()
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.mean().item()) < 5 / n**0.5
    assert abs(torch.corrcoef(torch.stack([r[:-1], r[1:]]))[0, 1].item()) < 5 / n**0.5
    assert abs(torch.corrcoef(torch.stack([r[:-128], r[128:]]))[0, 1].item()) < 5 / n**0.5  # next counter
    for other in (2025, 2024 + 2**32):
        assert abs((r * noise.rademacher(n, other).double()).mean().item()) < 5 / n**0.5


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_rademacher_scale_flips_the_sign_exactly(backend):
    """scale * r is exact, a sign flip: a term of scale 0 adds -0.0 where r = -1 (which keeps -0.0 in
    x), a pass on zeros writes +-scale, and two terms add in float32 in their order."""
    x = torch.full((4096,), -0.0)
    noise.add_(x, [3], [0.0], backend=backend, dist="rademacher")
    r = noise.rademacher(4096, 3, backend="torch")
    assert torch.equal(torch.signbit(x), r < 0)
    x = noise.add_(torch.zeros(4096), [5], [0.1], backend=backend, dist="rademacher")
    assert torch.equal(x, torch.tensor(0.1) * noise.rademacher(4096, 5, backend="torch"))
    x = noise.add_(torch.ones(4096), [5, 6], [1e-8, 1.0], backend=backend, dist="rademacher")
    r5, r6 = noise.rademacher(4096, 5, backend="torch"), noise.rademacher(4096, 6, backend="torch")
    assert torch.equal(x, (torch.ones(4096) + 1e-8 * r5) + r6)  # 1 + 1e-8 rounds to 1 first: 0 or 2


def test_dist_is_checked_before_x_is_touched():
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="dist must be one of gaussian, rademacher; got 'bernoulli'"):
        noise.add_(x, [1], [1.0], dist="bernoulli")
    with pytest.raises(ValueError, match="dist must be one of"):
        noise.add_rows_(x.view(2, 4), [0], [1], [1.0], dist="normal")
    with pytest.raises(ValueError, match="dist must be one of"):
        noise.directions(8, 1, dist="uniform")
    with pytest.raises(ValueError, match="dist must be one of"):
        noise.Terms([1], [1.0], dist=None)
    assert torch.equal(x, torch.zeros(8))
    _C = _ext.require("this test")
    with pytest.raises(ValueError, match="dist must be 0 .gaussian. or 1 .rademacher., got 2"):
        _C.add_noise(x.data_ptr(), 8, CODE[torch.float32], [1], [1.0], 0, 1, 2)


def test_terms_carry_their_dist():
    x = torch.randn(1000)
    terms = noise.Terms([4, 5], [0.5, -0.25], dist="rademacher")
    a = terms.add_(x.clone(), offset=9)
    b = noise.add_(x.clone(), [4, 5], [0.5, -0.25], offset=9, dist="rademacher")
    assert_bits_equal(a, b)
    assert not torch.equal(a, noise.add_(x.clone(), [4, 5], [0.5, -0.25], offset=9))
