"""SFT (and pretraining's) loss: next-token cross-entropy on the target tokens, summed; the engine
normalises by the step's global target count."""

from __future__ import annotations

from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.train.losses import chunked_cross_entropy, shift_targets


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
        total, _ = chunked_cross_entropy(hidden, head, targets)
        return total, {}
