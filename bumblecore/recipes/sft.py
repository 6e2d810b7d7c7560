"""Supervised fine-tuning: conversations through the chat template, the assistant's replies trained
(text records too: all trained, e.g. replay in a mixture); packed rows or one padded row per sample."""

from __future__ import annotations

from bumblecore.data.formats import StageReading
from bumblecore.recipes.base import Recipe


class SFTRecipe(Recipe):
    name = "sft"
    reading = StageReading(name, ("alpaca", "sharegpt", "messages", "text"))
    plans_padded_rows = True
    sequence_parallel = True
    compiles = True
