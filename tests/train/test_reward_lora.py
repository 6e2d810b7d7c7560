"""LoRA reward models (model/lora.py on model/reward.py): the adapter on the body and the `score` head
trained in full beside it, as peft's SEQ_CLS task has it. Oracles: peft itself (the adapter it writes
for transformers' *ForSequenceClassification, and PeftModel.from_pretrained over transformers' model
giving our scores) and transformers (a merged reward model's scores equal the unmerged peft model's)."""

import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import DEMO_TOKENIZER, write_tiny_checkpoint
from transformers import AutoModelForSequenceClassification

from bumblecore.model.lora import apply_lora, linear_layer_names, merge_lora, save_adapter
from bumblecore.model.reward import load_reward_model
from bumblecore.tokenizer import load_tokenizer

TOLERANCE = 1e-5  # fp32 scores of the same weights through two implementations
# A merged weight W + scale * B @ A is rounded once more in fp32: measured up to 7e-6 of max|score|.
MERGED_TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO_TOKENIZER)


def phi3_checkpoint(out, tokenizer):
    """A family Bumblebee does not implement: its reward model goes through transformers."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.Phi3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=["qwen2", "phi3"])
def base(request, tmp_path_factory, tokenizer):
    """A causal LM directory (the model a reward model starts from): Qwen2 runs natively, Phi-3 through transformers."""
    out = tmp_path_factory.mktemp(request.param)
    return write_tiny_checkpoint(out) if request.param == "qwen2" else phi3_checkpoint(out, tokenizer)


def padded_batch(tokenizer):
    """Rows of different lengths, right- and left-padded: each score is read at the row's last real token."""
    pad = tokenizer.pad_token_id
    ids = torch.randint(3, 400, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 8:] = pad
    ids[1, :4] = pad
    return ids, (ids != pad).long()


def trained_reward_adapter(base, tokenizer, out):
    """Our LoRA reward model over `base`, every trainable tensor moved off its init (as training would),
    saved as the run saves it; returns the live peft model."""
    model = apply_lora(load_reward_model(base, "float32", pad_token_id=tokenizer.pad_token_id), 4, 8, 0.0)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    save_adapter(model, out, str(base))
    tokenizer.save_pretrained(str(out))
    return model.eval()


def peft_over_transformers(base, adapter, pad):
    """The oracle: peft's own loading of the adapter over transformers' reward model of the base."""
    body = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad)
    return PeftModel.from_pretrained(body, str(adapter)).eval()


def test_the_head_trains_in_full_beside_the_adapter(base, tokenizer, tmp_path):
    model = trained_reward_adapter(base, tokenizer, tmp_path / "adapter")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    heads = [n for n in trainable if "score" in n]
    hidden = model.get_base_model().config.hidden_size
    assert heads == [f"{heads[0].split('score')[0]}score.modules_to_save.default.weight"]
    assert trainable[heads[0]] == hidden
    assert all("lora_" in n for n in trainable if n not in heads)
    fresh = load_reward_model(base, "float32")
    assert "score" not in linear_layer_names(fresh)  # the head is not an adapter target


def test_our_adapter_is_what_peft_writes_and_gives_our_scores_in_peft(base, tokenizer, tmp_path):
    ours = trained_reward_adapter(base, tokenizer, tmp_path / "ours")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    targets, pad = ours_config["target_modules"], tokenizer.pad_token_id
    # peft's own adapter for transformers' reward model of the same base, the same targets
    body = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad)
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    get_peft_model(body, config).save_pretrained(str(tmp_path / "peft"))
    theirs_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("task_type", "modules_to_save", "peft_type", "r", "lora_alpha"):
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])
    theirs_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours_tensors) == sorted(theirs_tensors) and "base_model.model.score.weight" in ours_tensors
    assert all(ours_tensors[k].shape == theirs_tensors[k].shape for k in ours_tensors)

    ids, mask = padded_batch(tokenizer)
    with torch.no_grad():
        expected = peft_over_transformers(base, tmp_path / "ours", pad)(input_ids=ids, attention_mask=mask).logits[:, 0]
        got = ours.rewards(ids, mask)
    assert (got - expected).abs().max().item() < TOLERANCE


def test_merge_lora_writes_a_reward_model_scoring_as_the_unmerged_one(base, tokenizer, tmp_path, capsys):
    ours = trained_reward_adapter(base, tokenizer, tmp_path / "adapter")
    merge_lora(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert "max logit difference merged vs unmerged" in capsys.readouterr().out
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 1
    assert config["pad_token_id"] == tokenizer.pad_token_id

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    trained_head = load_file(tmp_path / "adapter" / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert torch.equal(merged.score.weight, trained_head)  # the head as trained, not the base's new one
    ids, mask = padded_batch(tokenizer)
    with torch.no_grad():
        unmerged = peft_over_transformers(base, tmp_path / "adapter", tokenizer.pad_token_id)
        expected = unmerged(input_ids=ids, attention_mask=mask).logits[:, 0]
        got = merged(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert (ours.rewards(ids, mask) - expected).abs().max().item() < TOLERANCE
    assert (got - expected).abs().max().item() < MERGED_TOLERANCE * expected.abs().max().item()
