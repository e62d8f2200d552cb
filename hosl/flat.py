"""FlatParams: a client's trainable weights as ONE flat buffer (float32 unless master=False), so
that one noise pass (hosl.noise.add_ on `.flat`) perturbs, restores or updates all of them in a
single launch.

Each parameter keeps its identity (the same nn.Parameter object, requires_grad and all) but its
data becomes a view into the buffer. Noise position j of the buffer is element j of `.flat`, so a
parameter's noise is fixed by the seed and its place in the buffer.

Parameters that already lie one after the other in one float32 storage, in order and from its
start (hosl.load_client loads a side's weights so), are adopted as they are: no copy, so packing
never holds a weight twice.

Two parameters that are the same tensor (tied weights, listed twice or held by two modules) are
stored once and stay tied. A bfloat16 or float16 parameter becomes a float32 master copy (its
value is unchanged): a zeroth-order update (about lr * projected gradient, often ~1e-6 relative)
is far below a bfloat16 ulp and would round away under round-to-nearest, and a +mu / -mu
perturbation applied in place in low precision does not undo exactly. Run the forward of such a
model under `torch.autocast(device_type, dtype=flat.compute_dtype)` to keep low-precision compute.

master=False keeps parameters of one low-precision dtype in that dtype (half the memory): the
buffer is then bfloat16 or float16, and whoever writes into it must round stochastically and must
not rely on +mu / -mu undoing (hosl.zo: scratch probes and a stochastically rounded update).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class FlatParams:
    """Packs parameters into one contiguous tensor `.flat` (float32, or with master=False the
    parameters' own dtype) and makes each a view of it.

    Attributes:
        flat: the buffer, 1-D and contiguous.
        params: the distinct parameters, in buffer order.
        offsets: start of each parameter of `params` in `flat`.
        dtypes: each parameter's dtype before packing.
        compute_dtype: the lowest precision among those dtypes (float32 if all were float32).
    """

    def __init__(self, params: Iterable[torch.Tensor], master: bool = True):
        self.params: list[torch.Tensor] = []
        self.dtypes: list[torch.dtype] = []
        aliases: list[list[torch.Tensor]] = []
        keys: dict[tuple, int] = {}
        seen: set[int] = set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"FlatParams takes tensors (parameters); got {type(p).__name__}")
            if p.dtype not in _FLOATS:
                raise TypeError(f"FlatParams packs float32, bfloat16 or float16 parameters; got {p.dtype}")
            # The same storage seen through another Parameter object is a tie, not a second weight.
            key = (p.device, p.data_ptr(), p.dtype, tuple(p.shape), p.stride())
            if id(p) in seen:
                continue
            seen.add(id(p))
            if key in keys and p.numel() > 0:
                aliases[keys[key]].append(p)
                continue
            keys[key] = len(self.params)
            self.params.append(p)
            self.dtypes.append(p.dtype)
            aliases.append([p])
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"FlatParams needs all parameters on one device; got {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        dtype = torch.float32
        if not master and self.dtypes:
            if len(set(self.dtypes)) > 1:
                names = ", ".join(sorted({str(d).removeprefix("torch.") for d in self.dtypes}))
                raise ValueError(f"FlatParams(master=False) needs parameters of one dtype; got {names}")
            dtype = self.dtypes[0]

        self.offsets: list[int] = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        self.flat = _packed(self.params, self.offsets, total, dtype)
        if self.flat is None:
            self._pack(aliases, total, device, dtype)
        low = [d for d in self.dtypes if d != torch.float32]
        self.compute_dtype = torch.bfloat16 if torch.bfloat16 in low else (low[0] if low else torch.float32)

    def _pack(self, aliases, total, device, dtype) -> None:
        self.flat = torch.empty(total, dtype=dtype, device=device)
        with torch.no_grad():
            for p, start, group in zip(self.params, self.offsets, aliases):
                view = self.flat[start : start + p.numel()].view(p.shape)
                view.copy_(p.detach())
                for q in group:
                    q.data = view

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def __len__(self) -> int:
        return self.flat.numel()

    def segments(self) -> Iterable[tuple[torch.Tensor, int, int]]:
        """(parameter, start, end) for each distinct parameter, in buffer order."""
        for p, start in zip(self.params, self.offsets):
            yield p, start, start + p.numel()

    def __repr__(self) -> str:
        dtype = str(self.flat.dtype).removeprefix("torch.")
        return f"FlatParams({len(self.params)} tensors, {self.numel} {dtype} elements on {self.flat.device})"


def _packed(params, offsets, total, dtype=torch.float32):
    """The buffer the parameters already are, when they are contiguous views of `dtype` lying one
    after the other, in order, in one storage (as hosl.load_client lays them out; the trained ones
    may be a run of it, such as the client's last blocks under --client-train-blocks): adopted as
    `.flat`, a view of that run, with no copy. None otherwise."""
    if not params or any(p.dtype != dtype or not p.is_contiguous() for p in params):
        return None
    storage, base = params[0].untyped_storage(), params[0].storage_offset()
    for p, start in zip(params, offsets):
        if p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != base + start:
            return None
    if storage.nbytes() < (base + total) * params[0].element_size():
        return None
    return params[0].detach().new_empty(0).set_(storage, base, (total,), (1,))
