"""What a method trains, with what, and the plan of one of its steps: the one table of methods and
the one statement of the protocol that the client, the server, the full-model methods, replay and
the benchmarks read.

A method is data: a pair of side updates (ZO or FO, each with the rate it reads) and whether the
model is split. hosl = (ZO, FO), fo = (FO, FO), zo = (ZO, ZO); fo-full and zo-full train the
unsplit model with one update. No code outside this module compares a method's name.

A step plan is derived once from the config. It lists the client's forwards of a step in order,
each with its probe and sign ((0, 0): the clean forward at w), whether it crosses the cut, whether
the server takes its gradient on it, and what the server answers (a LOSS, or a GRAD: dL/dh and the
loss). The noise pass before each probe forward comes from `StepPlan.probes`, the only loop over a
step's probes.

    hosl  central: clean (server gradient, LOSS), then (q, +1), (q, -1) for q = 1..Q     1 + 2Q uploads
          --server-grad probe: no clean forward; the server's gradient on (0, +1)        2Q
          forward: clean (server gradient), then (q, +1)                                 1 + Q
          cut-grad: clean (server gradient, GRAD); the 2Q probes stay on the client      1
          cut-grad-one-sided, cut-grad-jvp: the same; Q probes stay on the client        1
    zo    central: (q, +1), (q, -1); forward: clean, then (q, +1); the server's ZO side
          applies the same passes to its own weights                                     2Q or 1 + Q
    fo    one forward with autograd kept; the server answers GRAD                        1

The full-model methods run the forwards of their split counterpart (zo-full: zo's, fo-full: fo's)
on the whole model, with nothing crossing a cut.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hosl import estimators
from hosl.estimators import CLEAN, Estimator, estimator_of

if TYPE_CHECKING:
    from hosl.zo import ZOParams

ZO, FO = "zo", "fo"


@dataclass(frozen=True)
class Update:
    """How one side (or the unsplit model) trains: ZO-SGD, or the first-order optimiser."""

    order: str  # ZO or FO
    lr: str  # the config field holding its rate: "client_lr" or "server_lr"


@dataclass(frozen=True)
class Method:
    name: str
    split: bool
    client: Update  # the unsplit model's update for the full methods
    server: Update | None  # None: not split
    blurb: str
    # What an unset --zo-estimator, --client-lr, --zo-step and --zo-noise become (an unset --q: the
    # estimator's own Q).
    zo_estimator: str = "central"
    client_lr: float = 1e-4
    zo_step: str = "sgd"
    zo_noise: str = "gaussian"

    @property
    def orders(self) -> set[str]:
        return {u.order for u in (self.client, self.server) if u is not None}

    @property
    def rates(self) -> set[str]:
        return {u.lr for u in (self.client, self.server) if u is not None}

    @property
    def hybrid(self) -> bool:
        """A ZO client and an FO server: the server's gradient at the cut is there to use."""
        return self.split and self.client.order == ZO and self.server.order == FO


# hosl's defaults: its ZO client probes on its own (cut-grad-one-sided), so 8 probes cost it 8 client
# forwards beside the clean one and no server work; a loss-difference estimator pays a server forward
# per probe and gets one probe. Its step is normalized by the rms of the step's g, so --client-lr is
# the step's size on any model: ZO-SGD at 1e-2 (the default before) diverged on SmolLM2-135M, whose g
# are 30x the built-in model's, and needed a hand-found 6e-5 there; the normalized 5e-3 comes within 3
# points of that rate's accuracy on SmolLM2 at k = 27 with no flag (0.693 against 0.723, 3 seeds) and
# trains the built-in model too
# (benchmarks/bench_client.py; docs/training.md: "Learning rates", docs/results.md: "Does the client
# learn?"). Its directions are Rademacher: a noise pass of +-1 directions is 2.8x-8x faster than a
# Gaussian one, whose Box-Muller made the noise a third of a SmolLM2 client's step, and the client
# learns as much (benchmarks/README.md: "Rademacher directions: the noise at memory's pace").
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "hosl",
            True,
            Update(ZO, "client_lr"),
            Update(FO, "server_lr"),
            "ZO client, FO server (the paper)",
            zo_estimator="cut-grad-one-sided",
            client_lr=5e-3,
            zo_step="normalized",
            zo_noise="rademacher",
        ),
        Method("fo", True, Update(FO, "client_lr"), Update(FO, "server_lr"), "FO on both sides (split learning)"),
        Method("zo", True, Update(ZO, "client_lr"), Update(ZO, "client_lr"), "ZO on both sides, shared seeds"),
        Method("fo-full", False, Update(FO, "server_lr"), None, "the unsplit model, first order"),
        Method("zo-full", False, Update(ZO, "client_lr"), None, "the unsplit model, MeZO"),
    )
}
SPLIT_METHODS = tuple(name for name, m in METHODS.items() if m.split)


def method_of(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {name!r}") from None


LOSS = "loss"
GRAD = "grad"


@dataclass(frozen=True)
class Forward:
    """One forward of the client (or of the unsplit model) in a step."""

    probe: int
    sign: int  # 0: the clean forward at w; +1: w + mu z_probe; -1: w - mu z_probe
    upload: bool  # crosses the cut
    server_grad: bool  # the server backprops on it (the FO server's step uses this gradient)
    answer: str | None  # LOSS or GRAD (None: not uploaded)

    @property
    def key(self) -> tuple[int, int]:
        return (self.probe, self.sign)


@dataclass(frozen=True)
class StepPlan:
    method: Method
    estimator: Estimator | None  # None: no ZO side
    q: int
    mu: float
    seed: int
    forwards: tuple[Forward, ...]
    normalized: bool = False  # --zo-step normalized: end divides the rate by the step's rms(g)

    @classmethod
    def of(cls, cfg) -> StepPlan:
        method = method_of(cfg.method)
        if ZO not in method.orders:
            fo = Forward(0, 0, upload=method.split, server_grad=method.split, answer=GRAD if method.split else None)
            return cls(method, None, cfg.q, cfg.mu, cfg.seed, (fo,))
        hybrid, split, est = method.hybrid, method.split, estimator_of(cfg.zo_estimator)
        clean_grad = hybrid and (est.local or cfg.server_grad == "clean")
        forwards: list[Forward] = []
        if est.needs_clean or clean_grad:
            forwards.append(Forward(*CLEAN, split, clean_grad, (GRAD if est.local else LOSS) if split else None))
        for p in range(cfg.q):
            for sign in est.signs:
                grad = hybrid and not clean_grad and (p, sign) == (0, +1)  # --server-grad probe
                up = split and not est.local
                forwards.append(Forward(p, sign, up, grad, LOSS if up else None))
        return cls(method, est, cfg.q, cfg.mu, cfg.seed, tuple(forwards), cfg.zo_step == "normalized")

    # -- the shape of a step ---------------------------------------------------------------------
    @property
    def clean(self) -> Forward | None:
        """The step's forward at w when it has one (it comes first)."""
        return self.forwards[0] if self.forwards[0].sign == 0 else None

    @property
    def uploads(self) -> tuple[Forward, ...]:
        return tuple(f for f in self.forwards if f.upload)

    @property
    def answers_with_grad(self) -> bool:
        """Whether some answer of a step is a GRAD frame (its slot holds an activation's size)."""
        return any(f.answer == GRAD for f in self.forwards)

    def describe(self) -> list[list]:
        """The uploads as plain data, for the HELLO check: both sides must plan the same step."""
        return [[f.probe, f.sign, f.server_grad, f.answer] for f in self.uploads]

    # -- the ZO side of a step ---------------------------------------------------------------------
    def seeds(self, step: int, client: int = 0) -> list[int]:
        """The noise seeds of a step's probes; each client of a many-client run (hosl.clients) has its own."""
        return estimators.step_seeds(self.seed, step, self.q, client)

    def probes(
        self, params: ZOParams | None, step: int, rows: Sequence | None = None, client: int = 0
    ) -> Iterator[Forward]:
        """The step's probe forwards in order, each yielded after its noise pass has been applied to
        `params` (None: a side that follows the plan without ZO weights, such as an FO server). After
        the last one the weights sit at its probe point; `end` restores them and updates. With
        scratch probes (zo.PROBE_WRITES) each forward is yielded inside the probe's context and the
        weights stay w; an exact estimator's forwards are yielded inside the probe's tangent context
        (ZOParams.tangent), the weights untouched. Run the generator to its end (a for loop does) to
        leave the last one."""
        seeds = self.seeds(step, client)
        passes = estimators.schedule(seeds, self.mu, self.estimator)
        for forward, noise_pass in zip((f for f in self.forwards if f.sign != 0), passes, strict=True):
            if (noise_pass.probe, noise_pass.sign) != forward.key:
                raise AssertionError(f"the plan and the noise schedule disagree at {forward.key}")
            if params is None:
                yield forward
            elif self.estimator.exact:
                with params.tangent(seeds[forward.probe]):
                    yield forward
            elif not params.in_place:
                with params.perturbed(seeds[forward.probe], forward.sign * self.mu, rows):
                    yield forward
            else:
                params.add_(noise_pass.seeds, noise_pass.scales, rows=rows)
                yield forward

    def grads(self, losses: dict[tuple[int, int], float]) -> list[float]:
        """The projected gradients of a loss-difference estimator from the step's losses by key."""
        return self.estimator.from_losses(losses, self.q, self.mu)

    def end(self, params: ZOParams, step: int, updates, lr: float, weight_decay: float, extra=()) -> bool:
        """The one way a ZO step (or a round of many clients, hosl.clients) ends on `params`.

        updates: (client, g or None, rows) for each client whose probes make up the update (one for a
        one-client step), each applied as one pass scaled by 1 / (clients * Q) on its rows; the pass
        of an in-place client also undoes its last probe. The step is skipped (the probes still
        undone, no update and no decay) when any g or any value in `extra` is not finite, or a g is
        None. Then weight decay once, keyed by the step's client-0 seeds, and the finite check.
        A normalized plan moves the probes by lr / rms(g), the rms over every g of the update (a step
        whose g are all 0 moves nothing); the decay stays 1 - lr * weight_decay.
        Returns whether the step was skipped."""
        updates = list(updates)
        values = [v for _, g, _ in updates for v in (g if g is not None else [math.nan])]
        skipped = not estimators.finite([*values, *extra])
        rate = lr
        if self.normalized and not skipped:
            rms = math.sqrt(math.fsum(v * v for v in values) / len(values))
            rate = lr / rms if rms > 0 else 0.0
        restore = params.in_place and not self.estimator.exact
        if restore and len(updates) != 1:
            raise ValueError("in-place probes end one client's step at a time")
        for client, grads, rows in updates:
            seeds = self.seeds(step, client)
            terms = estimators.end_terms(
                seeds, self.mu, self.estimator, rate, None if skipped else grads, restore, share=len(updates)
            )
            if terms[0]:
                params.add_(*terms, rows=rows)
        if not skipped:
            if weight_decay:
                params.decay_(1.0 - lr * weight_decay, key=self.seeds(step))
            params.check_finite()
        return skipped
