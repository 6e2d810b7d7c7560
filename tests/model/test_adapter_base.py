"""Issue 29, item 4: a LoRA adapter knows the base it was trained on. Training records the base's
fingerprint beside every adapter it saves (the final one and each checkpoint-<step>); generate, chat,
serve and merge_lora refuse the adapter on another base, naming both, unless forced; resuming on
another base is refused too. Adapters saved before fingerprints still load, with a note."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny import write_tiny_checkpoint

import bumblecore
from bumblecore.cli import main
from bumblecore.model.adapter_base import FINGERPRINT_FILE, base_fingerprint, fingerprint_difference

DEMO = Path(bumblecore.__file__).parent / "demo_data"


def reinitialised(base: Path, seed: int) -> None:
    """Replace the weights of `base` by another initialisation of the same config (same shapes, names, sizes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    model.save_pretrained(base)


def run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    out = capsys.readouterr()
    return status, out.out + out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step LoRA SFT run on a tiny Qwen2 base, a checkpoint at step 1; the base kept aside as `original`."""
    root = tmp_path_factory.mktemp("adapter_base")
    write_tiny_checkpoint(root / "base")
    shutil.copytree(root / "base", root / "original")
    (root / "sft.jsonl").write_text("".join(open(DEMO / "sft_train.jsonl", encoding="utf-8").readlines()[:8]))
    config = {
        "training_stage": "sft",
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_alpha": 8,
        "model_name_or_path": str(root / "base"),
        "dataset_path": str(root / "sft.jsonl"),
        "output_dir": str(root / "adapter"),
        "cutoff_len": 128,
        "max_steps": 2,
        "save_steps": 1,
        "learning_rate": 5e-2,
        "warmup_ratio": 0.0,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_model_precision": "fp32",
        "accelerator": "cpu",
        "cache_dir": str(root / "cache"),
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    main(["train", "--config", str(root / "run.yaml")])
    return root


def test_every_saved_adapter_records_its_base_and_peft_still_loads_it(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for adapter in (trained / "adapter", trained / "adapter" / "checkpoint-1"):
        recorded = json.loads((adapter / FINGERPRINT_FILE).read_text())
        raw = json.loads((trained / "base" / "config.json").read_text())
        assert recorded["base_model_name_or_path"] == str((trained / "base").resolve())
        assert {
            k: raw[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        }.items() <= recorded["config"].items()
        assert fingerprint_difference(recorded, trained / "base") is None
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained / "base"), adapter)
        assert any("lora_A" in name for name, _ in model.named_parameters())


def test_the_checksum_tells_apart_another_initialisation_and_one_changed_tensor(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    recorded = base_fingerprint(trained / "original")
    other = tmp_path / "other"
    shutil.copytree(trained / "original", other)
    weights = load_file(other / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = torch.randn_like(weights[name]) * weights[name].std()  # one retrained tensor, same shape
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert (other / "model.safetensors").stat().st_size == (trained / "original" / "model.safetensors").stat().st_size
    assert "weights differ" in fingerprint_difference(recorded, other)
    reinitialised(other, seed=1)
    assert "weights differ" in fingerprint_difference(recorded, other)
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 1}))
    assert fingerprint_difference(recorded, other) == "its config differs (num_hidden_layers 2 -> 1)"


@pytest.fixture
def replaced_base(trained):
    """The adapter's base directory now holds another initialisation of the same model; restored after."""
    reinitialised(trained / "base", seed=1)
    yield trained
    shutil.rmtree(trained / "base")
    shutil.copytree(trained / "original", trained / "base")


def test_generate_chat_serve_and_merge_refuse_the_adapter_on_another_base(replaced_base, capsys):
    from bumblecore.inference.commands import chat
    from bumblecore.inference.serve import serve

    root = replaced_base
    adapter, base = root / "adapter", root / "base"
    expected = f"the LoRA adapter {adapter} was trained on another base than {base}: its weights differ"
    status, output = run(["generate", "--model_path", str(adapter), "--prompt", "hi", "--max_new_tokens", "4"], capsys)
    assert (
        status == 1
        and expected in output
        and "was rewritten after the adapter was trained on it" in output
        and "--ignore_base_mismatch" in output
        and "Traceback" not in output
    )
    merge = ["merge_lora", "--base_model_path", str(base), "--lora_model_path", str(adapter)]
    status, output = run([*merge, "--save_path", str(root / "merged")], capsys)
    assert status == 1 and expected in output and not (root / "merged").exists()
    with pytest.raises(ValueError, match="trained on another base"):
        chat(str(adapter))
    with pytest.raises(ValueError, match="trained on another base"):
        serve(str(adapter), port=0)
    # Forced, each runs on the base given.
    status, output = run(
        ["generate", "--model_path", str(adapter), "--prompt", "hi", "--max_new_tokens", "4", "--ignore_base_mismatch"],
        capsys,
    )
    assert status == 0 and "note: ignore_base_mismatch: applying" in output
    status, output = run([*merge, "--save_path", str(root / "merged"), "--ignore_base_mismatch"], capsys)
    assert status == 0 and (root / "merged" / "model.safetensors").is_file()


def test_the_real_base_given_explicitly_needs_no_force_and_gives_the_same_answer(replaced_base, capsys):
    root = replaced_base
    prompt = ["--prompt", "What is 2+2?", "--max_new_tokens", "8"]
    status, moved = run(
        ["generate", "--model_path", str(root / "adapter"), "--base_model_path", str(root / "original"), *prompt],
        capsys,
    )
    assert status == 0, moved
    shutil.rmtree(root / "base")
    shutil.copytree(root / "original", root / "base")
    status, unchanged = run(["generate", "--model_path", str(root / "adapter"), *prompt], capsys)
    assert status == 0 and "note:" not in unchanged
    answer = [line for line in unchanged.splitlines() if not line.startswith("generated ")]
    assert answer == [line for line in moved.splitlines() if not line.startswith("generated ")]


def test_resuming_a_lora_run_on_another_base_is_refused(replaced_base, capsys):
    root = replaced_base
    status, output = run(["train", "--config", str(root / "run.yaml"), "--resume_from_checkpoint", "latest"], capsys)
    assert status == 1 and "holds a LoRA adapter trained on another base than model_name_or_path" in output
    assert "its weights differ" in output


def test_an_adapter_saved_before_fingerprints_loads_with_a_note(trained, tmp_path, capsys):
    from bumblecore.inference.loading import load_for_inference

    old = tmp_path / "old_adapter"
    shutil.copytree(trained / "adapter", old, ignore=shutil.ignore_patterns("checkpoint-*", FINGERPRINT_FILE))
    capsys.readouterr()
    load_for_inference(str(old), "float32", "cpu")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {old} has no {FINGERPRINT_FILE} (saved before adapters recorded their base): cannot check "
        f"that {trained / 'base'} is the base it was trained on"
    ]
