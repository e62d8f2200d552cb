"""The zeroth-order estimators as data, and the math and schedule of a ZO step: the probe seeds, the
noise passes between a step's forwards, each probe's projected gradient g_q and the pass that ends
the step. The buffer these passes are applied to is hosl.zo.ZOParams.

One ZO-SGD step with Q probes z_1..z_Q (each a seed; z is the seeded Gaussian of hosl.noise):

    central:            g_q = (L(w + mu z_q) - L(w - mu z_q)) / (2 mu)
    forward:            g_q = (L(w + mu z_q) - L(w)) / mu            (L(w): the clean forward's loss)
    cut-grad:           g_q = < dL/dh, (h(w + mu z_q) - h(w - mu z_q)) / (2 mu) >
    cut-grad-one-sided: g_q = < dL/dh, (h(w + mu z_q) - h(w)) / mu >  (h(w): the clean forward's)
    cut-grad-jvp:       g_q = < dL/dh, J_w h . z_q >                 (forward-mode AD at w, no mu)
    update:             w <- (w - lr * (1/Q) * sum_q g_q z_q) * (1 - lr * weight_decay on decayed tensors)

h is the client's output at the cut and dL/dh the server's gradient there at the clean h (its
backward yields it): the cut-grad family forms g from the client's own forwards, with no server
round trip per probe ("local" estimators; they need a first-order server).

An estimator is one record of ESTIMATORS: the signs of each probe's forwards, what a +mu forward is
differenced with (its own -mu forward, or the clean one), whether it is local, whether it is exact
(forward-mode AD: no perturbation at all) and its default Q. Everything else (the step plan, the
noise schedule, g, the end pass) is derived from those fields, so a new estimator is one entry here
and, where its g is formed differently, one formula.

Passes (each one hosl.noise.add_ over the buffer) for in-place probes: the first probe forward is
at +mu z_1; each later forward moves from the previous point in one pass (restoring the previous
probe and applying the next one together); the step ends with one pass that undoes the last probe
and applies the update (Q terms). central and cut-grad: 2Q + 1 passes a step; forward and
cut-grad-one-sided: Q + 1; cut-grad-jvp: the update alone. 2Q passes would need the update
folded into the next step's first +mu, which would leave the weights perturbed between steps (for
evaluation, checkpoints and replay) to save one pass in 2Q + 1; hosl keeps steps self-contained.

The schedule is a pure function of (seeds, mu, estimator), and the update of (seeds, mu, lr, weight
decay, the g_q); replaying the same passes from the same initial weights gives the same bits
(hosl.replay). The +mu/-mu round trip is not exact in float32, and replay repeats it too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

CLEAN = (0, 0)  # the (probe, sign) key of the step's clean forward at w


@dataclass(frozen=True)
class Estimator:
    name: str
    signs: tuple[int, ...]  # each probe's forwards in order: +1 at w + mu z, -1 at w - mu z
    base: int  # what a +mu forward is differenced with: -1 (the probe's -mu forward) or 0 (the clean one)
    local: bool  # g from activations and the server's dL/dh at the cut, not from losses
    exact: bool  # g by forward-mode AD at w: the probe forwards perturb nothing
    q: int  # the default probes per step
    blurb: str

    @property
    def needs_clean(self) -> bool:
        """Whether a step needs the forward at w: a local estimator projects on its dL/dh, and a
        one-sided difference subtracts it."""
        return self.local or self.base == 0

    @property
    def keeps_clean(self) -> bool:
        """Whether the client keeps the clean activation through the step: a local one-sided
        difference subtracts it from every probe's."""
        return self.local and self.base == 0 and not self.exact

    @property
    def span(self) -> int:
        """The distance, in mu, between the two points of a difference: 2 (central) or 1 (one-sided)."""
        return 1 - self.base

    def low(self, probe: int) -> tuple[int, int]:
        """The key of the forward subtracted from probe `probe`'s +mu forward."""
        return (probe, -1) if self.base == -1 else CLEAN

    def from_losses(self, losses: dict[tuple[int, int], float], q: int, mu: float) -> list[float]:
        """g_q of a loss-difference estimator, from the losses of the step's forwards by key (the
        clean one at CLEAN)."""
        if self.local:
            raise ValueError(f"{self.name}'s projected gradients come from activations, not losses")
        return [(losses[(p, +1)] - losses[self.low(p)]) / (self.span * mu) for p in range(q)]

    def difference(self, kept: dict[tuple[int, int], torch.Tensor], probe: int) -> torch.Tensor | None:
        """A local estimator's direction for probe `probe` once its forwards are all in `kept` (by
        key; None before): h(+mu) - h(low) in float32, or the JVP's tangent as it is. The probe's
        own activations are taken out of `kept` (a float32 h+ is overwritten with the difference, so
        no third activation is allocated); the clean one stays for the next probe."""
        high = (probe, +1)
        if self.exact:
            return kept.pop(high)
        low = self.low(probe)
        if high not in kept or low not in kept:
            return None
        h_plus, h_low = kept.pop(high), kept[low] if low == CLEAN else kept.pop(low)
        return h_plus.sub_(h_low) if h_plus.dtype == torch.float32 else h_plus.float() - h_low.float()

    def project(self, grad_h: torch.Tensor, direction: torch.Tensor, mu: float) -> float:
        """A local estimator's g_q = < dL/dh, direction > over the difference's span (an exact
        tangent is the derivative itself), summed in float32."""
        dot = float(torch.dot(grad_h.reshape(-1).float(), direction.reshape(-1).float()))
        return dot if self.exact else dot / (self.span * mu)


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(
            "central", (+1, -1), -1, local=False, exact=False, q=1, blurb="(L(w+mu z) - L(w-mu z)) / 2mu, 2Q uploads"
        ),
        Estimator("forward", (+1,), 0, local=False, exact=False, q=1, blurb="(L(w+mu z) - L(w)) / mu, Q+1 uploads"),
        Estimator(
            "cut-grad", (+1, -1), -1, local=True, exact=False, q=8,
            blurb="<dL/dh, (h(w+mu z) - h(w-mu z)) / 2mu> from the server's dL/dh at the clean h: 1 upload, 2Q "
            "client probe forwards",
        ),
        Estimator(
            "cut-grad-one-sided", (+1,), 0, local=True, exact=False, q=8,
            blurb="<dL/dh, (h(w+mu z) - h(w)) / mu>: 1 upload, Q client probe forwards",
        ),
        Estimator(
            "cut-grad-jvp", (+1,), 0, local=True, exact=True, q=8,
            blurb="<dL/dh, J h z>, the directional derivative by forward-mode AD (no mu): 1 upload, Q client "
            "forward-mode passes",
        ),
    )
}  # fmt: skip


def estimator_of(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"--zo-estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}") from None


def probe_seed(run_seed: int, step: int, probe: int, client: int = 0) -> int:
    """The noise seed of probe `probe` at step `step` (of client `client` in a many-client run): a
    63-bit hash, the same on every machine. Client 0's seeds are a one-client run's."""
    key = f"hosl:{run_seed}:{step}:{probe}" + (f":{client}" if client else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_seeds(run_seed: int, step: int, q: int, client: int = 0) -> list[int]:
    return [probe_seed(run_seed, step, p, client) for p in range(q)]


@dataclass(frozen=True)
class Probe:
    """One probe forward of the schedule: the pass to apply before it, and which probe and sign it is."""

    seeds: tuple[int, ...]
    scales: tuple[float, ...]
    probe: int
    sign: int  # +1: w + mu z, -1: w - mu z


def schedule(seeds: Sequence[int], mu: float, estimator: Estimator) -> Iterator[Probe]:
    """The probe forwards of one step in order, each with the in-place pass that moves the weights
    there from the previous point (w before the first). An exact estimator's forwards are all at w."""
    at: tuple[int, int] | None = None  # (probe, sign) the weights sit at
    for q, s in enumerate(seeds):
        for sign in estimator.signs:
            if estimator.exact:
                yield Probe((), (), q, sign)
            elif at is None:
                yield Probe((s,), (sign * mu,), q, sign)
            elif at[0] == q:  # the same probe, the other side
                yield Probe((s,), ((sign - at[1]) * mu,), q, sign)
            else:  # undo the previous probe and apply this one in one pass
                yield Probe((seeds[at[0]], s), (-at[1] * mu, sign * mu), q, sign)
            at = (q, sign)


def end_terms(
    seeds: Sequence[int],
    mu: float,
    estimator: Estimator,
    lr: float,
    grads: Sequence[float] | None,
    restore: bool = True,
    share: int = 1,
) -> tuple[list[int], list[float]]:
    """The (seeds, scales) of the pass that ends a step: undo the last in-place probe (unless
    `restore` is False: scratch probes and exact estimators leave nothing to undo) and, unless grads
    is None (a skipped step), apply -lr/(share Q) * g_q z_q for every probe (share: the clients whose
    probes make up one update, hosl.clients). Terms of the same seed are merged."""
    terms: dict[int, float] = {}
    if restore and not estimator.exact:
        terms[seeds[-1]] = -estimator.signs[-1] * mu
    if grads is not None:
        for s, g in zip(seeds, grads):
            terms[s] = terms.get(s, 0.0) - lr * g / (len(seeds) * share)
    return list(terms), list(terms.values())


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
