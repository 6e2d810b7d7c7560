"""Pretraining (from a random init) and continued pretraining: documents back to back, cut into
cutoff_len blocks (data/packing.py), next-token cross-entropy on every token (train/sft.py)."""

from __future__ import annotations

from bumblecore.data.formats import StageReading
from bumblecore.recipes.base import Recipe


class TextRecipe(Recipe):
    chat = False  # raw documents: no chat template
    sequence_parallel = True
    compiles = True

    def __init__(self, name: str, from_scratch: bool):
        self.name, self.from_scratch = name, from_scratch
        self.reading = StageReading(name, ("text",), documents=True)
