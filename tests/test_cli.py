"""The command table: help, config files, overrides, --print_config, clear errors; init_model's output."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from bumblecore import Bumblebee, BumblebeeConfig, load_tokenizer
from bumblecore.cli import main
from bumblecore.model.hf_io import read_config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bumblecore", *map(str, args)], capture_output=True, text=True)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "init_model" in result.stdout and "train_tokenizer" in result.stdout
    detail = run_cli("init_model", "--help")
    assert detail.returncode == 0 and "--num_hidden_layers" in detail.stdout and "--print_config" in detail.stdout


def test_unknown_command_suggests_nearest():
    result = run_cli("init_mode")
    assert result.returncode == 2 and "init_model" in result.stderr


def test_init_model_preset_equals_transformers(tmp_path, tokenizer_dir):
    out = tmp_path / "model"
    main(["init_model", "--preset", "0.5B", "--tokenizer_path", str(tokenizer_dir), "--output_dir", str(out)])
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "qwen2" and raw["vocab_size"] == 151936 and raw["hidden_size"] == 896
    assert not list(out.glob("*.safetensors"))
    assert load_tokenizer(out).chat_template  # tokenizer travels with the model dir
    generation = json.loads((out / "generation_config.json").read_text())
    tok = load_tokenizer(tokenizer_dir)
    assert set(generation["eos_token_id"]) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
        ours = Bumblebee(BumblebeeConfig.from_preset("0.5B"))
    assert hf.num_parameters() == ours.num_parameters() == 494_032_768


def test_config_file_overrides_and_print_config(tmp_path, tokenizer_dir):
    config = tmp_path / "init.yaml"
    config.write_text(yaml.safe_dump({"preset": "0.5B", "tokenizer_path": str(tokenizer_dir), "output_dir": str(tmp_path / "m"),
                                      "num_hidden_layers": 3, "vocab_size": 1024}))
    printed = run_cli("init_model", "--config", config, "--hidden_size", 128, "--num_attention_heads", 4, "--print_config")
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["num_hidden_layers"] == 3 and resolved["hidden_size"] == 128  # file, then command line
    assert not (tmp_path / "m").exists()  # --print_config only prints
    made = run_cli("init_model", "--config", config, "--hidden_size", 128, "--num_attention_heads", 4, "--num_key_value_heads", 2)
    assert made.returncode == 0, made.stderr
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (raw["num_hidden_layers"], raw["hidden_size"], raw["vocab_size"]) == (3, 128, 1024)
    cfg = read_config(tmp_path / "m")
    assert Bumblebee(cfg).num_parameters() == cfg.num_parameters_estimate


def test_tokenizer_larger_than_vocab_is_a_clear_error(tmp_path, tokenizer_dir):
    result = run_cli("init_model", "--preset", "0.5B", "--tokenizer_path", tokenizer_dir, "--output_dir", tmp_path / "m", "--vocab_size", 64)
    assert result.returncode == 1
    assert "vocab_size is 64" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_train_tokenizer_command_takes_several_files(tmp_path, corpus_files):
    out = tmp_path / "tok"
    result = run_cli("train_tokenizer", "--corpus", *corpus_files, "--vocab_size", 300, "--output_dir", out)
    assert result.returncode == 0, result.stderr
    assert "from 2 file(s)" in result.stdout
    assert load_tokenizer(out).decode(load_tokenizer(out).encode("蜜蜂 reads 🐝")) == "蜜蜂 reads 🐝"


def test_public_api_forward(tmp_path):
    cfg = BumblebeeConfig.from_preset("0.5B", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = Bumblebee(cfg)
    logits = model(torch.randint(0, 128, (2, 5)))
    assert logits.shape == (2, 5, 128)
    with pytest.raises(ValueError, match="unknown preset"):
        BumblebeeConfig.from_preset("0.6B")
