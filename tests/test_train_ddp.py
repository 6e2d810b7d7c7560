"""2-process DDP on CPU (gloo): the same global batch split over two processes ends with the same
weights as one process with accumulation 2, launched by `devices: 2` and by `fabric run`."""

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from bumblecore.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "bumblecore" / "demo_data"


def test_ddp_two_processes_equal_one_process(tmp_path):
    model = tmp_path / "model"
    main(["init_model", "--preset", "0.5B", "--num_hidden_layers", "2", "--hidden_size", "32", "--intermediate_size", "64",
          "--num_attention_heads", "4", "--num_key_value_heads", "2", "--vocab_size", "768", "--torch_dtype", "float32",
          "--tokenizer_path", str(DEMO / "tokenizer"), "--output_dir", str(model)])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "training_stage": "pretrain", "model_name_or_path": str(model), "dataset_path": str(DEMO / "pretrain_eval.jsonl"),
        "cutoff_len": 64, "max_steps": 3, "learning_rate": 5e-3, "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1, "train_model_precision": "fp32", "accelerator": "cpu", "save_steps": 100}))
    main(["train", "--config", str(config), "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"])
    launches = {
        "devices": [sys.executable, "-m", "bumblecore", "train", "--config", str(config), "--devices", "2",
                    "--output_dir", str(tmp_path / "devices")],
        "fabric_run": [str(Path(sys.executable).parent / "fabric"), "run", "--accelerator", "cpu", "--devices", "2",
                       str(REPO / "bumblecore" / "__main__.py"), "train", "--config", str(config), "--output_dir", str(tmp_path / "fabric_run")],
    }
    expected = load_file(tmp_path / "one" / "model.safetensors")
    for name, command in launches.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        assert "DDPStrategy" in result.stdout + result.stderr
        got = load_file(tmp_path / name / "model.safetensors")
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-5, f"{name}: max weight difference {worst}"
