"""Reward models (training_stage rm): preference pairs, read as dpo reads them, each side the whole
conversation rendered by the chat template; the model is the causal LM's body with a scalar `score`
head (model/reward.py), trained with the Bradley-Terry loss (train/reward.py) and saved as
transformers' `*ForSequenceClassification` (num_labels 1). A record's optional `margin` rides along."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from bumblecore.args import PreferenceArgs
from bumblecore.data.adapters import Sample
from bumblecore.data.formats import StageReading
from bumblecore.data.sources import DataError
from bumblecore.recipes.base import Recipe, StageData
from bumblecore.recipes.preference import PREFERENCE_FORMATS
from bumblecore.train.reward import RewardStage


def checked_margins(samples: Iterator[Sample]) -> Iterator[Sample]:
    """The pairs, each `margin` a finite number (or absent); else the record's file, line and field."""
    for sample in samples:
        margin = sample.margin
        if margin is not None and (
            isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin)
        ):
            raise DataError(f'{sample.where}: field "margin" must be a number, got {margin!r}')
        yield sample


class RewardRecipe(Recipe):
    name = "rm"
    reading = StageReading(name, PREFERENCE_FORMATS, examples=checked_margins, pairs=True, margins=True)
    rows_per_unit = 2  # a pair's chosen and rejected rows
    plans_padded_rows = True
    scalar_head = True

    def check(self, run) -> None:
        if run.model.resize_vocab:
            raise ValueError("training_stage rm: resize_vocab is not supported (a reward model has no LM head to grow)")
        coefficient = run.preference.center_rewards_coefficient
        if coefficient is not None and not coefficient >= 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {coefficient}")

    def notes(self, run) -> list[str]:
        """The preference keys of dpo and kto, set but meaningless for a reward model."""
        defaults = PreferenceArgs()
        notes = [
            f"{f.name} {getattr(run.preference, f.name)} is ignored: training_stage rm uses only center_rewards_coefficient"
            for f in dataclasses.fields(PreferenceArgs)
            if f.name != "center_rewards_coefficient" and getattr(run.preference, f.name) != getattr(defaults, f.name)
        ]
        if run.data.packing:  # each side's score is read at its row's last token: one sequence per row
            notes.append("packing true is ignored: training_stage rm puts each side of a pair in its own padded row")
        return notes

    def stage(self, fabric, run, model, data: StageData, load_model, resuming: bool):
        # The rows are padded with pad_id: the saved model reads its score where training did.
        model.config.pad_token_id = data.pad_id
        stage = RewardStage(data.pad_id, run.preference.center_rewards_coefficient)
        return stage, data.loader, data.eval_loader
