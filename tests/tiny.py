"""Tiny models for tests: a random Bumblebee in memory and a Qwen2 checkpoint written by transformers.
conftest.py offers both as fixtures (`tiny_model`, `tiny_checkpoint`); helpers outside a test import
them from here."""

from pathlib import Path

import bumblecore

DEMO_TOKENIZER = Path(bumblecore.__file__).parent / "demo_data" / "tokenizer"


def make_tiny_model(vocab_size: int = 768, seed: int = 0, **config):
    """A random Bumblebee small enough for a unit test (2 layers, hidden 64, GQA 4/2 heads, init std 0.2:
    large enough weights that greedy choices are far from ties), in eval mode."""
    import torch

    from bumblecore.model.bumblebee import Bumblebee
    from bumblecore.model.config import BumblebeeConfig

    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return Bumblebee(BumblebeeConfig(vocab_size=vocab_size, **{**shape, **config})).eval()


def write_tiny_checkpoint(out, vocab_size=None, max_position_embeddings=4096):
    """A Qwen2 model directory written by transformers itself (2 layers, hidden 64, init std 0.2) with
    the demo tokenizer: what a user's downloaded checkpoint looks like, in miniature."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab_size or -(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


# The shape the training tests share: the 0.5B preset cut to 2 layers, hidden 32, vocab 768, fp32.
TINY_INIT_ARGS = ["--preset", "0.5B", "--num_hidden_layers", "2", "--hidden_size", "32", "--intermediate_size", "64",
                  "--num_attention_heads", "4", "--num_key_value_heads", "2", "--vocab_size", "768",
                  "--torch_dtype", "float32"]  # fmt: skip


def init_tiny_model_dir(out) -> Path:
    """`bumblecore init_model` of that shape with the demo tokenizer (config + tokenizer, no weights)."""
    from bumblecore.cli import main

    main(["init_model", *TINY_INIT_ARGS, "--tokenizer_path", str(DEMO_TOKENIZER), "--output_dir", str(out)])
    return Path(out)


def tiny_run_keys(**keys) -> dict:
    """The training keys the short CPU runs share (3 fp32 steps of 2 rows of up to 128 tokens, lr 5e-3, no
    checkpoint before the end); `keys` add to or override them."""
    return {
        "cutoff_len": 128,
        "max_steps": 3,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_model_precision": "fp32",
        "save_steps": 100,
        **keys,
    }


def saved_tensor_bytes(model, forward) -> int:
    """Bytes of the tensors autograd keeps for backward while `forward()` runs, the model's weights
    excluded, each storage counted once (what an activation-memory closed form predicts)."""
    import torch

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(size for pointer, size in storages.items() if pointer not in weights)


def train_on_two_processes(config, output_dir, *options, cwd, timeout: int = 240) -> str:
    """`bumblecore train --config F --devices 2` (2 gloo ranks) in a child process; its stderr on success,
    its stderr's tail as the failure otherwise."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "bumblecore", "train", "--config", str(config), "--devices", "2"]
    result = subprocess.run(
        [*command, "--output_dir", str(output_dir), *options], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def max_weight_difference(model_dir, other_dir, file: str = "model.safetensors") -> float:
    """The largest absolute difference between two saved models' tensors."""
    from safetensors.torch import load_file

    expected, got = load_file(Path(model_dir) / file), load_file(Path(other_dir) / file)
    return max((got[k] - expected[k]).abs().max().item() for k in expected)


def one_process_and_two(config: dict, root, tolerance: float = 1e-5) -> tuple[list[dict], list[dict]]:
    """`config` (gradient_accumulation_steps 1) trained by 1 process accumulating 2 micro-batches, in
    root/one, and by 2 gloo processes of 1 micro-batch each, in root/two: asserts they end with the same
    weights and returns both metrics histories (the DDP-equals-accumulation check of every stage)."""
    import json

    import yaml

    from bumblecore.cli import main

    file = Path(root) / "ddp.yaml"
    file.write_text(yaml.safe_dump({**config, "accelerator": "cpu", "gradient_accumulation_steps": 1}))
    main(
        ["train", "--config", str(file), "--output_dir", str(Path(root) / "one"), "--gradient_accumulation_steps", "2"]
    )
    train_on_two_processes(file, Path(root) / "two", cwd=root)
    worst = max_weight_difference(Path(root) / "one", Path(root) / "two")
    assert worst < tolerance, f"max weight difference {worst}"
    return tuple(
        [json.loads(line) for line in (Path(root) / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    )


def printed_evaluations(text: str) -> list[dict]:
    """The `eval step S/T: loss L, key V, ...` lines a run printed, as {"step", "eval/loss", "eval/key": V}
    records to compare with metrics.jsonl's (the line shows four significant digits)."""
    import re

    found = []
    for step, shown in re.findall(r"^eval step (\d+)/\d+: (.+)$", text, flags=re.MULTILINE):
        record = {"step": int(step)}
        for item in shown.split(", "):
            key, value = item.rsplit(" ", 1)
            record[f"eval/{key}"] = float(value)
        found.append(record)
    return found


def assert_evaluations_printed(text: str, history: list[dict], headline: tuple) -> None:
    """Every evaluation of metrics.jsonl was printed once, in order, as its loss and the stage's headline metrics."""
    import pytest

    evaluations = [r for r in history if "eval/loss" in r]
    printed = printed_evaluations(text)
    assert [p["step"] for p in printed] == [r["step"] for r in evaluations], text[-2000:]
    for shown, record in zip(printed, evaluations):
        assert set(shown) == {"step", "eval/loss", *(f"eval/{key}" for key in headline)}
        for key, value in shown.items():
            assert value == pytest.approx(record[key], rel=1e-3, abs=1e-4), key


def write_tiny_reward_model(out, seed: int = 0, chat_template=None):
    """A random Qwen2ForSequenceClassification (num_labels 1, pad_token_id the tokenizer's) written by
    transformers with the demo tokenizer (and `chat_template` instead of its ChatML when given): what
    training_stage rm saves, in miniature."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForSequenceClassification(config).save_pretrained(out)
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out))
    return Path(out)


def transformers_rewards(model_dir, conversations: list[list[dict]]) -> list[float]:
    """The oracle: transformers renders each conversation whole with the directory's chat template and
    AutoModelForSequenceClassification scores it alone (no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    scores = []
    with torch.no_grad():
        for messages in conversations:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            scores.append(model(input_ids=ids).logits[0, 0].item())
    return scores
