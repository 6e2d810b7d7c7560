"""SFT (and pretraining's) loss: next-token cross-entropy on the target tokens, summed; the engine
normalises by the step's global target count.

A mixture's batch (data/mixture.py) carries each token's source: the loss is then
sum_s loss_weight_s * (sum of source s's token losses), still over the step's global target count N
(docs/CONFIG.md, "Mixtures and loss weights"), and each source's own mean is logged as loss/<name>,
a (sum, count) metric over its target tokens."""

from __future__ import annotations

import torch

from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.train.losses import chunked_cross_entropy, chunked_cross_entropy_by_source, shift_targets


class LanguageModelingStage:
    """Batches: input_ids, labels (unshifted, -100 = not trained), optional position_ids / segment_ids."""

    def count(self, batch: dict) -> int:
        return int((shift_targets(batch["labels"], batch.get("segment_ids")) != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict):
        hidden = model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
            return_hidden_states=True,
        )
        targets = shift_targets(batch["labels"], batch.get("segment_ids"))
        head = model.lm_head
        if "source_ids" not in batch:
            total, _ = chunked_cross_entropy(hidden, head, targets)
            return total, {}
        sources = torch.full_like(batch["source_ids"], -1)
        sources[:, :-1] = batch["source_ids"][:, 1:]  # a target's source is that of the token it predicts
        names, weights = batch["source_names"], batch["source_loss_weights"]
        weighted = weights if bool((weights != 1.0).any()) else None
        total, sums, counts = chunked_cross_entropy_by_source(hidden, head, targets, sources, len(names), weighted)
        return total, {f"loss/{name}": (sums[i], counts[i]) for i, name in enumerate(names)}
