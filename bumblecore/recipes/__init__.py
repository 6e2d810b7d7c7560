"""The recipe registry: `training_stage` -> its recipe (recipes/base.py says what a recipe owns).

Adding a stage: its module here (a Recipe subclass), one line below, one in args.STAGE_SETTINGS, its
Stage in train/, and its docs (docs/CONFIG.md's keys, docs/DATA_FORMAT.md's records, README.md's table);
docs/ARCHITECTURE.md, "Add a stage", walks through KTO's. No module outside recipes/ tells stages apart
by name (tests/train/test_recipes.py)."""

from __future__ import annotations

from bumblecore.recipes.base import Recipe
from bumblecore.recipes.grpo import GRPORecipe
from bumblecore.recipes.kto import KTORecipe
from bumblecore.recipes.preference import PreferenceRecipe
from bumblecore.recipes.rm import RewardRecipe
from bumblecore.recipes.sft import SFTRecipe
from bumblecore.recipes.text import TextRecipe

RECIPES: dict[str, Recipe] = {
    "pretrain": TextRecipe("pretrain", from_scratch=True),
    "continue_pretrain": TextRecipe("continue_pretrain", from_scratch=False),
    "sft": SFTRecipe(),
    "dpo": PreferenceRecipe(),
    "kto": KTORecipe(),
    "grpo": GRPORecipe(),
    "rm": RewardRecipe(),
}


def recipe_for(training_stage: str) -> Recipe:
    """The stage's recipe; an unknown stage names the known ones."""
    if training_stage not in RECIPES:
        raise ValueError(f"training_stage {training_stage!r} is not one of {', '.join(RECIPES)}")
    return RECIPES[training_stage]
