"""The long-context training keys end to end: rope_scaling when continuing pretraining at a longer
cutoff_len (the run's config.json as transformers reads it, and its logits), tiled_mlp (the same losses
as untiled), and their refusals before anything is written."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import DEMO_TOKENIZER, TINY_INIT_ARGS, tiny_run_keys

from bumblecore.args import TrainArgs
from bumblecore.cli import main

DEMO = Path(__file__).resolve().parents[2] / "bumblecore" / "demo_data"


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A tiny model trained on 32 positions (pretrained for a few steps, so its weights are not the init)."""
    root = tmp_path_factory.mktemp("long")
    main(["init_model", *TINY_INIT_ARGS, "--max_position_embeddings", "32", "--tokenizer_path", str(DEMO_TOKENIZER),
          "--output_dir", str(root / "init")])  # fmt: skip
    train(root / "short", root / "init", "pretrain", cutoff_len=32, max_steps=2)
    tokenizer_config = root / "short" / "tokenizer_config.json"  # as long as the model's positions
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "model_max_length": 32}))
    return root / "short"


def train(output_dir, model, stage, **keys):
    config = tiny_run_keys(
        training_stage=stage,
        model_name_or_path=str(model),
        dataset_path=str(DEMO / "pretrain.jsonl"),
        output_dir=str(output_dir),
        report_to="none",
        **keys,
    )
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line)["loss"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_continue_pretraining_with_yarn_saves_what_transformers_reads(tmp_path, short_model):
    """rope_scaling yarn (LLaMA-Factory's bare form: factor ceil(128 / 32) = 4): the saved config.json has
    transformers' rope_parameters and 4x the positions, and transformers' model from it gives our logits."""
    from transformers import AutoModelForCausalLM

    from bumblecore import Bumblebee

    train(tmp_path / "long", short_model, "continue_pretrain", rope_scaling="yarn")
    raw = json.loads((tmp_path / "long" / "config.json").read_text())
    assert raw["max_position_embeddings"] == 128
    assert raw["rope_parameters"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1_000_000.0
    }  # fmt: skip
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "long").eval()
    ours = Bumblebee.from_pretrained(tmp_path / "long").eval()
    ids = torch.randint(0, 768, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4
    tokenizer_config = json.loads((tmp_path / "long" / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 128  # the tokenizer says the new length too


def test_tiled_mlp_trains_the_same_losses(tmp_path, short_model):
    plain = train(tmp_path / "plain", short_model, "continue_pretrain", enable_gradient_checkpointing=True)
    tiled = train(tmp_path / "tiled", short_model, "continue_pretrain", enable_gradient_checkpointing=True, tiled_mlp=3)
    assert tiled == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"activation_offload": True, "enable_gradient_checkpointing": True}, "this run is on cpu"),
        ({"activation_offload": True}, "needs enable_gradient_checkpointing: true"),
        ({"rope_scaling": "yarn", "finetuning_type": "lora"}, "a LoRA adapter does not carry"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2}}, "cutoff_len 128 is beyond the 64 positions"),
        ({"rope_scaling": {"rope_type": "ntk", "factor": 2}}, "rope_scaling.rope_type='ntk' is not supported"),
        ({"tiled_mlp": -2}, "tiled_mlp must be >= 0"),
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 2}, "sequence_parallel_size": 2},
            "each rank would scale by its own slice",
        ),
    ],
)
def test_refused_before_anything_is_written(tmp_path, short_model, keys, message):
    from bumblecore.train.run import train as train_run

    out = tmp_path / "refused"
    run = TrainArgs.from_flat(model_name_or_path=str(short_model), dataset_path=str(DEMO / "pretrain.jsonl"),
                              output_dir=str(out), cutoff_len=128, training_stage="continue_pretrain", **keys)  # fmt: skip
    with pytest.raises(ValueError, match=message):
        train_run(run)
    assert not out.exists()
