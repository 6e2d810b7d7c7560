"""Reward models (model/reward.py) against transformers' AutoModelForSequenceClassification: a reward
model built from a causal LM and saved in the HF layout loads in transformers with the same scores,
read at the last non-pad token; a saved one loads back here; other families go through transformers."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification

from bumblecore.model.reward import RewardBumblebee, TransformersReward, is_reward_model, load_reward_model

SHAPE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# family -> (config class, causal LM class, extra config, the reward model's architecture)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(), "Qwen2ForSequenceClassification"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False), "LlamaForSequenceClassification"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32), "Qwen3ForSequenceClassification"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6), "MistralForSequenceClassification"),
}
PAD = 0


def causal_lm(family, path):
    config_name, model_name, extra, _ = FAMILIES.get(family, (None, None, None, None))
    torch.manual_seed(0)
    if config_name is None:  # a family Bumblebee does not implement
        config = transformers.Phi3Config(**SHAPE)
        model = transformers.Phi3ForCausalLM(config)
    else:
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**{**SHAPE, **extra}))
    with torch.no_grad():  # norms start at 1: perturb them so a norm slip shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def padded_batch():
    """Rows of different lengths, right- and left-padded, and one whose last token is not padding."""
    ids = torch.randint(3, SHAPE["vocab_size"], (4, 11), generator=torch.Generator().manual_seed(1))
    ids[0, 7:] = PAD
    ids[1, :3] = PAD
    ids[2, 5:] = PAD
    return ids, (ids != PAD).long()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reward_model_from_a_causal_lm_saves_as_transformers_loads_it(family, tmp_path):
    lm_dir = causal_lm(family, tmp_path / "lm")
    assert not is_reward_model(lm_dir)
    torch.manual_seed(3)
    ours = load_reward_model(lm_dir, pad_token_id=PAD)
    assert isinstance(ours, RewardBumblebee) and not ours.training
    names = {name for name, _ in ours.named_parameters()}
    assert "score.weight" in names and not any(n.startswith("lm_head") for n in names)
    # transformers' init of a new head: normal(0, initializer_range)
    assert ours.score.weight.shape == (1, SHAPE["hidden_size"])
    assert abs(float(ours.score.weight.detach().std()) - SHAPE["initializer_range"]) < 0.06

    ours.save_pretrained(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["architectures"] == [FAMILIES[family][3]]
    assert saved["pad_token_id"] == PAD and saved["id2label"] == {"0": "LABEL_0"}
    assert is_reward_model(tmp_path / "rm")

    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert theirs.config.num_labels == 1 and type(theirs).__name__ == FAMILIES[family][3]
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(ours.rewards(ids, mask), expected, rtol=1e-5, atol=1e-5)
        # the same body as the causal LM's, read at transformers' last non-pad index
        torch.testing.assert_close(ours.rewards(ids), theirs(input_ids=ids).logits[:, 0], rtol=1e-5, atol=1e-5)
        again = load_reward_model(tmp_path / "rm")
        torch.testing.assert_close(again.rewards(ids, mask), expected, rtol=0, atol=0)


def test_body_is_the_causal_lms_and_the_score_seeded(tmp_path):
    lm_dir = causal_lm("qwen2", tmp_path / "lm")
    a = RewardBumblebee.from_pretrained(lm_dir, seed=7)
    b = RewardBumblebee.from_pretrained(lm_dir, seed=7)
    torch.testing.assert_close(a.score.weight, b.score.weight, rtol=0, atol=0)
    lm = transformers.AutoModelForCausalLM.from_pretrained(lm_dir)
    ids, mask = padded_batch()
    with torch.no_grad():
        hidden = a(ids, attention_mask=mask, return_hidden_states=True)
        theirs = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden[mask.bool()], theirs[mask.bool()], rtol=1e-5, atol=1e-5)


def test_other_families_go_through_transformers(tmp_path):
    lm_dir = causal_lm("phi3", tmp_path / "lm")
    torch.manual_seed(0)
    ours = load_reward_model(lm_dir, pad_token_id=PAD)
    assert isinstance(ours, TransformersReward)
    ours.save_pretrained(tmp_path / "rm")
    assert is_reward_model(tmp_path / "rm")
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(ours.rewards(ids, mask), expected, rtol=1e-5, atol=1e-5)
        # its forward's per-token scores, read at the last non-pad token, are the same rewards
        from bumblecore.model.reward import pooled

        torch.testing.assert_close(pooled(ours(ids, attention_mask=mask), ids, PAD), expected, rtol=1e-5, atol=1e-5)
