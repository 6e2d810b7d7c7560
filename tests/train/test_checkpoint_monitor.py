"""Checkpoint directories (atomic, rotated, found for resume) and the run's metrics/plots."""

import random

import pytest
import torch

from bumblecore.train.checkpoint import (
    complete_checkpoints,
    resolve_resume_dir,
    restore_rng_state,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
)
from bumblecore.train.monitor import Monitor, ema, read_history


def write_step(tmp_dir):
    (tmp_dir / "model.safetensors").write_text("weights")
    (tmp_dir / "training_state").mkdir()


def test_save_is_atomic_and_rotation_keeps_newest(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, f"checkpoint-{step}", write_step, {"step": step})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10, 20, 30]
    rotate_checkpoints(tmp_path, save_total_limit=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [20, 30]
    assert resolve_resume_dir(tmp_path, "latest").name == "checkpoint-30"


def test_interrupted_write_is_never_trusted(tmp_path):
    save_checkpoint(tmp_path, "checkpoint-5", write_step, {"step": 5})

    def crash(tmp_dir):
        write_step(tmp_dir)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "checkpoint-9", crash, {"step": 9})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [5]
    assert resolve_resume_dir(tmp_path, "latest").name == "checkpoint-5"
    assert (tmp_path / "checkpoint-5" / "model.safetensors").read_text() == "weights"  # untouched
    save_checkpoint(tmp_path, "checkpoint-9", write_step, {"step": 9})  # a later run cleans up and writes it
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [5, 9]
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_dir_must_be_complete(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume_dir(tmp_path, str(tmp_path / "checkpoint-3"))
    assert resolve_resume_dir(tmp_path, "latest") is None


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), torch.rand(3))
    assert first[0] == again[0] and torch.equal(first[1], again[1])


def test_monitor_writes_history_and_plots(tmp_path):
    monitor = Monitor(tmp_path, report_to=["tensorboard"], save_train_log=True)
    for step in range(1, 6):
        monitor.log(
            {
                "step": step,
                "epoch": step / 5,
                "loss": 2.0 / step,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens": 100,
                "tokens_per_sec": 50.0,
            }
        )
    monitor.log({"step": 5, "eval/loss": 0.7})
    monitor.log({"step": 5, "rewards/accuracies": 0.75})
    monitor.close()
    history = read_history(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 5, 5] and history[0]["loss"] == 2.0
    assert (tmp_path / "training_loss.png").stat().st_size > 1000
    assert (tmp_path / "rewards_accuracies.png").exists()
    assert list((tmp_path / "runs").iterdir()) and (tmp_path / "logs" / "train.log").read_text().count('"loss"') == 5
    # A resumed run from step 3 drops the later lines it will write again.
    Monitor(tmp_path, resume_step=3).close()
    assert [r["step"] for r in read_history(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_ema_is_bias_corrected():
    assert ema([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    assert ema([0.0, 10.0]) == pytest.approx([0.0, 1.0 / 0.19])
