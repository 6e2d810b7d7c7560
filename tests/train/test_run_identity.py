"""Issue 29, item 3: a run's identity is what its config means, not how it is spelled or launched.
The refusal to mix runs in one output_dir names only real differences, once per run (rank 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import init_tiny_model_dir

import bumblecore
from bumblecore.cli import main
from bumblecore.train.outputs import identity_differences

DEMO = Path(bumblecore.__file__).parent / "demo_data"


def flat(**keys) -> dict:
    return {"training_stage": "sft", "model_name_or_path": "model", "dataset_path": "data/sft.jsonl", **keys}


def test_one_path_as_a_string_or_a_list_relative_or_absolute_is_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "data" / "sft.jsonl")
    assert identity_differences(flat(), flat(dataset_path=[absolute])) == []
    assert (
        identity_differences(flat(eval_dataset_path="./data/../data/e.jsonl"), flat(eval_dataset_path=["data/e.jsonl"]))
        == []
    )
    assert identity_differences(flat(), flat(model_name_or_path=str(tmp_path / "model"))) == []
    # A mixture entry's bare path is {path} with weights 1; the order of its names does not matter.
    bare = flat(dataset_path={"b": "b.jsonl", "a": "a.jsonl"}, mix_strategy="interleave_under")
    spelled = flat(
        dataset_path={"a": {"path": ["a.jsonl"], "weight": 1.0}, "b": {"path": "b.jsonl"}},
        mix_strategy="interleave_under",
    )
    assert identity_differences(bare, spelled) == []
    # Two paths are not one, and a different weight is a different run.
    assert [d.split()[0] for d in identity_differences(flat(), flat(dataset_path=[absolute, absolute]))] == [
        "dataset_path"
    ]
    heavier = flat(
        dataset_path={"a": {"path": "a.jsonl", "weight": 2.0}, "b": "b.jsonl"}, mix_strategy="interleave_under"
    )
    assert [d.split()[0] for d in identity_differences(bare, heavier)] == ["dataset_path"]


def test_how_a_run_is_launched_is_not_part_of_it():
    launched = flat(devices=2, num_nodes=2, accelerator="cpu", local_rank=0)
    assert identity_differences(flat(), launched) == []
    assert (
        identity_differences(
            flat(lora_target_modules=["q_proj", "v_proj"]), flat(lora_target_modules=["v_proj", "q_proj"])
        )
        == []
    )
    assert identity_differences(flat(new_special_tokens="<a>,<b>"), flat(new_special_tokens=["<a>", "<b>"])) == []


def test_a_real_difference_is_named_alone():
    differences = identity_differences(
        flat(learning_rate=5e-3), flat(learning_rate=1e-3, devices=2, dataset_path=["data/sft.jsonl"])
    )
    assert differences == ["learning_rate 0.005 -> 0.001"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step pretraining run whose config spells dataset_path as a one-element list of a relative path."""
    root = tmp_path_factory.mktemp("identity")
    init_tiny_model_dir(root / "init")
    (root / "docs.jsonl").write_text("".join(open(DEMO / "pretrain.jsonl", encoding="utf-8").readlines()[:16]))
    config = {
        "training_stage": "pretrain",
        "model_name_or_path": str(root / "init"),
        "dataset_path": ["docs.jsonl"],
        "output_dir": str(root / "out"),
        "cutoff_len": 128,
        "max_steps": 2,
        "save_steps": 0,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_model_precision": "fp32",
        "accelerator": "cpu",
        "cache_dir": str(root / "cache"),
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["train", "--config", "run.yaml"])
    finally:
        os.chdir(cwd)
    return root


def test_the_same_run_spelled_otherwise_is_accepted_at_the_command_line(finished, capsys, monkeypatch):
    monkeypatch.chdir(finished)
    capsys.readouterr()
    # The recorded config names the data `[docs.jsonl]`; this run names it by its absolute path.
    main(["train", "--config", "run.yaml", "--dataset_path", str(finished / "docs.jsonl")])
    output = capsys.readouterr()
    assert "holds another run's outputs" not in output.out + output.err
    assert [json.loads(line)["step"] for line in (finished / "out" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


@pytest.mark.slow
def test_two_processes_refuse_a_real_difference_once_naming_only_it(finished):
    """`--devices 2` against the record of a 1-process run: only learning_rate differs, and the two
    ranks print the refusal once between them."""
    before = (finished / "out" / "training_args.yaml").read_bytes()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bumblecore",
            "train",
            "--config",
            "run.yaml",
            "--devices",
            "2",
            "--learning_rate",
            "0.001",
        ],
        cwd=finished,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    refusals = [line for line in result.stderr.splitlines() if "holds another run's outputs" in line]
    assert len(refusals) == 1, result.stderr[-2000:]
    assert "differs in learning_rate 0.005 -> 0.001;" in refusals[0] and "devices" not in refusals[0]
    assert "Traceback" not in result.stderr
    assert (finished / "out" / "training_args.yaml").read_bytes() == before
