"""Every command line in scripts/*.sh and *.sbatch (the fabric run lines beside them included) and every
configs/inference YAML parses (--print_config), so the scripts users copy do not rot."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import yaml

from bumblecore.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*(ROOT / "scripts").glob("*.sh"), *(ROOT / "scripts").glob("*.sbatch")])


def command_lines(script: Path) -> list[list[str]]:
    """The bumblecore invocations of a script, as argument lists (env defaults filled, "$@" dropped)."""
    found = []
    for line in script.read_text().splitlines():
        line = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line.lstrip("# "))
        match = re.search(r"(?:^|\|\| |srun )bumblecore (\w+.*)$", line) or re.search(
            r"bumblecore/__main__\.py (\w+.*)$", line
        )
        if match:
            found.append([a.strip('"') for a in match.group(1).split() if a != '"$@"'])
    return found


def test_every_workflow_has_a_script():
    names = {p.stem for p in SCRIPTS}
    assert {
        "pretrain",
        "sft_full",
        "sft_lora",
        "dpo_full",
        "dpo_lora",
        "orpo",
        "simpo",
        "kto",
        "merge_lora",
        "chat",
        "bumblechat",
        "demo",
    } <= names


def print_config(args: list[str]) -> dict:
    """`bumblecore <args> --print_config` in this process: the resolved configuration."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*args, "--print_config"])
        except SystemExit as exit:
            assert not exit.code, f"{' '.join(args)} exited with {exit.code}"
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("script", [s for s in SCRIPTS if command_lines(s)], ids=lambda p: p.name)
def test_script_command_lines_parse(script, monkeypatch):
    monkeypatch.chdir(ROOT)  # the scripts cd to the repository root
    for args in command_lines(script):
        assert print_config(args), f"{script.name}: {' '.join(args)}"


@pytest.mark.parametrize("name,command", [("chat.yaml", "chat"), ("bumblechat.yaml", "serve")])
def test_inference_configs_parse(name, command):
    path = ROOT / "configs" / "inference" / name
    resolved = print_config([command, "--config", str(path)])
    for key, value in yaml.safe_load(path.read_text()).items():
        assert resolved[key] == value, key


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "model").glob("*.yaml")), ids=lambda p: p.name)
def test_model_configs_parse(path):
    resolved = print_config(["init_model", "--config", str(path)])
    for key, value in yaml.safe_load(path.read_text()).items():
        assert resolved[key] == value, key


def test_every_preset_has_a_model_config(tmp_path, monkeypatch):
    """configs/model covers every preset (0.5B..72B), and each writes the preset's exact shape."""
    import json

    from bumblecore.model.config import PRESETS

    monkeypatch.chdir(ROOT)  # the configs name the tokenizer relative to the repository root
    for name, shape in PRESETS.items():
        path = ROOT / "configs" / "model" / f"bumblebee_{name}.yaml"
        assert path.is_file(), f"configs/model has no {path.name}"
        assert yaml.safe_load(path.read_text())["preset"] == name
        with contextlib.redirect_stdout(io.StringIO()):  # init_model writes no weights: cheap even at 72B
            main(["init_model", "--config", str(path), "--output_dir", str(tmp_path / name)])
        written = json.loads((tmp_path / name / "config.json").read_text())
        assert {key: written[key] for key in shape} == shape, name


# The keys naming what a command reads and what it writes.
INPUTS = {
    "train": ["model_name_or_path"],
    "merge_lora": ["base_model_path", "lora_model_path"],
    "chat": ["model_path"],
    "serve": ["model_path"],
}
OUTPUTS = {"train": "output_dir", "merge_lora": "save_path", "init_model": "output_dir"}


def script_paths(script: Path, monkeypatch) -> tuple[set[str], set[str]]:
    """(what the script reads, what it writes) with its defaults: its first command line of each kind."""
    monkeypatch.chdir(ROOT)
    reads, writes, seen = set(), set(), set()
    for args in command_lines(script):
        if args[0] in seen:
            continue  # the commented multi-GPU line repeats the command above it
        seen.add(args[0])
        resolved = print_config(args)
        reads |= {resolved[key] for key in INPUTS.get(args[0], [])}
        writes |= {resolved[OUTPUTS[args[0]]]} if args[0] in OUTPUTS else set()
    return reads - writes, writes


def test_each_script_reads_the_previous_scripts_default_output(monkeypatch):
    """pretrain -> sft_full -> dpo_lora -> merge_lora -> chat / bumblechat (serve), as the tutorial chains them;
    sft_lora, dpo_full, orpo, simpo and kto branch off it. tests/e2e/test_workflow.py runs the main line for real."""
    paths = {s.stem: script_paths(s, monkeypatch) for s in SCRIPTS if s.stem != "demo" and command_lines(s)}
    expected = {
        "pretrain": (set(), {"checkpoints/init", "checkpoints/pretrain"}),
        "sft_full": ({"checkpoints/pretrain"}, {"checkpoints/sft_full"}),
        "sft_lora": ({"checkpoints/pretrain"}, {"checkpoints/sft_lora"}),
        "dpo_lora": ({"checkpoints/sft_full"}, {"checkpoints/dpo_lora"}),
        "dpo_full": ({"checkpoints/sft_full"}, {"checkpoints/dpo_full"}),
        "orpo": ({"checkpoints/pretrain"}, {"checkpoints/orpo"}),  # ORPO needs no SFT stage before it
        "simpo": ({"checkpoints/sft_full"}, {"checkpoints/simpo"}),
        "kto": ({"checkpoints/sft_full"}, {"checkpoints/kto_lora"}),
        "merge_lora": ({"checkpoints/sft_full", "checkpoints/dpo_lora"}, {"checkpoints/dpo_merged"}),
        "chat": ({"checkpoints/dpo_merged"}, set()),
        "bumblechat": ({"checkpoints/dpo_merged"}, set()),
    }
    assert {name: paths[name] for name in expected} == expected
    written = set().union(*(w for _, w in paths.values()))
    for name, (reads, _) in paths.items():
        assert reads <= written, f"{name}.sh reads {reads - written}, which no script writes"
