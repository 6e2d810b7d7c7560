"""Evaluation metrics that aggregate correctly across ranks (torchmetrics).

Each rank sees only its share of the eval set, and the shares differ in size (rows split unevenly,
rows of unequal length). A mean of per-rank means would weigh a short share like a long one, so
every metric here keeps sums as its state and divides only after they are summed over all ranks:
torchmetrics all-gathers the states over the default process group (the one Fabric, or DeepSpeed,
set up) in `compute()`; on a single process nothing is synchronised.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torchmetrics import Metric


class RatioOfSums(Metric):
    """sum(total) / sum(weight) over every update on every rank: a weighted mean whose weights are the
    units a sum runs over (eval loss: target tokens; DPO rewards and accuracy: pairs). 0 when no weight."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # float64: the sums of a large eval set would lose digits in float32.
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total, weight) -> None:
        self.total += torch.as_tensor(total, device=self.total.device).detach().double().sum()
        self.weight += torch.as_tensor(weight, device=self.weight.device).double().sum()

    def compute(self) -> torch.Tensor:
        return self.total / self.weight.clamp(min=1.0)


class ExactMatch(RatioOfSums):
    """Share of answers equal to their reference, surrounding whitespace ignored (the demo's SFT score),
    counted over every rank's answers: the matches summed over the answers summed."""

    higher_is_better = True

    def update(self, predictions: Iterable[str], references: Iterable[str]) -> None:
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(f"exact match: {len(predictions)} answers for {len(references)} references")
        super().update(sum(p.strip() == r.strip() for p, r in zip(predictions, references)), len(predictions))


def exact_match(predictions: Iterable[str], references: Iterable[str]) -> float:
    """ExactMatch of one process's answers, as a float."""
    metric = ExactMatch()
    metric.update(predictions, references)
    return float(metric.compute())


class EvalAggregate:
    """The eval loss and a stage's metrics, each a RatioOfSums weighted by the stage's count.

    Every rank must compute the same metrics in the same order (each is one collective), so the names
    are taken from rank 0 (`names` broadcast); a rank whose share was empty adds zero sums."""

    def __init__(self, device):
        self.device = device
        self.loss = RatioOfSums().to(device)
        self.terms: dict[str, RatioOfSums] = {}  # a stage with several loss terms: each over its own units
        self.metrics: dict[str, RatioOfSums] = {}

    def update(self, loss_sum, count, metrics: dict) -> None:
        if isinstance(count, dict):  # the loss is the sum of each term's own mean
            for term, units in count.items():
                self.terms.setdefault(term, RatioOfSums().to(self.device)).update(loss_sum[term], units)
            count = next(iter(count.values()))  # the stage's plain metrics go by its first term's units
        else:
            self.loss.update(loss_sum, count)
        for key, value in metrics.items():
            if isinstance(value, tuple):  # (sum, count): a mean over units of its own (the engine's Stage protocol)
                self._metric(key).update(*value)
            else:
                self._metric(key).update(value, count)

    def _metric(self, key: str) -> RatioOfSums:
        if key not in self.metrics:
            self.metrics[key] = RatioOfSums().to(self.device)
        return self.metrics[key]

    def compute(self, names: list[str] | None = None) -> dict[str, float]:
        """{"loss": ..., key: ...}; `names`: the metric names every rank computes (default: this rank's)."""
        names = sorted(self.metrics) if names is None else names
        if self.terms:  # every rank has the same terms, in the same order (the stage names them)
            result = {"loss": sum(float(term.compute()) for term in self.terms.values())}
        else:
            if not self.loss.update_called:
                self.loss.update(0.0, 0)
            result = {"loss": float(self.loss.compute())}
        for key in names:
            metric = self._metric(key)
            if not metric.update_called:
                metric.update(0.0, 0)
            result[key] = float(metric.compute())
        return result
