"""Zeroth-order (ZO) steps over a flat parameter buffer: the seeds, the perturb/restore schedule and
the update, all as hosl.noise.add_ passes, so the noise is regenerated and never stored.

One ZO-SGD step with Q probes z_1..z_Q (each a seed; z is the seeded Gaussian of hosl.noise):

    central (default):  g_q = (L(w + mu z_q) - L(w - mu z_q)) / (2 mu)
    forward:            g_q = (L(w + mu z_q) - L(w)) / mu            (L(w) is the clean forward)
    update:             w <- (w - lr * (1/Q) * sum_q g_q z_q) * (1 - lr * weight_decay on decayed tensors)

Passes (each one hosl.noise.add_ over the whole buffer), central: +mu z_1; flip to -mu z_1; restore
z_1 and apply +mu z_2 in one pass; ... ; flip z_Q; then restore z_Q and the update in one pass with
Q terms: 2Q+1 passes a step. forward: Q+1 passes. DESIGN.md counts 2Q: that needs the update folded
into the next step's first +mu, which would leave the weights perturbed between steps (for
evaluation, checkpoints and replay) to save one pass in 2Q+1; hosl keeps steps self-contained.

The schedule is a pure function of (seeds, mu, estimator), and the update of (seeds, mu, lr,
weight decay, the g_q); replaying the same passes from the same initial weights gives the same
bits (hosl.replay). The +mu/-mu round trip is not exact in float32, and replay repeats it too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from hosl import noise
from hosl.flat import FlatParams

ESTIMATORS = ("central", "forward")


def probe_seed(run_seed: int, step: int, probe: int) -> int:
    """The noise seed of probe `probe` at step `step`: a 63-bit hash, the same on every machine."""
    digest = hashlib.blake2b(f"hosl:{run_seed}:{step}:{probe}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_seeds(run_seed: int, step: int, q: int) -> list[int]:
    return [probe_seed(run_seed, step, p) for p in range(q)]


@dataclass(frozen=True)
class Probe:
    """One forward of the schedule: the pass to apply before it, and which probe and sign it is."""

    seeds: tuple[int, ...]
    scales: tuple[float, ...]
    probe: int
    sign: int  # +1: w + mu z, -1: w - mu z


def schedule(seeds: Sequence[int], mu: float, estimator: str) -> Iterator[Probe]:
    """The perturbation passes of one step, one per probe forward, in order."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    for q, s in enumerate(seeds):
        if q == 0:
            yield Probe((s,), (mu,), q, +1)
        elif estimator == "central":  # at w - mu z_{q-1}: restore it and go to w + mu z_q in one pass
            yield Probe((seeds[q - 1], s), (mu, mu), q, +1)
        else:  # at w + mu z_{q-1}
            yield Probe((seeds[q - 1], s), (-mu, mu), q, +1)
        if estimator == "central":
            yield Probe((s,), (-2 * mu,), q, -1)


def projected_gradients(
    losses: dict[tuple[int, int], float], q: int, mu: float, estimator: str, clean: float | None = None
) -> list[float]:
    """g_q from the losses of the schedule's forwards (keyed by (probe, sign)) and, for the forward
    estimator, the clean loss."""
    if estimator == "central":
        return [(losses[(p, +1)] - losses[(p, -1)]) / (2 * mu) for p in range(q)]
    if clean is None:
        raise ValueError("the forward estimator needs the clean loss")
    return [(losses[(p, +1)] - clean) / mu for p in range(q)]


def final_pass(
    seeds: Sequence[int], mu: float, estimator: str, lr: float, grads: Sequence[float] | None
) -> tuple[list[int], list[float]]:
    """The pass that ends a step: undo the last perturbation and, unless grads is None (a skipped
    step), apply -lr/Q * g_q z_q for every probe. Terms of the same seed are merged."""
    last = seeds[-1]
    terms = {last: mu if estimator == "central" else -mu}
    if grads is not None:
        for s, g in zip(seeds, grads):
            terms[s] = terms.get(s, 0.0) - lr * g / len(seeds)
    return list(terms), list(terms.values())


def conclude_step(params, seeds, losses, clean, mu, estimator, lr, weight_decay) -> tuple[list[float], bool]:
    """End a step from its losses: the projected gradients, whether the step is skipped (any loss or
    g not finite: the probes are still undone), and the final pass on `params`."""
    grads = projected_gradients(losses, len(seeds), mu, estimator, clean)
    skipped = not finite([*losses.values(), *grads, *(() if clean is None else (clean,))])
    params.end_step(seeds, mu, estimator, lr, weight_decay, None if skipped else grads)
    return grads, skipped


def decayed(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices (linear and embedding weights), not to biases and norms."""
    return param.dim() >= 2


class ZOParams:
    """A set of parameters trained by ZO: one FlatParams buffer at a place in the noise stream.

    offset: where this buffer's noise starts. A split model trained by ZO on both sides (MeZO over
    the split) gives the server offset = the client's element count, so the pair sees the noise the
    unsplit model would.
    """

    def __init__(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], offset: int = 0):
        self.names = [n for n, _ in named_params]
        self.flat = FlatParams([p for _, p in named_params])
        self.offset = offset
        by_id = {id(p): n for n, p in named_params}
        self._decay = [
            (start, p.numel())
            for p, start in zip(self.flat.params, self.flat.offsets)
            if decayed(by_id.get(id(p), ""), p)
        ]

    @property
    def numel(self) -> int:
        return self.flat.flat.numel()

    def add_(self, seeds: Sequence[int], scales: Sequence[float]) -> None:
        noise.add_(self.flat.flat, list(seeds), list(scales), offset=self.offset)

    def decay_(self, factor: float) -> None:
        if factor == 1.0:
            return
        buf = self.flat.flat
        for start, n in self._decay:
            buf[start : start + n].mul_(factor)

    def end_step(self, seeds, mu, estimator, lr, weight_decay, grads) -> None:
        """The final pass, then weight decay (skipped steps get neither update nor decay)."""
        self.add_(*final_pass(seeds, mu, estimator, lr, grads))
        if grads is not None and weight_decay:
            self.decay_(1.0 - lr * weight_decay)


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
