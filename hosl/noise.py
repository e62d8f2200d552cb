"""The seeded noise primitive: every zeroth-order weight write in hosl goes through `add_`.

    add_(x, seeds, scales, offset=o):  x[i] += sum_k scales[k] * z(seeds[k], o + i)   (x viewed flat)

z(seed, j) is a standard normal fixed by the seed and the position j alone (Philox4x32-10 and
Box-Muller; hosl/reference.py gives the exact recipe). It is regenerated inside the kernel and
never stored, so a perturbation, a restore, or a restore plus an update over many probes costs one
read and one write of x. The sum is taken in float32, in the order of the terms, and rounded once
(to nearest even) into x's dtype.

    add_rows_(table, rows, seeds, scales, offset=o):  the same on chosen rows of a 2-D table only,
        table[r, j] += sum_k scales[k] * z(seeds[k], o + r * width + j)

is the sparse form for embedding tables: each element keeps its position in the dense layout, so
the chosen rows get exactly the bits `add_` would give them and the other rows keep theirs.

Every function takes dist="rademacher" for r(seed, j) in place of z: +1 or -1, one bit of the same
Philox stream each (bit j % 128 of counter j // 128). A pass of r needs one Philox call per 128
elements and no Box-Muller, which bounds a Gaussian pass on the CPU.

Backends, all bit-identical:

* "cpp": the C++ CPU kernel in hosl._C, multithreaded (torch.get_num_threads() threads).
* "triton": the Triton kernel, for CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set
  before Triton was imported.
* "torch": the pure-PyTorch reference, any device; slow, used by tests and as the last fallback.

Stochastic rounding, for weights kept in bfloat16 or float16 without a float32 master (hosl.zo):

    uniform_(u, seed, offset=o):  u[i] = exp(-(z(seed, 2j)^2 + z(seed, 2j+1)^2) / 2), j = o + i:
        uniform on (0, 1]
    round_stochastic(x, dtype, u): each float32 x[i] to one of the two values of dtype around it,
        away from zero where u[i] > 1 - |x[i] - t| / |a - t| (t, a: the neighbours toward and away
        from zero), so that E[result] = x[i] for uniform u.

backend=None picks "triton" for CUDA tensors and "cpp" for CPU tensors, falling back to "torch"
when those cannot run; the environment variable HOSL_NOISE_BACKEND forces one backend for every call
that does not name its own.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import torch

from hosl import _ext
from hosl import reference as _reference

BACKENDS = ("torch", "cpp", "triton")
DISTRIBUTIONS = ("gaussian", "rademacher")  # z, r; the codes csrc/noise.h numbers them by
MAX_TERMS = 64
SEED_LIMIT = 1 << 63
_DTYPE_CODES = {torch.float32: 1, torch.float16: 3, torch.bfloat16: 4}  # csrc/dtype.h: the wire's numbering
_ENV = "HOSL_NOISE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested noise backend cannot run here; the message says why."""


def _triton_kernels():
    """hosl.kernels.noise and whether it was compiled for the interpreter, or BackendUnavailableError.

    kernels/ has no __init__.py: it installs as the namespace portion hosl.kernels, so that in the
    repository root the folder cannot shadow the unrelated PyPI package `kernels`, which
    transformers imports."""
    try:
        from hosl.kernels import noise as kernels
    except ImportError as exc:
        raise BackendUnavailableError(f"the triton backend needs Triton, which did not import ({exc})") from exc
    return kernels, kernels.INTERPRETED


def _why_not(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, not {device.type}"
        try:
            _ext.require("the cpp backend")
        except _ext.ExtensionUnavailableError as exc:
            return str(exc)
        return None
    try:
        _, interpreted = _triton_kernels()
    except BackendUnavailableError as exc:
        return str(exc)
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return None
    if device.type == "cpu":
        return "Triton needs a CUDA tensor, or TRITON_INTERPRET=1 in the environment before Triton is imported"
    return f"the triton backend runs on CUDA tensors, not {device.type}"


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each backend, None if it can run on `device`, else why not."""
    device = torch.device(device)
    return {name: _why_not(name, device) for name in BACKENDS}


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    """The backend a call would use on `device`: `backend`, else $HOSL_NOISE_BACKEND, else the
    fastest one that can run. Raises BackendUnavailableError for a named backend that cannot."""
    device = torch.device(device)
    named = backend if backend is not None else os.environ.get(_ENV) or None
    if named is not None:
        if named not in BACKENDS:
            source = "backend" if backend is not None else _ENV
            raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {named!r}")
        reason = _why_not(named, device)
        if reason is not None:
            raise BackendUnavailableError(reason)
        return named
    preferred = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    return next(name for name in preferred if _why_not(name, device) is None)


def _check_seeds(seeds, what: str = "add_") -> list[int]:
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype != torch.int64 or seeds.dim() != 1:
            raise TypeError(
                f"seeds must be a 1-D int64 tensor or a sequence of ints; got {seeds.dtype} {seeds.dim()}-D"
            )
        values = seeds.tolist()
    elif isinstance(seeds, Sequence) and not isinstance(seeds, (str, bytes)):
        values = list(seeds)
    else:
        raise TypeError(f"seeds must be a sequence of ints or a 1-D int64 tensor; got {type(seeds).__name__}")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"seeds must be ints; got {s!r}")
        if not 0 <= s < SEED_LIMIT:
            raise ValueError(f"seeds must be in [0, 2**63); got {s}")
    if not 1 <= len(values) <= MAX_TERMS:
        raise ValueError(f"{what} takes 1 to {MAX_TERMS} terms; got {len(values)} seeds")
    return [int(s) for s in values]


def _check_scales(scales, count: int) -> torch.Tensor:
    if isinstance(scales, torch.Tensor):
        if scales.dtype != torch.float32 or scales.dim() != 1:
            raise TypeError(f"scales must be a 1-D float32 tensor or a sequence of floats; got {scales.dtype}")
        values = scales.detach().cpu()
    elif isinstance(scales, Sequence) and not isinstance(scales, (str, bytes)):
        for c in scales:
            if isinstance(c, bool) or not isinstance(c, numbers.Real):
                raise TypeError(f"scales must be real numbers; got {c!r}")
        values = torch.tensor([float(c) for c in scales], dtype=torch.float32)
    else:
        raise TypeError(f"scales must be a sequence of floats or a 1-D float32 tensor; got {type(scales).__name__}")
    if values.numel() != count:
        raise ValueError(f"got {count} seeds but {values.numel()} scales")
    if not torch.isfinite(values).all():
        raise ValueError(f"scales must be finite; got {values.tolist()}")
    return values


def _check_offset(offset, n: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"offset must be an int >= 0; got {offset!r}")
    if offset + n > SEED_LIMIT:
        raise ValueError(f"offset + numel must be <= 2**63; got {offset} + {n}")
    return int(offset)


def checked_dist(dist) -> str:
    """dist, one of DISTRIBUTIONS; ValueError naming them otherwise."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {', '.join(DISTRIBUTIONS)}; got {dist!r}")
    return dist


def _check_rows(rows, num_rows: int) -> torch.Tensor:
    """The distinct row indices, sorted, as an int64 CPU tensor; TypeError or ValueError otherwise."""
    if isinstance(rows, torch.Tensor):
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise TypeError(f"rows must be an integer tensor or a sequence of ints; got a {rows.dtype} tensor")
        if rows.dim() != 1:
            raise ValueError(f"rows must be 1-D (use rows.reshape(-1)); got shape {tuple(rows.shape)}")
        values = rows.detach().to("cpu", torch.int64)
    elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)):
        for r in rows:
            if isinstance(r, bool) or not isinstance(r, numbers.Integral):
                raise TypeError(f"rows must be ints; got {r!r}")
        bad = next((r for r in rows if not 0 <= r < num_rows), None)
        if bad is not None:  # before the tensor: an int beyond int64 would not fit in one
            raise ValueError(f"row index {bad} is out of range for a table of {num_rows} rows")
        values = torch.tensor([int(r) for r in rows], dtype=torch.int64)
    else:
        raise TypeError(f"rows must be a sequence of ints or a 1-D integer tensor; got {type(rows).__name__}")
    outside = (values < 0) | (values >= num_rows)
    if outside.any():
        bad = values[outside][0].item()
        raise ValueError(f"row index {bad} is out of range for a table of {num_rows} rows")
    # Sorted and distinct: a repeated row is applied once, and the cpp threads own disjoint rows.
    return torch.unique(values)


def add_(
    x: torch.Tensor,
    seeds: Sequence[int] | torch.Tensor,
    scales: Sequence[float] | torch.Tensor,
    *,
    offset: int = 0,
    backend: str | None = None,
    dist: str = "gaussian",
) -> torch.Tensor:
    """In place, for contiguous x viewed flat: x[i] += sum_k scales[k] * z(seeds[k], offset + i).

    x: float32, bfloat16 or float16. seeds: 1 to 64 ints in [0, 2**63). scales: as many finite
    floats. Computed in float32 and rounded once into x's dtype. dist: "gaussian" (z) or
    "rademacher" (r). Returns x.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"x must be float32, bfloat16 or float16; got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(
            f"x must be contiguous (noise positions follow memory order); got shape {tuple(x.shape)} "
            f"with strides {x.stride()}: apply add_ to a contiguous copy and copy it back"
        )
    seed_list = _check_seeds(seeds)
    scale_t = _check_scales(scales, len(seed_list))
    offset = _check_offset(offset, x.numel())
    return _launch(x, seed_list, scale_t, offset, resolve_backend(backend, x.device), checked_dist(dist))


def _launch(
    x: torch.Tensor, seed_list: list[int], scale_t: torch.Tensor, offset: int, name: str, dist: str
) -> torch.Tensor:
    """add_ after its checks."""
    if x.numel() == 0:
        return x
    if name == "cpp":
        _ext._C.add_noise(
            x.data_ptr(),
            x.numel(),
            _DTYPE_CODES[x.dtype],
            seed_list,
            scale_t.tolist(),
            offset,
            torch.get_num_threads(),
            DISTRIBUTIONS.index(dist),
        )
    elif name == "triton":
        kernels, _ = _triton_kernels()
        with torch.no_grad():  # seeds and scales travel as kernel arguments: no host-device copy
            kernels.add_noise_(x, seed_list, scale_t.tolist(), offset, dist)
    else:
        with torch.no_grad():
            _reference.add_(x, seed_list, scale_t, offset, dist)
        return x
    # Written through a raw pointer: tell autograd the tensor changed, as an in-place op would.
    torch.autograd.graph.increment_version(x)
    return x


def add_rows_(
    table: torch.Tensor,
    rows: Sequence[int] | torch.Tensor,
    seeds: Sequence[int] | torch.Tensor,
    scales: Sequence[float] | torch.Tensor,
    *,
    offset: int = 0,
    backend: str | None = None,
    dist: str = "gaussian",
) -> torch.Tensor:
    """In place, for each distinct r in rows and every column j of the contiguous 2-D table:
    table[r, j] += sum_k scales[k] * z(seeds[k], offset + r * width + j).

    The position is the one table[r, j] has in the dense layout, so the result is bit for bit that
    of add_(table, seeds, scales, offset=offset) on the rows given, and the other rows are not
    touched. rows: ints in [0, num_rows), any order; a repeated row is applied once; empty is a
    no-op. table, seeds, scales and offset as for add_. Returns table.
    """
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"table must be a torch.Tensor; got {type(table).__name__}")
    if table.dtype not in _DTYPE_CODES:
        raise TypeError(f"table must be float32, bfloat16 or float16; got {table.dtype}")
    if table.dim() != 2:
        raise ValueError(f"table must be 2-D (num_rows, width); got shape {tuple(table.shape)}")
    if not table.is_contiguous():
        raise ValueError(
            f"table must be contiguous (noise positions follow memory order); got shape {tuple(table.shape)} "
            f"with strides {table.stride()}"
        )
    num_rows, width = table.shape
    row_t = _check_rows(rows, num_rows)
    seed_list = _check_seeds(seeds, "add_rows_")
    scale_t = _check_scales(scales, len(seed_list))
    offset = _check_offset(offset, table.numel())
    name = resolve_backend(backend, table.device)
    return _launch_rows(table, row_t, seed_list, scale_t, offset, name, checked_dist(dist))


def _launch_rows(table, row_t, seed_list, scale_t, offset: int, name: str, dist: str) -> torch.Tensor:
    """add_rows_ after its checks (row_t: sorted distinct int64 rows on the CPU)."""
    num_rows, width = table.shape
    if row_t.numel() == 0 or width == 0:
        return table
    if name == "cpp":
        _ext._C.add_noise_rows(
            table.data_ptr(),
            num_rows,
            width,
            row_t.data_ptr(),
            row_t.numel(),
            _DTYPE_CODES[table.dtype],
            seed_list,
            scale_t.tolist(),
            offset,
            torch.get_num_threads(),
            DISTRIBUTIONS.index(dist),
        )
    elif name == "triton":
        kernels, _ = _triton_kernels()
        with torch.no_grad():
            kernels.add_noise_rows_(table, row_t, seed_list, scale_t.tolist(), offset, dist)
    else:
        with torch.no_grad():
            _reference.add_rows_(table, row_t.tolist(), seed_list, scale_t, offset, dist)
        return table
    # Written through a raw pointer: tell autograd the tensor changed, as an in-place op would.
    torch.autograd.graph.increment_version(table)
    return table


class Terms:
    """Seeds and scales checked once, for many add_ and add_rows_ calls on different tensors (a
    scratch probe puts one term on each module's weights in turn): the functions' results, bit
    for bit, without their per-call checks of the terms. The tensors' own checks remain."""

    def __init__(self, seeds, scales, backend: str | None = None, dist: str = "gaussian"):
        self.seeds = _check_seeds(seeds)
        self.scales = _check_scales(scales, len(self.seeds))
        self.dist = checked_dist(dist)
        self._backend = backend
        self._names: dict[torch.device, str] = {}

    def _name(self, device: torch.device) -> str:
        if device not in self._names:
            self._names[device] = resolve_backend(self._backend, device)
        return self._names[device]

    def add_(self, x: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        if x.dtype not in _DTYPE_CODES or not x.is_contiguous():
            checked = dict(offset=offset, backend=self._backend, dist=self.dist)
            return add_(x, self.seeds, self.scales, **checked)  # it says what is wrong
        return _launch(x, self.seeds, self.scales, _check_offset(offset, x.numel()), self._name(x.device), self.dist)

    def add_rows_(self, table: torch.Tensor, rows: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """rows: as checked_rows(rows, table.shape[0]) gives them."""
        if table.dtype not in _DTYPE_CODES or table.dim() != 2 or not table.is_contiguous():
            checked = dict(offset=offset, backend=self._backend, dist=self.dist)
            return add_rows_(table, rows, self.seeds, self.scales, **checked)  # it says what is wrong
        name, offset = self._name(table.device), _check_offset(offset, table.numel())
        return _launch_rows(table, rows, self.seeds, self.scales, offset, name, self.dist)


def uniform_(u: torch.Tensor, seed: int, *, offset: int = 0, backend: str | None = None) -> torch.Tensor:
    """In place on a contiguous float32 u: u[i] = exp(-(z(seed, 2j)^2 + z(seed, 2j + 1)^2) / 2) with
    j = offset + i, fixed by the seed and the position. For two independent standard normals,
    z1^2 + z2^2 is exponential with mean 2, so u is uniform on (0, 1]. Returns u."""
    if u.dtype != torch.float32 or not u.is_contiguous():
        raise TypeError(f"u must be a contiguous float32 tensor; got {u.dtype}")
    n = u.numel()
    pair = gaussian(2 * n, seed, offset=2 * offset, device=u.device, backend=backend)
    pair.mul_(pair)
    torch.add(pair[0::2], pair[1::2], out=u.view(n))
    return u.mul_(-0.5).exp_()


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """float32 x rounded into dtype (bfloat16 or float16) stochastically, a new tensor: each element
    becomes t, its neighbour in dtype toward zero, or a, the one away from zero, taking a where
    u > 1 - |x - t| / |a - t|. For u uniform on (0, 1] that is unbiased: E[result] = x. Values of
    dtype come back unchanged, NaN stays NaN, infinities stay.

    bfloat16 is float32 with the low 16 bits cut, so there the rule is integer arithmetic on x's
    bits: adding ceil(2^16 u) - 1 carries into bit 16 exactly when it says a (sign and magnitude: the
    addition grows the magnitude on either side of zero); a finite x that carries past the largest
    finite value becomes inf with that probability. For float16 the neighbours come from the rounded
    bits: one step of the integer view is one ulp toward zero (-1) or away from it (+1); a finite x
    past float16's largest finite value rounds to it."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"stochastic rounding is into bfloat16 or float16; got {dtype}")
    if x.dtype != torch.float32 or u.dtype != torch.float32 or x.shape != u.shape:
        raise ValueError(f"x and u must be float32 tensors of one shape; got {x.dtype}, {u.dtype}")
    if dtype == torch.bfloat16:
        carry = (u * 65536).ceil_().sub_(1).clamp_(0, 65535).to(torch.int32)
        return (x.contiguous().view(torch.int32) + carry).bitwise_right_shift_(16).to(torch.int16).view(dtype)
    nearest = x.to(dtype)
    bits = nearest.view(torch.int16)
    toward = torch.where(nearest.float().abs() > x.abs(), bits - 1, bits)
    away = (toward + 1).view(dtype)
    toward = toward.view(dtype)
    low = toward.float()
    p = (x - low).abs_().div_((away.float() - low).abs_())
    return torch.where(u > 1 - p, away, toward)


def checked_rows(rows, num_rows: int) -> torch.Tensor:
    """The distinct rows of `rows`, sorted, as an int64 CPU tensor (ValueError for one out of range):
    what Terms.add_rows_ takes."""
    return _check_rows(rows, num_rows)


def gaussian(
    n: int, seed: int, *, offset: int = 0, device: torch.device | str = "cpu", backend: str | None = None
) -> torch.Tensor:
    """z(seed, offset), ..., z(seed, offset + n - 1) as a new float32 tensor on `device`."""
    return directions(n, seed, offset=offset, device=device, backend=backend)


def rademacher(
    n: int, seed: int, *, offset: int = 0, device: torch.device | str = "cpu", backend: str | None = None
) -> torch.Tensor:
    """r(seed, offset), ..., r(seed, offset + n - 1), each +1.0 or -1.0, as a new float32 tensor."""
    return directions(n, seed, offset=offset, device=device, backend=backend, dist="rademacher")


def directions(
    n: int,
    seed: int,
    *,
    offset: int = 0,
    device: torch.device | str = "cpu",
    backend: str | None = None,
    dist: str = "gaussian",
) -> torch.Tensor:
    """The directions of `dist` (z or r) at positions offset to offset + n - 1: the values a pass of
    add_(x, [seed], [1.0], dist=dist) adds there, as a new float32 tensor on `device`."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0; got {n!r}")
    (seed,) = _check_seeds([seed])
    offset = _check_offset(offset, n)
    dist = checked_dist(dist)
    device = torch.device(device)
    name = resolve_backend(backend, device)
    if name == "torch":
        return _reference._draw(dist, n, seed, offset, device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return out
    if name == "cpp":
        _ext._C.gaussian(out.data_ptr(), n, seed, offset, torch.get_num_threads(), DISTRIBUTIONS.index(dist))
    else:
        kernels, _ = _triton_kernels()
        kernels.gaussian_(out, seed, offset, dist)
    return out
