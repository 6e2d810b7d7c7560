"""Every lr_scheduler_type equals transformers' get_scheduler step by step (the oracle)."""

import pytest
import torch
from transformers import get_scheduler

from bumblecore.train.schedulers import SCHEDULERS, build_scheduler

LR, WARMUP, TOTAL = 3e-4, 7, 60
CASES = [
    (name, {}) for name in SCHEDULERS if name not in ("reduce_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
] + [
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 1e-5}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {"power": 2.0, "lr_end": 1e-5}),
    ("warmup_stable_decay", {"num_decay_steps": 12}),
    ("warmup_stable_decay", {"num_decay_steps": 20, "decay_type": "linear", "min_lr_ratio": 0.05}),
]


def lrs(make):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make(optimizer)
    out = []
    for _ in range(TOTAL + 5):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("name,kwargs", CASES)
def test_schedule_matches_transformers(name, kwargs):
    ours = lrs(lambda opt: build_scheduler(name, opt, WARMUP, TOTAL, **kwargs))
    hf_kwargs = dict(kwargs)
    if name == "warmup_stable_decay":
        hf_kwargs.setdefault("num_stable_steps", TOTAL - WARMUP - hf_kwargs["num_decay_steps"])
    theirs = lrs(
        lambda opt: get_scheduler(
            name, opt, num_warmup_steps=WARMUP, num_training_steps=TOTAL, scheduler_specific_kwargs=hf_kwargs
        )
    )
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)


def test_reduce_on_plateau_and_unknown_name():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_scheduler("reduce_on_plateau", optimizer, WARMUP, TOTAL, patience=0, factor=0.5)
    scheduler.step(1.0)
    scheduler.step(2.0)  # worse: halve
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)
    with pytest.raises(ValueError, match="cosine_with_min_lr"):
        build_scheduler("cosine_min", optimizer, WARMUP, TOTAL)
