"""`bumblecore demo` on a reduced size: every stage runs, hands its output to the next, and the report
holds the measurements the README promises (the full-size numbers are recorded in docs/BENCHMARKS.md)."""

import json

import pytest

from bumblecore.cli import main
from bumblecore.model.reward import is_reward_model

pytestmark = pytest.mark.slow  # starts processes, servers or whole pipelines


def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path):
    main(["demo", "--output_dir", str(tmp_path), "--quick", "true", "--with_grpo", "true", "--with_rlhf", "true"])
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert set(report) >= {"pretrain", "sft", "dpo", "seconds"}
    assert set(report["pretrain"]) >= {"eval_loss_start", "eval_loss_end"}
    assert report["pretrain"]["eval_loss_end"] < report["pretrain"]["eval_loss_start"]
    assert set(report["sft"]) >= {"exact_match_before", "exact_match_after"}
    assert set(report["dpo"]) >= {"reward_accuracy", "preferred_rate_before", "preferred_rate_after"}
    for value in (
        report["sft"]["exact_match_before"],
        report["dpo"]["preferred_rate_after"],
        report["dpo"]["reward_accuracy"],
    ):
        assert 0.0 <= value <= 1.0
    # each stage's output is the next stage's model
    assert (tmp_path / "init" / "config.json").exists() and not (tmp_path / "init" / "model.safetensors").exists()
    for stage in ("pretrain", "sft"):
        assert (tmp_path / stage / "model.safetensors").exists() and (tmp_path / stage / "training_loss.png").exists()
    adapter = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "sft").resolve())
    assert (tmp_path / "dpo" / "rewards_accuracies.png").exists()
    assert (tmp_path / "dpo_merged" / "model.safetensors").exists() and (
        tmp_path / "dpo_merged" / "tokenizer.json"
    ).exists()
    assert report["samples"] and {"question", "expected", "answer"} <= set(report["samples"][0])
    grpo = report["grpo"]  # the fourth stage: GRPO from the merged DPO model
    assert 0 <= grpo["count_exact_match_before"] <= 1 and 0 <= grpo["count_exact_match_after"] <= 1
    assert grpo["questions"] == 8 and [step for step, _ in grpo["reward_curve"]] == [1, 2, 3, 4]
    assert (tmp_path / "grpo" / "model.safetensors").exists() and (tmp_path / "grpo" / "reward.png").exists()
    rlhf = report["rlhf"]  # rm from the SFT model, then GRPO with it as the only reward
    assert is_reward_model(tmp_path / "rm") and 0 <= rlhf["reward_model_accuracy"] <= 1
    assert 0 <= rlhf["preferred_rate_before"] <= 1 and 0 <= rlhf["preferred_rate_after"] <= 1
    assert rlhf["prompts"] == 8 and [step for step, _ in rlhf["reward_curve"]] == [1, 2, 3, 4]
    history = [json.loads(line) for line in (tmp_path / "grpo_rm" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward"] == pytest.approx(r["rewards/rm/mean"]) for r in history if "reward" in r)
