"""KTO (training_stage kto): completions labelled desirable or not, each unit a completion row and its
KL row (train/kto.py). Labelled conversations, TRL's unpaired records, and preference pairs (a pair
gives a desirable and an undesirable example) are read."""

from __future__ import annotations

from bumblecore.data.adapters import LABELLED_FORMATS
from bumblecore.data.formats import StageReading, kto_examples
from bumblecore.recipes.preference import PREFERENCE_FORMATS, PreferenceRecipe
from bumblecore.train.kto import build_kto_stage


class KTORecipe(PreferenceRecipe):
    name = "kto"
    # conversations with a label are read as labelled completions; a pair gives two (kto_examples)
    reading = StageReading(
        name,
        (*LABELLED_FORMATS.values(), "unpaired_prompt", *PREFERENCE_FORMATS),
        LABELLED_FORMATS,
        kto_examples,
        pairs=True,
        labelled=True,
    )
    plans_padded_rows = False
    build_stage = staticmethod(build_kto_stage)
