"""LoRA adapters for any family: adapters written by other tools (peft task_type CAUSAL_LM) load
everywhere a model dir does, every linear layer gets an adapter by default, and LoRA trained on a
family Bumblebee does not implement merges and generates. Oracle: the unmerged peft model on
transformers' own class."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Phi3Config, Qwen2Config

import bumblecore
from bumblecore.cli import main

DEMO = Path(bumblecore.__file__).parent / "demo_data"


@pytest.fixture(scope="module")
def tok(demo_tok):
    return demo_tok


def save_family(model_dir, config, tok):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_dir)
    tok.save_pretrained(str(model_dir))
    return model_dir


def phi3(tok):
    return Phi3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        max_position_embeddings=256,
    )


def peft_adapter(base_dir, adapter_dir, task_type="CAUSAL_LM"):
    """What peft's docs, TRL and LLaMA-Factory write: an adapter over transformers' own class."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task_type)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained-looking adapter (peft starts B at zero)
    model.save_pretrained(adapter_dir)


def unmerged_logits(base_dir, adapter_dir, ids):
    from peft import PeftModel

    with torch.no_grad():
        return (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
            .eval()(ids)
            .logits
        )


def test_default_targets_are_every_linear_layer_of_the_family():
    from bumblecore.model.lora import linear_layer_names

    with torch.device("meta"):
        phi = AutoModelForCausalLM.from_config(
            Phi3Config(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                pad_token_id=0,
            )
        )
    assert sorted(linear_layer_names(phi)) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    from bumblecore.model.bumblebee import Bumblebee
    from bumblecore.model.config import BumblebeeConfig

    qwen = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        hf_qwen = AutoModelForCausalLM.from_config(qwen)
        ours = Bumblebee(
            BumblebeeConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    assert linear_layer_names(ours) == linear_layer_names(hf_qwen)
    assert sorted(linear_layer_names(hf_qwen)) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_a_causal_lm_adapter_from_other_tools_generates_and_merges(tmp_path, tok, task_type):
    from bumblecore.inference.loading import load_for_inference
    from bumblecore.model.lora import merge_lora

    base = save_family(
        tmp_path / "base",
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        tok,
    )
    peft_adapter(base, tmp_path / "adapter", task_type)
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    expected = unmerged_logits(base, tmp_path / "adapter", ids)
    model, _, _ = load_for_inference(str(tmp_path / "adapter"), device_map="cpu")  # Bumblebee runs Qwen2
    with torch.no_grad():
        assert (model(ids) - expected).abs().max() < 1e-4
    merge_lora(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_lora_on_a_transformers_family_trains_merges_generates_and_serves(tmp_path, tok):
    from bumblecore.inference.generate import GenerationEngine, SamplingParams
    from bumblecore.inference.loading import load_for_inference
    from bumblecore.model.lora import merge_lora

    base = save_family(tmp_path / "phi3", phi3(tok), tok)
    lines = open(DEMO / "sft_train.jsonl", encoding="utf-8").read().splitlines()[:16]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "training_stage": "sft",
        "model_name_or_path": str(base),
        "dataset_path": str(tmp_path / "sft.jsonl"),
        "output_dir": str(tmp_path / "lora"),
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "cutoff_len": 96,
        "max_steps": 2,
        "learning_rate": 5e-2,
        "save_steps": 100,
        "train_micro_batch_size_per_gpu": 2,
        "train_model_precision": "fp32",
        "packing": False,
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    main(["train", "--config", str(tmp_path / "lora.yaml")])
    adapter = tmp_path / "lora"
    saved = yaml.safe_load((adapter / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]

    # A plain peft user applies it to transformers' own Phi-3: every adapter tensor lands (none left at zero).
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    expected = unmerged_logits(base, adapter, ids)
    with torch.no_grad():
        assert (
            AutoModelForCausalLM.from_pretrained(base)(ids).logits - expected
        ).abs().max() > 1e-3  # training moved it

    merge_lora(str(base), str(adapter), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "Phi3ForCausalLM"
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max() < 1e-4

    model, tokenizer, _ = load_for_inference(str(adapter), device_map="cpu")
    prompt = tok("The bee reads", add_special_tokens=False)["input_ids"]
    result = GenerationEngine(model, tokenizer, max_batch_size=1, max_len=64, eos_token_ids=[]).generate(
        [prompt], SamplingParams(max_new_tokens=5)
    )[0]
    reference = merged.generate(
        torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert result["token_ids"] == reference[0, len(prompt) :].tolist()

    # served as it is: the worker loads the adapter on transformers' Phi-3 and answers like `generate` does
    from openai import OpenAI
    from serving import running_server  # tests/serving.py

    with running_server(str(adapter), device_map="cpu", training_stage="pretrain") as url:
        reply = OpenAI(base_url=url + "/v1", api_key="none").chat.completions.create(
            model="bumblebee",
            messages=[{"role": "user", "content": "The bee reads"}],
            max_tokens=5,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    assert reply.choices[0].message.content == tok.decode(reference[0, len(prompt) :])
