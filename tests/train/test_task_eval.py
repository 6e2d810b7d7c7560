"""`eval_tasks`: lm-eval's tasks on the model being trained, at every evaluation, logged as
eval/<task>/<metric>: the last one equals `bumblecore eval` on the saved model (itself held to lm-eval's
HF backend in tests/inference/test_harness.py), and evaluating changes no training step."""

import json
from pathlib import Path

import pytest
import yaml
from tiny import init_tiny_model_dir

import bumblecore
from bumblecore.cli import main

pytest.importorskip("lm_eval")

DEMO = Path(bumblecore.__file__).parent / "demo_data"
TASKS = ["demo_qa_choice", "demo_qa_exact"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def train(tmp_path, name, **keys) -> list[dict]:
    data = tmp_path / "pretrain.jsonl"
    if not data.exists():
        data.write_text("\n".join((DEMO / "pretrain.jsonl").read_text().splitlines()[:32]) + "\n")
        init_tiny_model_dir(tmp_path / "model")
    config = {
        "training_stage": "pretrain",
        "model_name_or_path": str(tmp_path / "model"),
        "dataset_path": str(data),
        "output_dir": str(tmp_path / name),
        "cutoff_len": 64,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "train_model_precision": "fp32",
        "save_steps": 100,
        **keys,
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    main(["train", "--config", str(tmp_path / f"{name}.yaml")])
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_eval_tasks_every_eval_steps_equal_the_eval_command_on_the_saved_model(tmp_path, capsys):
    history = train(tmp_path, "with", eval_tasks=TASKS, eval_tasks_limit=4, eval_steps=2)
    printed = capsys.readouterr()
    evaluations = [r for r in history if "eval/demo_qa_choice/acc" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    expected = {"eval/demo_qa_choice/acc", "eval/demo_qa_choice/acc_norm", "eval/demo_qa_exact/exact_match"}
    assert all(expected <= set(r) for r in evaluations) and not any("eval/loss" in r for r in history)
    assert "demo_qa_choice/acc " in printed.out + printed.err  # each evaluation's terminal line

    main(["eval", "--model_path", str(tmp_path / "with"), "--tasks", ",".join(TASKS), "--limit", "4"])
    saved = json.loads((tmp_path / "with" / "eval_results.json").read_text())["results"]
    for task, metric in (("demo_qa_choice", "acc"), ("demo_qa_choice", "acc_norm"), ("demo_qa_exact", "exact_match")):
        # metrics.jsonl keeps 8 significant digits
        assert evaluations[-1][f"eval/{task}/{metric}"] == pytest.approx(saved[task][f"{metric},none"], abs=1e-7)

    without = train(tmp_path, "without")
    assert [r["loss"] for r in history if "loss" in r] == [r["loss"] for r in without if "loss" in r]


def test_an_unknown_eval_task_is_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(tmp_path, "refused", eval_tasks=["demo_qa_choise"])
    assert "eval_tasks demo_qa_choise: no such task" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_two_ranks_rank_zero_evaluates_and_every_rank_logs_it(tmp_path):
    """DDP on 2 gloo ranks: rank 0 runs the tasks while the other waits; the record equals `bumblecore eval`
    on the saved model."""
    from tiny import train_on_two_processes

    (tmp_path / "pretrain.jsonl").write_text("\n".join((DEMO / "pretrain.jsonl").read_text().splitlines()[:32]) + "\n")
    init_tiny_model_dir(tmp_path / "model")
    config = {"training_stage": "pretrain", "model_name_or_path": str(tmp_path / "model"),
              "dataset_path": str(tmp_path / "pretrain.jsonl"), "cutoff_len": 64, "max_steps": 2,
              "learning_rate": 5e-3, "train_micro_batch_size_per_gpu": 2, "train_model_precision": "fp32",
              "save_steps": 100, "eval_tasks": ["demo_qa_choice"], "eval_tasks_limit": 4}  # fmt: skip
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    train_on_two_processes(tmp_path / "ddp.yaml", tmp_path / "out", cwd=tmp_path)
    history = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in history if "eval/demo_qa_choice/acc" in r]
    assert [r["step"] for r in evaluations] == [0, 2]  # eval_steps defaults to save_steps; the end evaluates
    main(["eval", "--model_path", str(tmp_path / "out"), "--tasks", "demo_qa_choice", "--limit", "4"])
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())["results"]["demo_qa_choice"]
    assert evaluations[-1]["eval/demo_qa_choice/acc"] == pytest.approx(saved["acc,none"], abs=1e-7)
    assert evaluations[-1]["eval/demo_qa_choice/acc_norm"] == pytest.approx(saved["acc_norm,none"], abs=1e-7)
