"""Every YAML under configs/ parses as a train config (--print_config), every DeepSpeed JSON loads."""

import json
from pathlib import Path

import pytest
import yaml

from bumblecore.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The demo's stage configs are package data (bumblecore/demo_configs), so a wheel runs the demo.
DEMO_CONFIGS = Path(__file__).resolve().parents[2] / "bumblecore" / "demo_configs"
TRAIN_YAMLS = sorted(
    [
        *(p for p in CONFIGS.rglob("*.yaml") if p.parent.name in ("pretrain", "sft", "dpo", "kto", "grpo", "rm")),
        *DEMO_CONFIGS.glob("*.yaml"),
    ]
)


def test_there_are_configs():
    assert TRAIN_YAMLS and list((CONFIGS / "deepspeed").glob("ds_z*_config.json"))


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_train_yaml_parses(path, capsys):
    """In this process (the CLI's own main; a process per file spent seconds importing, not parsing)."""
    main(["train", "--config", str(path), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    for key, value in yaml.safe_load(path.read_text()).items():
        assert resolved[key] == value, key


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_json_loads(path):
    assert "zero_optimization" in json.loads(path.read_text())


def test_every_key_has_one_well_formed_row_in_config_md():
    """docs/CONFIG.md's tables: one row per flat key, of exactly four cells (key, type, default, meaning)."""
    import re

    from bumblecore.args import flat_defaults

    text = (Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        found = re.match(r"\| `(\w+)` \|", line)
        if found and found.group(1) in flat_defaults():
            rows.setdefault(found.group(1), []).append(line)
    assert set(rows) == set(flat_defaults())
    for key, lines in rows.items():
        assert len(lines) == 1, key
        cells = re.split(r"(?<!\\)\|", lines[0].strip())[1:-1]
        assert len(cells) == 4 and all(cell.strip() for cell in cells), lines[0]
