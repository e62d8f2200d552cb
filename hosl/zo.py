"""The parameter buffer of a zeroth-order side: ZOParams, one flat buffer at a place in the noise
stream, to which the passes of hosl.estimators are applied with hosl.noise.add_, so the noise is
regenerated and never stored; zo_params_of builds a model side's.

Scratch probes (PROBE_WRITES, _ScratchProbes) write no probe into the weights: each module's
weights are perturbed in a scratch copy of them while it runs, the weights stay w, a step's end is
the update alone, and replay is one pass per step. Tangents (ZOParams.tangent, _Tangents) give the
exact estimator its direction the same way: each module's parameters become dual tensors whose
tangent, z at their own noise positions, is generated just before the module runs and dropped after.

Row-sparse tables: a step's loss reads only the rows of an embedding table that its batch's tokens
index, so ZOParams can perturb and update just those rows (hosl.noise.add_rows_), each element
keeping the noise position it has in the dense layout. The rest of the buffer gets every pass as
before. The rows of each step are part of its replay record.

Without a float32 master (master=False, a bfloat16 or float16 buffer): the probes must be scratch
ones (a +mu / -mu round trip in low precision would not give w back), and every pass that writes
the weights, the update and weight decay, is computed in float32 a chunk at a time and rounded
stochastically into the buffer with a uniform drawn from the seeded stream (hosl.noise.uniform_
under a seed hashed from the pass's own seeds and scales): unbiased in expectation, so updates far
below an ulp still move the weights on average, and a pure function of the pass, so replay and
every client of a round give the same bits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hosl import noise
from hosl.estimators import estimator_of
from hosl.flat import FlatParams
from hosl.rows import embedding_tables

# Where a probe's perturbation is written: into the weights that persist (and undone by the next
# pass), or into a scratch copy of each module's weights just before the module runs.
INPLACE, SCRATCH = "inplace", "scratch"
PROBE_WRITES = (INPLACE, SCRATCH)


def zo_params_of(model: torch.nn.Module, cfg, params=None, offset: int = 0) -> ZOParams:
    """The ZO buffer of a model side: its trainable parameters in order (or `params`, named), with
    its embedding tables row-sparse under --zo-embedding rows. hosl.replay builds the same one."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if params is None else params
    tables = set(embedding_tables(model)) if cfg.zo_embedding == "rows" else set()
    row_sparse = [n for n, _ in named if n in tables]
    master = cfg.zo_master != "none"
    params = ZOParams(
        named, offset=offset, row_sparse=row_sparse, probes=cfg.zo_probes, master=master, dist=cfg.zo_noise
    )
    if cfg.zo_probes == SCRATCH:
        params.attach(model)
    if estimator_of(cfg.zo_estimator).exact:
        params.attach_tangents(model)
    return params


def decayed(param: torch.Tensor) -> bool:
    """Weight decay applies to matrices (linear and embedding weights), not to biases and norms."""
    return param.dim() >= 2


class ZOParams:
    """A set of parameters trained by ZO: one FlatParams buffer at a place in the noise stream.

    offset: where this buffer's noise starts. A split model trained by ZO on both sides (MeZO over
    the split) gives the server offset = the client's element count, so the pair sees the noise the
    unsplit model would.
    row_sparse: names of 2-D parameters (embedding tables) that passes given `rows` touch only on
    those rows. A pass without rows is dense over the whole buffer.
    dist: the directions, "gaussian" z or "rademacher" r (hosl.noise), of every pass, probe and tangent.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        offset: int = 0,
        row_sparse: Sequence[str] = (),
        probes: str = INPLACE,
        master: bool = True,
        dist: str = "gaussian",
    ):
        if probes not in PROBE_WRITES:
            raise ValueError(f"probes must be one of {PROBE_WRITES}, got {probes!r}")
        self.names = [n for n, _ in named_params]
        self.flat = FlatParams([p for _, p in named_params], master=master)
        # Weights in bfloat16 or float16 with no float32 master: written by stochastic rounding.
        self.native = self.flat.flat.dtype != torch.float32
        if self.native and probes != SCRATCH:
            raise ValueError(
                f"{str(self.flat.flat.dtype).removeprefix('torch.')} weights without a float32 master need "
                "scratch probes: an in-place +mu / -mu would not give the weights back in low precision"
            )
        self.offset = offset
        self.probes = probes
        self.dist = noise.checked_dist(dist)
        self._scratch: _ScratchProbes | None = None
        self._tangents: _Tangents | None = None
        self._rows_seen: list[tuple[object, int, torch.Tensor]] = []  # (given, table rows, checked)
        by_id = {id(p): n for n, p in named_params}
        self._decay = [(start, p.numel()) for p, start in zip(self.flat.params, self.flat.offsets) if decayed(p)]
        unknown = sorted(set(row_sparse) - set(self.names))
        if unknown:
            raise ValueError(f"row_sparse names parameters that are not here: {', '.join(unknown)}")
        # (start, rows, width) of each row-sparse table in the buffer, and the parameter, in buffer order.
        self.tables: list[tuple[int, int, int]] = []
        self.table_params: list[torch.nn.Parameter] = []
        for p, start in sorted(zip(self.flat.params, self.flat.offsets), key=lambda pair: pair[1]):
            if by_id.get(id(p)) in row_sparse:
                if p.dim() != 2:
                    raise ValueError(f"row-sparse parameter {by_id[id(p)]} must be 2-D, got {tuple(p.shape)}")
                self.tables.append((start, p.shape[0], p.shape[1]))
                self.table_params.append(p)
        # The dense stretches between the tables.
        self._dense: list[tuple[int, int]] = []
        at = 0
        for start, rows, width in self.tables:
            if start > at:
                self._dense.append((at, start))
            at = start + rows * width
        if at < self.numel:
            self._dense.append((at, self.numel))

    def directions(self, n: int, seed: int, start: int, device) -> torch.Tensor:
        """The n directions (z or r) that a pass of `seed` adds at buffer elements [start, start + n)."""
        return noise.directions(n, seed, offset=self.offset + start, device=device, dist=self.dist)

    @property
    def in_place(self) -> bool:
        """Whether a probe is written into the weights that persist (and undone by the next pass)."""
        return self.probes == INPLACE

    @property
    def numel(self) -> int:
        return self.flat.flat.numel()

    def add_(self, seeds: Sequence[int], scales: Sequence[float], rows: Sequence | None = None) -> None:
        """One noise pass. rows: one entry per row-sparse table, an index tensor or None (that table
        dense); rows=None: dense everywhere. Without a float32 master each span is summed in float32
        and rounded stochastically instead (one rounding seed for the whole pass)."""
        seeds, scales, buf = list(seeds), list(scales), self.flat.flat
        terms = noise.Terms(seeds, scales, dist=self.dist)  # checked once for the pass's spans and tables
        if self.native:
            seed = _round_seed("add", seeds, scales)

            def dense(lo, hi):
                self._rounded_dense(lo, hi, terms, 1.0, seed)

            def sparse(start, n, width, picked):
                self._rounded_rows(start, n, width, self._checked_rows(picked, n), terms, seed)
        else:

            def dense(lo, hi):
                terms.add_(buf[lo:hi], offset=self.offset + lo)

            def sparse(start, n, width, picked):
                table = buf[start : start + n * width].view(n, width)
                terms.add_rows_(table, self._checked_rows(picked, n), offset=self.offset + start)

        if rows is None or not self.tables:
            dense(0, self.numel)
            return
        if len(rows) != len(self.tables):
            raise ValueError(f"got rows for {len(rows)} tables; this buffer has {len(self.tables)}")
        for lo, hi in self._dense:
            dense(lo, hi)
        for (start, n, width), picked in zip(self.tables, rows):
            if picked is None:
                dense(start, start + n * width)
            else:
                sparse(start, n, width, picked)

    def _checked_rows(self, picked, n: int) -> torch.Tensor:
        """noise.checked_rows(picked, n), kept for the passes of a step: they all get the same row
        tensors (a tensor given here must not change while it is in use)."""
        for given, size, checked in self._rows_seen:
            if given is picked and size == n:
                return checked
        checked = noise.checked_rows(picked, n)
        self._rows_seen = [*self._rows_seen, (picked, n, checked)][-max(len(self.tables), 1) :]
        return checked

    def decay_(self, factor: float, key: Sequence[int] = ()) -> None:
        """The decayed tensors times factor. key: the seeds of the step (or round) it ends, which
        seed the stochastic rounding of weights without a float32 master."""
        if factor == 1.0:
            return
        buf = self.flat.flat
        if self.native:
            if not key:
                raise ValueError("decay without a float32 master needs the step's seeds as its key")
            seed = _round_seed("decay", list(key), [factor])
            for start, n in self._decay:
                self._rounded_dense(start, start + n, None, factor, seed)
            return
        for start, n in self._decay:
            buf[start : start + n].mul_(factor)

    def check_finite(self) -> None:
        """DivergedError when a weight is not finite after an update of finite projected gradients:
        the rate is too large for them, and the run stops before the step is logged or saved (an
        update cannot be undone exactly). One read of the buffer."""
        from hosl.optim import DivergedError, all_finite  # hosl.optim imports the config, which imports this

        if not all_finite([self.flat.flat]):
            bad = int((~self.flat.flat.isfinite()).sum())
            raise DivergedError(
                f"{bad} zeroth-order weights became non-finite in an update of finite projected gradients: the "
                "rate is too large for them; start again with a lower rate"
            )

    # -- weights without a float32 master ----------------------------------------------------------------
    def _rounded_dense(self, lo: int, hi: int, terms, factor: float, seed: int) -> None:
        buf = self.flat.flat
        for a in range(lo, hi, _ROUND_CHUNK):
            view = buf[a : min(a + _ROUND_CHUNK, hi)]
            x = view.float()
            if terms is not None:
                terms.add_(x, offset=self.offset + a)
            if factor != 1.0:
                x.mul_(factor)
            u = noise.uniform_(torch.empty_like(x), seed, offset=self.offset + a)
            view.copy_(noise.round_stochastic(x, buf.dtype, u))

    def _rounded_rows(self, start: int, n: int, width: int, picked: torch.Tensor, terms, seed: int) -> None:
        """The same on rows `picked` of a table, each element at its dense position (a row at a time:
        the noise of row r starts at r * width)."""
        buf = self.flat.flat
        table = buf[start : start + n * width].view(n, width)
        per = max(1, _ROUND_CHUNK // max(width, 1))
        for i in range(0, picked.numel(), per):
            chosen = picked[i : i + per].to(buf.device)
            x = table.index_select(0, chosen).float()
            u = torch.empty_like(x)
            for j, r in enumerate(chosen.tolist()):
                at = self.offset + start + r * width
                terms.add_(x[j], offset=at)
                noise.uniform_(u[j], seed, offset=at)
            table.index_copy_(0, chosen, noise.round_stochastic(x, buf.dtype, u))

    # -- scratch probes ------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        """Scratch probes on `model`, whose parameters this buffer holds: see _ScratchProbes."""
        if self.probes != SCRATCH:
            raise ValueError("attach is for a buffer built with probes='scratch'")
        self._scratch = _ScratchProbes(self, model)

    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float, rows: Sequence | None = None) -> Iterator[None]:
        """Within the context, the attached model's forward sees w + scale * z(seed) (on `rows` of
        the row-sparse tables, as add_ takes them), and the persistent weights stay w."""
        if self._scratch is None:
            raise RuntimeError("scratch probes need the model attached (ZOParams.attach)")
        with self._scratch.probe(seed, scale, rows):
            yield

    # -- tangents (the exact estimator) --------------------------------------------------------------
    def attach_tangents(self, model: torch.nn.Module) -> None:
        """Tangents on `model`, whose parameters this buffer holds: see _Tangents."""
        self._tangents = _Tangents(self, model)

    @contextlib.contextmanager
    def tangent(self, seed: int) -> Iterator[None]:
        """Within the context, a forward of the attached model run under forward_mode() is a
        forward-mode pass at w with tangent z(seed) on every parameter of the buffer: its output is
        a dual tensor whose tangent is J_w h . z (torch.autograd.forward_ad.unpack_dual)."""
        if self._tangents is None:
            raise RuntimeError("tangents need the model attached (ZOParams.attach_tangents)")
        with self._tangents.along(seed):
            yield

    # -- probes batched into one forward (--client-batch-probes) -------------------------------------
    def attach_batched(self, model: torch.nn.Module) -> None:
        """Batched probes on `model`, whose parameters this buffer holds: see _BatchedProbes."""
        self._batched = _BatchedProbes(self, model)

    @contextlib.contextmanager
    def batched(self, points: Sequence[tuple[int, float]]) -> Iterator[None]:
        """Within the context, a forward of the attached model over len(points) row blocks of equal
        size sees, in block j, w + scale_j * z(seed_j) for points[j] = (seed_j, scale_j): several
        probes in one forward. The weights stay w."""
        if getattr(self, "_batched", None) is None:
            raise RuntimeError("batched probes need the model attached (ZOParams.attach_batched)")
        with self._batched.at(points):
            yield


def _holders(params: ZOParams, model: torch.nn.Module, what: str):
    """(name, module, [(parameter name, parameter, start in the buffer)]) for each module of `model`
    that owns parameters of the buffer, in module order; ValueError when a parameter of the buffer
    is held by no module (it would be read outside any module's forward)."""
    buf = params.flat.flat
    base, end, size = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size(), buf.element_size()
    found, covered = [], set()
    for qual, module in model.named_modules():
        own = [
            (name, p, (p.data_ptr() - base) // size)
            for name, p in module._parameters.items()
            if p is not None and p.numel() and base <= p.data_ptr() < end
        ]
        covered.update(start for _, _, start in own)
        if own:
            found.append((qual or "the model", module, own))
    held = zip(params.flat.params, params.flat.offsets)
    missing = [tuple(p.shape) for p, start in held if p.numel() and start not in covered]
    if missing:
        raise ValueError(f"{what}: no module of the model holds the ZO parameter of shape {missing[0]}")
    return found


def _hook(module: torch.nn.Module, owner, i: int) -> None:
    """owner._enter(i) just before the module runs and owner._leave(i) just after."""
    module.register_forward_pre_hook(lambda _m, _a: owner._enter(i))
    module.register_forward_hook(lambda _m, _a, _o: owner._leave(i))


class _ScratchProbes:
    """Probes that never write into the weights that persist. During a probe forward, each module
    that owns parameters of the buffer saves them (on a row-sparse table: the step's rows) into a
    scratch copy just before it runs, adds the probe's noise in place, runs, and copies them back:
    the restore is a copy, exact in any dtype, and the extra memory is one module's weights at a
    time. The noise of each element is the one a whole-buffer pass gives it (same seed, same
    position), so w + mu z is the same value either way; -mu z is formed from w, not from w + mu z.

    A module called twice in one forward (micro-batches, a shared layer) is perturbed and restored
    on each call. Every module holding buffer weights must run in a probe forward: a parameter read
    outside its module's forward would see no noise, and the probe raises RuntimeError naming it.
    """

    def __init__(self, params: ZOParams, model: torch.nn.Module):
        self.params = params
        tables = {start: i for i, (start, _, _) in enumerate(params.tables)}
        self.owners: list[tuple[str, list[tuple[int, int, int | None]]]] = []
        for name, module, own in _holders(params, model, "scratch probes"):
            _hook(module, self, len(self.owners))
            self.owners.append((name, [(start, start + p.numel(), tables.get(start)) for _, p, start in own]))
        self.active: tuple[int, float, Sequence | None] | None = None
        self.saved: dict[int, list[list[torch.Tensor]]] = {}
        self.calls: list[int] = []

    @contextlib.contextmanager
    def probe(self, seed: int, scale: float, rows):
        if self.active is not None:
            raise RuntimeError("a scratch probe is already active")
        if rows is not None:  # checked once for the probe's every module
            rows = [None if r is None else noise.checked_rows(r, n) for r, (_, n, _) in zip(rows, self.params.tables)]
        self.terms = noise.Terms([seed], [scale], dist=self.params.dist)
        self.active, self.calls = (seed, scale, rows), [0] * len(self.owners)
        try:
            yield
        finally:
            for i, stack in self.saved.items():  # a forward that raised inside a module: put its weights back
                while stack:
                    self._restore(i, stack.pop())
            self.active = None
        unread = [name for (name, _), n in zip(self.owners, self.calls) if n == 0]
        if unread:
            raise RuntimeError(f"scratch probes: {unread[0]} holds ZO weights but did not run in the probe's forward")

    def _views(self, i: int):
        buf, rows = self.params.flat.flat, self.active[2]
        for start, end, table in self.owners[i][1]:
            view = buf[start:end]
            if table is not None and rows is not None and rows[table] is not None:
                _, n, width = self.params.tables[table]
                yield start, view.view(n, width), rows[table]
            else:
                yield start, view, None

    def _enter(self, i: int) -> None:
        if self.active is None:
            return
        offset, terms = self.params.offset, self.terms
        saved = []
        for start, view, picked in self._views(i):
            if picked is None:
                saved.append(view.clone())
                terms.add_(view, offset=offset + start)
            else:
                saved.append(view.index_select(0, picked.to(view.device)))
                terms.add_rows_(view, picked, offset=offset + start)
        self.saved.setdefault(i, []).append(saved)
        self.calls[i] += 1

    def _leave(self, i: int) -> None:
        if self.active is None:
            return
        self._restore(i, self.saved[i].pop())

    def _restore(self, i: int, saved: list[torch.Tensor]) -> None:
        for (_, view, picked), old in zip(self._views(i), saved):
            if picked is None:
                view.copy_(old)
            else:
                view.index_copy_(0, picked.to(view.device), old)


_DUAL_LEVEL = threading.Lock()


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """Where a tangent forward runs: a forward-AD dual level, with attention as SDPA's math form,
    which has a forward-mode formula (_MathAttention). torch's dual level is one per process: the
    tangent forwards of clients sharing a process (a local many-client run) take turns, each
    holding it for one forward only."""
    with _DUAL_LEVEL, fwAD.dual_level(), _ForwardMode():
        yield


_ACTIVE = threading.local()  # .tangents: the _Tangents whose probe this thread's forward is in


class _ForwardMode(TorchFunctionMode):
    """Two functions done differently in a tangent forward, in this thread only.

    F.scaled_dot_product_attention as aten's math form: the fused kernels have no forward-mode
    formula (pytorch #128971), and torch's sdpa_kernel switch is process-wide, so it would change
    the other side's attention in a local run too (and its bits).

    F.embedding on a table of the buffer: its output's tangent is the rows of z(seed) the ids look
    up, each generated at its row's noise positions, so neither a dual copy of the table nor a
    table-sized tangent is made (on a 50k-row table, 300 MiB a probe)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            tangents = getattr(_ACTIVE, "tangents", None)
            out = func(*args, **kwargs)
            return out if tangents is None else tangents.embedded(args, kwargs, out)
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        kwargs = {**dict(zip(names, args)), **kwargs}
        mask, query = kwargs.pop("attn_mask", None), kwargs.pop("query")
        if mask is not None and mask.dtype == torch.bool:  # SDPA's dispatch does this before the math form
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, -math.inf)
        return torch.ops.aten._scaled_dot_product_attention_math(query, attn_mask=mask, **kwargs)[0]


class _Tangents:
    """Forward-mode tangents that are never stored whole. During a tangent forward, each module that
    owns parameters of the buffer gets them as dual tensors just before it runs: the primal a copy of
    the parameter, the tangent z(seed) at the parameter's own noise positions (the z a probe or the
    update applies there), generated then in the parameter's dtype; after the module runs the
    parameters are put back and the copy and the tangent are dropped. The memory is one module's
    weights twice at a time. An embedding table (an nn.Embedding's weight) is not made dual: the
    lookup's output gets the looked-up rows of z as its tangent (_ForwardMode, embedded), the rows
    any update of the step touches (the others add nothing to J h z)."""

    def __init__(self, params: ZOParams, model: torch.nn.Module):
        self.params = params
        self.owners: list[tuple[torch.nn.Module, list[tuple[str, int]]]] = []
        self.tables: dict[int, tuple[int, int]] = {}  # an embedding table's data_ptr: (start, width)
        for _, module, held in _holders(params, model, "tangents"):
            own = []
            for name, p, start in held:
                if isinstance(module, torch.nn.Embedding) and name == "weight":
                    self.tables[p.data_ptr()] = (start, p.shape[1])
                else:
                    own.append((name, start))
            if own:
                _hook(module, self, len(self.owners))
                self.owners.append((module, own))
        self.seed: int | None = None
        self.saved: dict[int, list[list[torch.nn.Parameter]]] = {}

    @contextlib.contextmanager
    def along(self, seed: int):
        if self.seed is not None:
            raise RuntimeError("a tangent forward is already active")
        self.seed, _ACTIVE.tangents = seed, self
        try:
            yield
        finally:
            for i, stack in self.saved.items():  # a forward that raised inside a module
                while stack:
                    self._put_back(i, stack.pop())
            self.seed, _ACTIVE.tangents = None, None

    def embedded(self, args, kwargs, out: torch.Tensor) -> torch.Tensor:
        """The output of F.embedding(ids, weight, ...) made dual when the weight is a table of the
        buffer: its tangent is z(seed) at each looked-up row's positions."""
        ids = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        if weight.data_ptr() not in self.tables:
            return out
        start, width = self.tables[weight.data_ptr()]
        rows, where = torch.unique(ids, return_inverse=True)
        z = torch.empty(len(rows), width, device=out.device)
        for i, r in enumerate(rows.tolist()):
            z[i] = self.params.directions(width, self.seed, start + r * width, out.device)
        return fwAD.make_dual(out, z[where].to(out.dtype))

    def _enter(self, i: int) -> None:
        if self.seed is None:
            return
        module, own = self.owners[i]
        saved = []
        for name, start in own:
            p = module._parameters[name]
            z = self.params.directions(p.numel(), self.seed, start, p.device)
            saved.append(p)
            # The primal is a copy: a view into the buffer would make forward AD zero a tangent the
            # size of the whole buffer for every parameter (dual tensors keep a view's layout).
            module._parameters[name] = fwAD.make_dual(p.detach().clone(), z.view(p.shape).to(p.dtype))
        self.saved.setdefault(i, []).append(saved)

    def _leave(self, i: int) -> None:
        if self.seed is None:
            return
        self._put_back(i, self.saved[i].pop())

    def _put_back(self, i: int, saved: list[torch.nn.Parameter]) -> None:
        module, own = self.owners[i]
        for (name, _), p in zip(own, saved):
            module._parameters[name] = p


class _BatchedProbes:
    """Several probes in one forward over their stacked row blocks. Every parameter of the buffer
    must be held by an nn.Linear (a client LoRA's adapters, or linear layers alone). During a batched
    forward each such module computes its output block by block with its probe's weights: block j
    gets x_j (W + s_j z_j)^T (+ b + s_j z_j), z_j = z(seed_j) at the parameter's own noise positions
    (the z the probe's pass would add there), formed in float32 and dropped after the module runs.
    The rest of the model runs once over all the blocks' rows. The weights are never written."""

    def __init__(self, params: ZOParams, model: torch.nn.Module):
        self.params = params
        self.points: list[tuple[int, float]] | None = None
        self.owners: list[tuple[torch.nn.Module, dict[str, int]]] = []
        for name, module, held in _holders(params, model, "batched probes"):
            if type(module) is not torch.nn.Linear:
                raise ValueError(
                    f"--client-batch-probes needs every ZO weight in a linear layer (a client LoRA: --client-lora-r); "
                    f"{name} is a {type(module).__name__}"
                )
            self.owners.append((module, {n: start for n, _, start in held}))

    @contextlib.contextmanager
    def at(self, points: Sequence[tuple[int, float]]):
        """Within the context each owner's forward is the block-by-block one (an instance attribute
        over nn.Linear.forward, removed after)."""
        if self.points is not None:
            raise RuntimeError("a batched forward is already active")
        self.points = list(points)
        for i, (module, _) in enumerate(self.owners):
            module.forward = functools.partial(self._forward, i)
        try:
            yield
        finally:
            for module, _ in self.owners:
                del module.forward
            self.points = None

    def _z(self, p: torch.Tensor, seed: int, start: int) -> torch.Tensor:
        return self.params.directions(p.numel(), seed, start, p.device).view(p.shape)

    def _forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        module, own = self.owners[i]
        blocks = len(self.points)
        if x.shape[0] % blocks:
            raise RuntimeError(f"a batched forward of {x.shape[0]} rows is not {blocks} blocks of equal size")
        parts = []
        for (seed, scale), xb in zip(self.points, x.chunk(blocks)):
            weight, bias = module.weight, module.bias
            if "weight" in own:
                weight = (weight.float() + scale * self._z(weight, seed, own["weight"])).to(weight.dtype)
            if bias is not None and "bias" in own:
                bias = (bias.float() + scale * self._z(bias, seed, own["bias"])).to(bias.dtype)
            parts.append(torch.nn.functional.linear(xb, weight, bias))
        return torch.cat(parts)


# Elements per float32 chunk of a stochastically rounded pass: its transient memory is a few of them.
_ROUND_CHUNK = 1 << 18


def _round_seed(kind: str, seeds: Sequence[int], scales: Sequence[float]) -> int:
    """The rounding seed of a pass: a hash of what the pass is (its kind, seeds and scales), so the
    same pass rounds the same way on every machine and in replay, and no two steps share one."""
    key = f"hosl:round:{kind}:" + ",".join(map(str, seeds)) + ":" + ",".join(map(float.hex, map(float, scales)))
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def encode_rows(rows: Sequence) -> list[list[int] | None]:
    """Sorted distinct rows of each table as [first, gap, gap, ...] (short in JSON); None stays None
    (a table dense that step)."""
    out: list[list[int] | None] = []
    for picked in rows:
        values = None if picked is None else torch.unique(picked).tolist()
        out.append(None if values is None else [b - a for a, b in zip([0, *values], values)])
    return out


def decode_rows(encoded: Sequence) -> list[torch.Tensor | None]:
    return [None if gaps is None else torch.tensor(gaps, dtype=torch.int64).cumsum(0) for gaps in encoded]


# mu's sane range, relative to the RMS of the weights it perturbs (see check_mu): the floor is per
# dtype of the weights the probe writes (weights without a float32 master are perturbed in their own):
# in float32 well above an ulp, in bfloat16 and float16 half an ulp of the RMS, below which a probe
# rounds most weights back to themselves.
MU_MAX_RATIO = 1.0
MU_MIN_RATIO = 2.0**-20
MU_MIN_RATIOS = {torch.float32: MU_MIN_RATIO, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check_mu(params: ZOParams, mu: float, side: str = "client") -> None:
    """ValueError when mu is out of the range a probe can work in for these weights: above their RMS
    a probe w + mu z swamps w, and w + mu z - mu z rounds away w's low bits in float32 (a skipped
    step could not restore the weights: at mu 1e10 they came back as exact zeros); below 2^-20 of
    it, w + mu z rounds to w in float32 and every probe measures nothing."""
    buf = params.flat.flat
    if buf.numel() == 0:
        return
    # A chunk at a time: no float32 copy of a low-precision buffer (nor any copy of a float32 one).
    chunks = (buf[a : a + _ROUND_CHUNK].float() for a in range(0, buf.numel(), _ROUND_CHUNK))
    rms = math.sqrt(sum(float(torch.linalg.vector_norm(c)) ** 2 for c in chunks) / buf.numel())
    floor, dtype = MU_MIN_RATIOS[buf.dtype], str(buf.dtype).removeprefix("torch.")
    if rms == 0.0:
        return  # all-zero weights (a fresh adapter): no scale to compare with
    if mu > MU_MAX_RATIO * rms:
        raise ValueError(
            f"--mu {mu:g} is larger than the {side} weights' RMS ({rms:.3g}): a probe would swamp the weights, "
            f"and the float32 round trip w + mu z - mu z would not give them back; use --mu <= {rms:.3g}"
        )
    if mu < floor * rms:
        raise ValueError(
            f"--mu {mu:g} is below 2^{math.log2(floor):.0f} of the {side} weights' RMS ({rms:.3g}): w + mu z "
            f"rounds to w in {dtype} and the probes measure nothing; use --mu >= {floor * rms:.3g}"
        )
