"""The LoRA variants through peft (model/lora_options.py): DoRA, rsLoRA, PiSSA / OLoRA initialisation,
LoRA+ and modules_to_save. Oracles: peft's own loader on the transformers model of the ORIGINAL base
(the saved adapter gives our logits), `bumblecore merge_lora`'s checks, LoRA+'s groups in closed form,
a resumed run equal to the uninterrupted one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny import DEMO_TOKENIZER, train_on_two_processes, write_tiny_checkpoint

from bumblecore.args import LoraArgs
from bumblecore.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = DEMO_TOKENIZER.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    file = tmp_path_factory.mktemp("data") / "sft.jsonl"
    file.write_text("\n".join((DEMO / "sft_train.jsonl").read_text().splitlines()[:64]) + "\n", encoding="utf-8")
    return file


def lora_model(base, **variant):
    from bumblecore.model.bumblebee import Bumblebee
    from bumblecore.model.lora import apply_lora
    from bumblecore.model.lora_options import lora_config_options

    torch.manual_seed(0)
    return apply_lora(Bumblebee.from_pretrained(base), 4, 8, 0.0, variants=lora_config_options(LoraArgs(**variant)))


VARIANTS = {
    "dora": dict(use_dora=True),
    "rslora": dict(use_rslora=True),
    "gaussian": dict(lora_init="gaussian"),
    "pissa": dict(lora_init="pissa"),
    "pissa_niter_2": dict(lora_init="pissa_niter_2"),
    "olora+dora+rslora": dict(lora_init="olora", use_dora=True, use_rslora=True),
    "modules_to_save": dict(lora_modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_a_saved_adapter_is_peft_loadable_on_the_original_base_and_merges(tmp_path, base, name):
    """As if trained (every trainable tensor moved), saved, then loaded by peft onto the transformers model
    of the original base: the same logits as our model (PiSSA / OLoRA: saved as the rank-2r update relative
    to the original base); `merge_lora`'s weight and logit checks pass."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bumblecore.model.lora import merge_lora, save_adapter

    model = lora_model(base, **VARIANTS[name])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(model, tmp_path / "adapter", str(base))
    ids = torch.randint(0, 700, (2, 12), generator=torch.Generator().manual_seed(1))
    oracle = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter"
    )
    with torch.no_grad():
        ours, theirs = model.eval()(ids), oracle.eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    converted = name.startswith(("pissa", "olora"))
    assert config["r"] == (8 if converted else 4)
    assert config["init_lora_weights"] == (
        True if converted else {"default": True}.get(VARIANTS[name].get("lora_init", "default"), "gaussian")
    )
    assert config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"]) == pytest.approx(
        8 / (4**0.5 if config["use_rslora"] else 4)
    )  # the same scale as trained
    merge_lora(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").is_file()


def test_loraplus_groups_in_closed_form(base):
    """LoRA+: the B matrices at ratio x lr, the rest at lr; weight decay for matrices only (DoRA's
    magnitudes are vectors); group 0 (the logged lr) is the base lr."""
    from bumblecore.train.optimizers import parameter_groups

    model = lora_model(base, use_dora=True)
    groups = parameter_groups(model, 0.1, 1e-3, loraplus_lr_ratio=16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    got = [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    b = sorted(n for n in trainable if ".lora_B." in n)
    a = sorted(n for n in trainable if ".lora_A." in n)
    magnitudes = sorted(n for n in trainable if "lora_magnitude_vector" in n)
    assert len(b) == len(a) == len(magnitudes) == 14 and len(trainable) == 42
    assert got == [(1e-3, 0.1, a), (1e-3, 0.0, magnitudes), (1e-3 * 16.0, 0.1, b), (1e-3 * 16.0, 0.0, [])]
    plain = parameter_groups(model, 0.1, 1e-3)  # without LoRA+: the two groups as always
    assert [(g["lr"], len(g["params"])) for g in plain] == [(1e-3, 28), (1e-3, 14)]


def settings(output_dir, base, data, **keys) -> dict:
    return {
        "training_stage": "sft",
        "finetuning_type": "lora",
        "model_name_or_path": str(base),
        "dataset_path": str(data),
        "output_dir": str(output_dir),
        "cutoff_len": 128,
        "max_steps": 4,
        "save_steps": 2,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_model_precision": "fp32",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        **keys,
    }


def train(output_dir, base, data, **keys):
    config = settings(output_dir, base, data, **keys)
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line)["loss"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


ALL_VARIANTS = dict(
    use_dora=True, use_rslora=True, lora_init="pissa", loraplus_lr_ratio=4.0, lora_modules_to_save=["lm_head"]
)


def test_the_variants_train_resume_exactly_and_merge(tmp_path, base, sft_data):
    """Every variant at once: the loss falls, a run resumed from step 2 continues the uninterrupted one
    exactly (PiSSA's initial adapter travels in the resume state), and the final adapter, saved relative
    to the original base, merges with the merge checks passing."""
    from bumblecore.model.lora import merge_lora

    straight = train(tmp_path / "a", base, sft_data, **ALL_VARIANTS)
    assert straight[-1] < straight[0] - 1.0
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed / "checkpoint-2")
    again = train(resumed, base, sft_data, **ALL_VARIANTS, resume_from_checkpoint="latest")
    assert again == straight[2:]
    weights = "adapter_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (resumed / weights).read_bytes()
    merge_lora(str(base), str(tmp_path / "a"), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_what_cannot_be_made_correct_is_refused_before_anything_is_written(tmp_path, base, sft_data):
    from bumblecore.args import TrainArgs
    from bumblecore.train.run import train as run_train

    def refused(name, data=sft_data, **keys):
        return run_train(TrainArgs.from_flat(**settings(tmp_path / name, base, data, **keys)))

    zero3 = str(REPO / "configs" / "deepspeed" / "ds_z3_config.json")
    with pytest.raises(ValueError, match="use_dora, lora_modules_to_save with ZeRO-3"):
        refused("z3", use_dora=True, lora_modules_to_save=["lm_head"], deepspeed_config_path=zero3)
    # DPO's reference is the policy with its adapter off: under OLoRA that is not the original model.
    with pytest.raises(ValueError, match="lora_init olora .* reference"):
        refused("dpo", DEMO / "dpo_train.jsonl", training_stage="dpo", lora_init="olora")
    with pytest.raises(ValueError, match="lora_init 'svd' is not one of default, gaussian, pissa, pissa_niter_N"):
        refused("bad", lora_init="svd")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_variants_on_two_processes_under_zero2_equal_one_process(tmp_path, base, sft_data):
    """The same global batch: 1 process accumulating 2 micro-batches, and 2 gloo ranks under ZeRO-2 (LoRA+'s
    groups and DoRA's magnitudes partitioned): the same losses and adapter."""
    from tiny import max_weight_difference

    keys = dict(max_steps=3, save_steps=None, accelerator="cpu", gradient_accumulation_steps=2, **ALL_VARIANTS)
    one = train(tmp_path / "one", base, sft_data, **keys)
    config = yaml.safe_load((tmp_path / "one.yaml").read_text())
    config.update(
        gradient_accumulation_steps=1, deepspeed_config_path=str(REPO / "configs/deepspeed/ds_z2_config.json")
    )
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    train_on_two_processes(tmp_path / "two.yaml", tmp_path / "two", cwd=tmp_path)
    two = [json.loads(line)["loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert two == pytest.approx(one, abs=1e-5)
    assert max_weight_difference(tmp_path / "one", tmp_path / "two", "adapter_model.safetensors") < 5e-5


def test_the_memory_plan_counts_the_modules_trained_in_full(base, sft_data):
    """lora_modules_to_save [lm_head]: peft trains a full copy of the head (vocab x hidden) beside the adapters."""
    from bumblecore.args import TrainArgs
    from bumblecore.train.setup import count_parameters

    def counted(**keys):
        flat = dict(model_name_or_path=str(base), dataset_path=str(sft_data), finetuning_type="lora", lora_rank=4)
        return count_parameters(TrainArgs.from_flat(**flat, **keys))

    config = json.loads((base / "config.json").read_text())
    head = config["vocab_size"] * config["hidden_size"]
    (total, trainable), (total_saved, trainable_saved) = counted(), counted(lora_modules_to_save=["lm_head"])
    assert (total_saved - total, trainable_saved - trainable) == (head, head)
