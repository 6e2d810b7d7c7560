"""SFT (and pretraining's) loss: next-token cross-entropy on the target tokens, summed; the engine
normalises by the step's global target count.

A mixture's batch (data/mixture.py) carries each token's source, and each source's own mean is logged
as loss/<name>, a (sum, count) metric over its target tokens. With loss weights each source is a term
of its own, loss_weight_s * (sum of its token losses), which the engine divides by the source's target
tokens of the step: L = sum_s w_s S_s / N_s (docs/CONFIG.md, "Mixtures and loss weights"). With every
loss weight 1 the loss is the plain token sum over the step's N, bit for bit."""

from __future__ import annotations

import torch

from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.train.losses import (
    chunked_cross_entropy,
    chunked_cross_entropy_by_source,
    shift_targets,
    tokens_per_chunk,
)


class LanguageModelingStage:
    """Batches: input_ids, labels (unshifted, -100 = not trained), optional position_ids / segment_ids."""

    headline_metrics = ("perplexity",)  # beside the eval loss in the terminal's eval line

    def count(self, batch: dict):
        """Target tokens; with loss weights, per source ({name: its target tokens}: each term's own units)."""
        targets = _targets(batch)
        if not _weighted(batch):
            return int((targets != IGNORE_INDEX).sum())
        sources = _target_sources(batch)[targets != IGNORE_INDEX]
        counts = torch.bincount(sources, minlength=len(batch["source_names"])).tolist()
        return dict(zip(batch["source_names"], counts))

    def loss(self, model, batch: dict):
        hidden = model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
            return_hidden_states=True,
        )
        targets = _targets(batch)
        head = model.lm_head
        if "source_ids" not in batch:
            total, _ = chunked_cross_entropy(hidden, head, targets, head_calls=_head_calls(batch, head))
            return total, {}
        names, weights = batch["source_names"], batch["source_loss_weights"]
        terms, sums, counts = chunked_cross_entropy_by_source(
            hidden, head, targets, _target_sources(batch), len(names), per_source=_weighted(batch)
        )
        metrics = {f"loss/{name}": (sums[i], counts[i]) for i, name in enumerate(names)}
        if terms.ndim == 0:  # every loss weight 1: one term, the plain token sum
            return terms, metrics
        return {name: weights[i] * terms[i] for i, name in enumerate(names)}, metrics


def _targets(batch: dict) -> torch.Tensor:
    """What each position predicts; a sequence-parallel slice carries them shifted on the full row
    (train/sequence_parallel.py), so the token after the slice's end is still predicted."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    return shift_targets(batch["labels"], batch.get("segment_ids"))


def _head_calls(batch: dict, head):
    """Sequence parallel: the LM head called equally often on every rank (its ZeRO-3 gathers must pair up,
    while each slice holds its own number of targets): as often as the run's longest slice needs."""
    if "slice_positions" not in batch:
        return None
    return -(-int(batch["slice_positions"]) // tokens_per_chunk(head))


def _weighted(batch: dict) -> bool:
    return "source_loss_weights" in batch and bool((batch["source_loss_weights"] != 1.0).any())


def _target_sources(batch: dict) -> torch.Tensor:
    """Each target position's source: that of the token it predicts (-1 where nothing is predicted)."""
    if "shift_source_ids" in batch:  # a sequence-parallel slice: shifted on the full row
        return batch["shift_source_ids"]
    sources = torch.full_like(batch["source_ids"], -1)
    sources[:, :-1] = batch["source_ids"][:, 1:]
    return sources
