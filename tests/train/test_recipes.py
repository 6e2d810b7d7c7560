"""The recipe registry (bumblecore/recipes/) is the one place that tells training stages apart by name
(docs/ARCHITECTURE.md, "Add a stage"): no other module compares a stage's name with ==, !=, in or not
in, whatever the variable; inference's raw-text/chat switch keeps one such comparison, in one module."""

import ast
from pathlib import Path

import pytest

import bumblecore
from bumblecore.args import STAGES
from bumblecore.recipes import RECIPES, recipe_for

PACKAGE = Path(bumblecore.__file__).parent
# The stages' names, the reward model's to come, and the preference family's losses.
STAGE_NAMES = {*STAGES, "rm", "orpo", "simpo"}
REGISTRY = PACKAGE / "recipes"
RAW_TEXT_SWITCH = PACKAGE / "inference" / "commands.py"


def stage_comparisons(source: str) -> list[int]:
    """Lines comparing a stage name written out (a string, or one in a tuple, list or set) with ==, !=, in, not in."""

    def names_a_stage(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in STAGE_NAMES
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(names_a_stage, node.elts))

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops
        ):
            if any(names_a_stage(operand) for operand in [node.left, *node.comparators]):
                lines.append(node.lineno)
    return lines


def test_the_scan_finds_every_spelling_of_a_stage_comparison():
    source = """
if stage == "dpo": pass
if "sft" != kind: pass
if stage in ("pretrain", "continue_pretrain"): pass
if loss not in ["orpo"]: pass
if "grpo" in report: pass
if kind == "text" or stage is None or stage.startswith("sft") or x in ("a", "b"): pass
"""
    assert stage_comparisons(source) == [2, 3, 4, 5, 6]


def test_no_module_outside_the_registry_compares_stage_names():
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        if REGISTRY in file.parents:
            continue
        lines = stage_comparisons(file.read_text(encoding="utf-8"))
        if lines:
            found[str(file.relative_to(PACKAGE.parent))] = lines
    switch = str(RAW_TEXT_SWITCH.relative_to(PACKAGE.parent))
    assert len(found.pop(switch, [])) <= 1, "inference's raw-text/chat switch: one comparison"
    assert not found, f"stage names compared outside bumblecore/recipes/: {found}"


def test_every_configurable_stage_has_its_recipe():
    assert tuple(RECIPES) == STAGES  # the config's choices (args.STAGE_SETTINGS) are the registry's stages
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe_for(name) is recipe
        assert recipe.reading is None or recipe.reading.stage == name  # the cache's key and errors name it


def test_an_unknown_stage_names_the_known_ones():
    with pytest.raises(ValueError, match="training_stage 'ppo' is not one of pretrain, continue_pretrain, sft"):
        recipe_for("ppo")
