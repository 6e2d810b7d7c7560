"""2-process DDP on CPU (gloo): the same global batch split over two processes ends with the same
weights as one process with accumulation 2, launched by `devices: 2` and by `fabric run`."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tiny import init_tiny_model_dir, max_weight_difference, tiny_run_keys, train_on_two_processes

from bumblecore.cli import main

pytestmark = pytest.mark.slow  # starts processes, servers or whole pipelines

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "bumblecore" / "demo_data"


def test_ddp_two_processes_equal_one_process(tmp_path):
    model = tmp_path / "model"
    init_tiny_model_dir(str(model))
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "training_stage": "pretrain",
                "model_name_or_path": str(model),
                "dataset_path": str(DEMO / "pretrain_eval.jsonl"),
                "cutoff_len": 64,
                "max_steps": 3,
                "learning_rate": 5e-3,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1,
                "train_model_precision": "fp32",
                "accelerator": "cpu",
                "save_steps": 100,
            }
        )
    )
    main(
        ["train", "--config", str(config), "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"]
    )
    # `fabric run --devices 2` (the same DDP run under Fabric's launcher) is test_scale_out.py's
    # test_fabric_run_with_two_devices_shares_the_cores_and_equals_one_process.
    command = [sys.executable, "-m", "bumblecore", "train", "--config", str(config), "--devices", "2"]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "devices")], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDPStrategy" in result.stdout + result.stderr
    expected = load_file(tmp_path / "one" / "model.safetensors")
    got = load_file(tmp_path / "devices" / "model.safetensors")
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-5, f"max weight difference {worst}"


@pytest.mark.parametrize("pref_loss", ["sigmoid", "orpo", "simpo"])
def test_dpo_ddp_equals_one_process_and_shares_the_reference_table(tmp_path, pref_loss):
    """DPO over 2 processes: the reference log-probs are computed in strided shares and all-reduced,
    the loss is normalised by the pairs of the whole step; the result equals 1 process x accumulation 2.
    The reference-free losses (ORPO, SimPO) likewise, with no reference table at all."""
    model = tmp_path / "model"
    init_tiny_model_dir(str(tmp_path / "init"))
    main(
        [
            "train",
            "--training_stage",
            "pretrain",
            "--model_name_or_path",
            str(tmp_path / "init"),
            "--dataset_path",
            str(DEMO / "pretrain_eval.jsonl"),
            "--output_dir",
            str(model),
            "--max_steps",
            "1",
            "--cutoff_len",
            "64",
            "--train_model_precision",
            "fp32",
            "--accelerator",
            "cpu",
            "--save_steps",
            "100",
        ]
    )
    config = tmp_path / "dpo.yaml"
    config.write_text(
        yaml.safe_dump(
            tiny_run_keys(
                training_stage="dpo",
                model_name_or_path=str(model),
                dataset_path=str(DEMO / "dpo_eval.jsonl"),
                accelerator="cpu",
                pref_beta=0.5,
                pref_loss=pref_loss,
            )
        )
    )
    main(
        [
            "train",
            "--config",
            str(config),
            "--output_dir",
            str(tmp_path / "one"),
            "--gradient_accumulation_steps",
            "2",
            "--cache_dir",
            str(tmp_path / "cache_one"),
        ]
    )
    train_on_two_processes(config, tmp_path / "two", "--cache_dir", str(tmp_path / "cache_two"), cwd=tmp_path)
    worst = max_weight_difference(tmp_path / "one", tmp_path / "two")
    assert worst < 1e-5, f"max weight difference {worst}"
    import numpy as np

    if pref_loss != "sigmoid":
        assert not list(tmp_path.rglob("reference_logps-*.npy"))
        return
    tables = [np.load(next((tmp_path / name).rglob("reference_logps-*.npy"))) for name in ("cache_one", "cache_two")]
    assert tables[0].shape == (100, 2) and np.allclose(tables[0], tables[1], atol=1e-5)
