"""The first-order side's optimiser and the guards every update runs under: the optimiser factory
(AdamW, or SGD with decoupled weight decay), the learning-rate schedule as a pure function of the
step, one update that skips a step with a non-finite loss or gradient, and the counter that stops a
run whose steps keep being skipped."""

from __future__ import annotations

import functools
import math

import torch

from hosl.config import TrainConfig


class DivergedError(RuntimeError):
    """The run cannot go on: weights became non-finite, or too many steps in a row were skipped."""


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite: one fused pass of norms (finite when the
    elements are), and only when a norm is not, the elementwise check."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors or bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all()):
        return True
    return all(bool(t.isfinite().all()) for t in tensors)  # a norm can overflow where no element does


def fo_update(optimizer, lr: float, losses_finite: bool, side: str, step: int) -> bool:
    """A first-order side's update at rate lr: the optimiser steps when the step's losses and every
    gradient are finite, else the step is skipped (True is returned); the gradients are then cleared.
    DivergedError when the update leaves a weight non-finite (it cannot be undone: the run stops at once)."""
    set_lr(optimizer, lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    skipped = not (losses_finite and all_finite([p.grad for p in params]))
    if not skipped:
        try:
            optimizer.step()
        except RuntimeError as exc:  # a step size beyond the weights' dtype (bfloat16 and float16 at huge rates)
            if "overflow" not in str(exc):
                raise
            raise DivergedError(
                f"the {side}'s rate {lr:g} overflows its {params[0].dtype} weights at step {step}; start again "
                "with a lower rate"
            ) from None
        if not all_finite(params):
            raise DivergedError(
                f"the {side}'s weights became non-finite at step {step} (finite gradients, so the rate is too "
                "large for them); resume from the last checkpoint with a lower rate (--resume RUN_DIR --client-lr or "
                "--server-lr), or start again with one"
            )
    optimizer.zero_grad(set_to_none=True)
    return skipped


class FusedStep:
    """The optimiser applied to each parameter the moment its gradient is complete in the backward
    (a post-accumulate-grad hook), and that gradient freed there: no gradient buffer is held beside
    the weights. One optimiser per parameter, built by make_optimizer for that parameter alone
    (AdamW and SGD update each parameter on its own, so the update is the grouped optimiser's).

    A step runs as `with fused.stepping(lr, step): loss.backward()`. A non-finite gradient cannot skip
    a step whose other parameters have already moved: it stops the run (DivergedError), as a weight
    made non-finite does. A step whose loss is not finite runs no backward and is skipped whole.
    state_dict / load_state_dict hold every parameter's optimiser state, for checkpoints."""

    def __init__(self, params, cfg: TrainConfig, lr: float, side: str = "client"):
        self.params = [p for p in params if p.requires_grad]
        self.optimizers = [make_optimizer([p], cfg, lr) for p in self.params]
        self.side, self._lr, self._step = side, lr, None
        for p, optimizer in zip(self.params, self.optimizers):
            p.register_post_accumulate_grad_hook(functools.partial(self._apply, optimizer))

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def stepping(self, lr: float, step: int):
        """The context of one step's backward, at rate lr."""
        self._lr, self._step = lr, step
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        step, self._step = self._step, None
        if exc[0] is None and not all_finite(self.params):
            raise DivergedError(
                f"the {self.side}'s weights became non-finite at step {step} (finite gradients, so the rate is too "
                "large for them); resume from the last checkpoint with a lower rate (--resume RUN_DIR --client-lr or "
                "--server-lr), or start again with one"
            )

    def _apply(self, optimizer, p: torch.Tensor) -> None:
        if self._step is None:
            raise RuntimeError("a fused optimiser step outside FusedStep.stepping()")
        if not all_finite([p.grad]):
            raise DivergedError(
                f"a gradient of the {self.side} is not finite at step {self._step}, and a fused step cannot be "
                "skipped (its other parameters may have moved); start again with a lower rate"
            )
        set_lr(optimizer, self._lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("per_parameter")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError("the optimiser state is not a fused one of these parameters")
        for optimizer, one in zip(self.optimizers, states):
            optimizer.load_state_dict(one)


class SkipCounter:
    """Stops a run after --max-skipped consecutive skipped steps (0: never)."""

    def __init__(self, limit: int, side: str):
        self.limit, self.side, self.run = limit, side, 0

    def __call__(self, skipped: bool, step: int) -> None:
        self.run = self.run + 1 if skipped else 0
        if self.limit and self.run >= self.limit:
            raise DivergedError(
                f"the {self.side} skipped {self.run} steps in a row up to step {step} (non-finite losses or "
                "gradients); resume from the last checkpoint with a lower rate or --mu (--resume RUN_DIR --client-lr "
                "... --mu ...), or start again with them"
            )


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The rate's multiplier at `step` (0-based): transformers' get_scheduler lambdas for constant
    (constant_with_warmup when --warmup-steps > 0), linear and cosine (half a cycle), over
    --steps. A pure function of the step, so resume and replay need no scheduler state."""
    warmup, total = cfg.warmup_steps, cfg.steps
    if step < warmup:
        return step / max(1, warmup)
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.lr_scheduler == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(params, cfg: TrainConfig, lr: float):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        # Decoupled decay for SGD too: torch's SGD weight_decay is L2 in the gradient, so apply it by hand.
        return _DecoupledSGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


class _DecoupledSGD(torch.optim.SGD):
    """SGD (with optional momentum) and decoupled weight decay: w <- w - lr * (update + wd * w)."""

    def __init__(self, groups, lr, momentum):
        self._decay = [g.pop("weight_decay") for g in groups]
        super().__init__(groups, lr=lr, momentum=momentum)

    @torch.no_grad()
    def step(self, closure=None):
        for group, wd in zip(self.param_groups, self._decay):
            if wd:
                for p in group["params"]:
                    p.mul_(1 - group["lr"] * wd)
        return super().step(closure)
