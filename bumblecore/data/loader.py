"""Step-indexed batches: optimiser step s always gets the same global batch, however it is split.

The global batch of step s is G = micro_batch_size x world_size x accumulation units, taken in order
from the epoch's seeded permutation (a mixture's interleaved draws, data/mixture.py) (the last batch of an epoch wraps to its start, so every batch
is full). Rank r takes its contiguous share and cuts it into `accumulation` micro-batches. The
position in the data is the step number itself: a checkpoint stores it and a resumed run asks for
step s + 1 directly, without replaying anything.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from bumblecore.data.mixture import interleaved_order
from bumblecore.data.packing import Units, collate, unit_order


class BatchLoader:
    def __init__(
        self,
        units: Units,
        micro_batch_size: int,
        accumulation: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 42,
        pad_id: int = 0,
        packing: bool = False,
        group_by_length: bool = False,
    ):
        if len(units) == 0:
            raise ValueError("the dataset has no usable samples")
        self.units, self.micro, self.accumulation = units, micro_batch_size, accumulation
        self.world_size, self.rank, self.seed, self.pad_id, self.packing = world_size, rank, seed, pad_id, packing
        self.global_size = micro_batch_size * accumulation * world_size
        sources = units.sources
        self.draws = sources.draws if sources is not None else None  # interleaved mixture: units per epoch
        if self.draws is not None and group_by_length:
            raise ValueError("group_by_length does not combine with an interleaved mixture (mix_strategy concat does)")
        epoch_units = int(self.draws.sum()) if self.draws is not None else len(units)
        self.steps_per_epoch = max(1, math.ceil(epoch_units / self.global_size))
        self.lengths = np.array([units.length(i) for i in range(len(units))]) if group_by_length else None

    @lru_cache(maxsize=2)  # noqa: B019 (one loader per run: caching on self keeps it alive no longer than the run)
    def _order(self, epoch: int) -> np.ndarray:
        if self.draws is not None:
            return interleaved_order(self.units.sources.of_unit, self.draws, epoch, self.seed)
        return unit_order(len(self.units), epoch, self.seed, self.lengths, self.global_size)

    def global_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        return [int(order[(k * self.global_size + j) % len(order)]) for j in range(self.global_size)]

    def micro_batches(self, step: int) -> list[dict]:
        share = self.global_size // self.world_size
        mine = self.global_indices(step)[self.rank * share : (self.rank + 1) * share]
        return [
            collate(self.units, mine[i * self.micro : (i + 1) * self.micro], self.pad_id, self.packing)
            for i in range(self.accumulation)
        ]

    def total_steps(self, num_epochs: float, max_steps: int | None = None) -> int:
        if max_steps:
            return max_steps
        return max(1, math.ceil(num_epochs * self.steps_per_epoch))


def eval_batches(
    units: Units, batch_size: int, pad_id: int, packing: bool, world_size: int = 1, rank: int = 0
) -> list[dict]:
    """Every unit once, in order, this rank's share (the engine sums over ranks)."""
    mine = list(range(rank, len(units), world_size))
    return [collate(units, mine[i : i + batch_size], pad_id, packing) for i in range(0, len(mine), batch_size)]
