"""Learning-rate schedules: the ten names the original accepted, as multipliers of the peak lr.

Each schedule is a plain function of (step, total steps): `lr_factor_fn(name, warmup, total)` gives
`step -> factor` (so it is easy to read, plot and test), wrapped in a LambdaLR; `reduce_on_plateau`
is PyTorch's ReduceLROnPlateau, stepped with the eval loss (it needs an eval set).
Semantics and defaults follow transformers' `get_scheduler`, so configs carry over unchanged.

Nothing of the schedule's shape is resumed: a resumed run builds its schedule from its own total
steps (a larger max_steps, say) and `resume_schedule` sets the lr of the resumed step from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


def _warmup(step: int, warmup: int) -> Optional[float]:
    return step / max(1, warmup) if step < warmup else None


def lr_factor_fn(
    name: str, warmup_steps: int, total_steps: int, peak_lr: float = 1.0, **kwargs
) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each optimiser step (0-based)."""
    w, total = warmup_steps, total_steps

    def progress(step: int) -> float:
        return (step - w) / max(1, total - w)

    if name == "constant":
        return lambda step: 1.0
    if name == "constant_with_warmup":
        return lambda step: _warmup(step, w) if step < w else 1.0
    if name == "linear":
        return lambda step: _warmup(step, w) if step < w else max(0.0, (total - step) / max(1, total - w))
    if name == "cosine":
        cycles = kwargs.get("num_cycles", 0.5)
        return lambda step: (
            _warmup(step, w) if step < w else max(0.0, 0.5 * (1 + math.cos(math.pi * 2 * cycles * progress(step))))
        )
    if name == "cosine_with_restarts":
        cycles = kwargs.get("num_cycles", 1)

        def restarts(step: int) -> float:
            if step < w:
                return _warmup(step, w)
            p = progress(step)
            return 0.0 if p >= 1.0 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1.0))))

        return restarts
    if name == "cosine_with_min_lr":
        cycles = kwargs.get("num_cycles", 0.5)
        floor = kwargs["min_lr"] / peak_lr if "min_lr" in kwargs else kwargs.get("min_lr_rate", 0.1)

        def cosine_floor(step: int) -> float:
            if step < w:
                return _warmup(step, w)
            cos = 0.5 * (1 + math.cos(math.pi * 2 * cycles * progress(step)))
            return max(0.0, cos * (1 - floor) + floor)

        return cosine_floor
    if name == "polynomial":
        lr_end, power = kwargs.get("lr_end", 1e-7), kwargs.get("power", 1.0)
        if lr_end > peak_lr:
            raise ValueError(f"polynomial schedule: lr_end {lr_end} must not exceed the learning rate {peak_lr}")

        def polynomial(step: int) -> float:
            if step < w:
                return _warmup(step, w)
            if step > total:
                return lr_end / peak_lr
            remaining = 1 - (step - w) / max(1, total - w)
            return ((peak_lr - lr_end) * remaining**power + lr_end) / peak_lr

        return polynomial
    if name == "inverse_sqrt":
        timescale = kwargs.get("timescale") or (w or 10_000)
        return lambda step: _warmup(step, w) if step < w else 1.0 / math.sqrt((step + timescale - w) / timescale)
    if name == "warmup_stable_decay":
        decay = kwargs.get("num_decay_steps", max(1, int(0.1 * total)))
        stable = kwargs.get("num_stable_steps", total - w - decay)
        floor = kwargs.get("min_lr_ratio", 0.0)
        decay_type = kwargs.get("decay_type", "cosine")
        cycles = kwargs.get("num_cycles", 0.5)

        def wsd(step: int) -> float:
            if step < w:
                return floor + (1 - floor) * step / max(1, w)
            if step < w + stable:
                return 1.0
            if step < w + stable + decay:
                p = (step - w - stable) / max(1, decay)
                if decay_type == "linear":
                    value = 1.0 - p
                elif decay_type == "1-sqrt":
                    value = 1.0 - math.sqrt(p)
                else:
                    value = 0.5 * (1.0 + math.cos(math.pi * 2 * cycles * p))
                return floor + (1 - floor) * value
            return floor

        return wsd
    raise ValueError(f"lr_scheduler_type {name!r} is not supported; choose one of {', '.join(SCHEDULERS)}")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, **kwargs):
    """A scheduler to step once per optimiser step (reduce_on_plateau: once per evaluation, with the eval loss)."""
    if name == "reduce_on_plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
    peak_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor_fn(name, warmup_steps, total_steps, peak_lr, **kwargs)
    )


def resume_schedule(scheduler, step: int) -> None:
    """After restoring a checkpoint at `step`: the optimiser holds the lr the saved run's schedule
    gave; set it from this run's schedule instead, so the next step already follows it (with the same
    total steps this is the same number)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return  # reduce_on_plateau: the lr is state (the restored one), not a function of the step
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.last_epoch = step
    scheduler._last_lr = lrs
