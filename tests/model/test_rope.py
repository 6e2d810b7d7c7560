"""RoPE scaling (model/rope.py) against transformers' rotary embeddings: cos/sin of every type, the
config.json forms (transformers 5's rope_parameters, transformers 4's rope_scaling) read and written as
transformers does, and the training key rope_scaling's checks. (Logits: tests/model/test_model.py.)"""

import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from bumblecore.model.config import BumblebeeConfig
from bumblecore.model.hf_config import config_from_hf_dict, config_to_hf_dict
from bumblecore.model.rope import context_scaling, rotary_cos_sin

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=64)  # fmt: skip
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_attention_factor": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 32,
        "attention_factor": 1.3,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.9, "mscale_all_dim": 0.7},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def theirs_and_ours(scaling: dict, layout: str):
    """transformers' Qwen2 config and rotary embedding, and ours read from its config.json in `layout`."""
    hf_config = Qwen2Config(**SHAPE, rope_parameters=dict(scaling))
    raw = hf_config.to_dict()  # transformers 5 writes rope_parameters
    if layout == "transformers4":  # the same settings as transformers 4 wrote them: top level
        params = dict(raw.pop("rope_parameters"))
        raw["rope_theta"] = params.pop("rope_theta")
        raw["rope_scaling"] = params
    return hf_config, Qwen2RotaryEmbedding(hf_config), config_from_hf_dict(raw)


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("longest", [40, 200])  # inside and past max_position_embeddings (64)
def test_cos_sin_equal_transformers(name, layout, longest):
    _, rotary, config = theirs_and_ours(SCALINGS[name], layout)
    assert config.rope_scaling["rope_type"] == SCALINGS[name]["rope_type"]
    positions = torch.stack([torch.arange(longest), torch.arange(longest).flip(0)])  # any order, two rows
    x = torch.zeros(1, dtype=torch.float32)
    their_cos, their_sin = rotary(x, positions)
    our_cos, our_sin = rotary_cos_sin(config, positions, torch.float32, {})
    torch.testing.assert_close(our_cos, their_cos, rtol=0, atol=2e-6)
    torch.testing.assert_close(our_sin, their_sin, rtol=0, atol=2e-6)


def test_dynamic_grows_past_max_positions_only():
    """Dynamic NTK: the same frequencies as plain RoPE up to max_position_embeddings, a larger base past it."""
    config = BumblebeeConfig(**SHAPE, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    plain = BumblebeeConfig(**SHAPE)
    inside = torch.arange(64)[None]
    torch.testing.assert_close(
        rotary_cos_sin(config, inside, torch.float32, {}), rotary_cos_sin(plain, inside, torch.float32, {})
    )
    past = torch.arange(128)[None]
    assert not torch.allclose(
        rotary_cos_sin(config, past, torch.float32, {})[0], rotary_cos_sin(plain, past, torch.float32, {})[0]
    )


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn", "llama3"])
def test_saved_rope_parameters_are_transformers_own(name):
    """config.json carries rope_parameters exactly as transformers 5 writes them (and transformers 4's
    top-level rope_theta / rope_scaling beside), and reads back to the same config."""
    hf_config, _, config = theirs_and_ours(SCALINGS[name], "transformers5")
    written = config_to_hf_dict(config)
    assert written["rope_parameters"] == hf_config.to_dict()["rope_parameters"]
    assert written["rope_theta"] == 10000.0 and written["rope_scaling"]["factor"] == SCALINGS[name]["factor"]
    assert config_from_hf_dict(written).to_dict() == config.to_dict()
    assert (
        Qwen2Config(**{k: v for k, v in written.items() if k not in ("architectures", "model_type")}).rope_parameters
        == hf_config.rope_parameters
    )


def test_unknown_rope_setting_and_type_are_refused_by_name():
    with pytest.raises(ValueError, match="rope_scaling: low_freq_factor is not a setting of rope_type yarn"):
        BumblebeeConfig(**SHAPE, rope_scaling={"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type='longrope' is not supported"):
        BumblebeeConfig(**SHAPE, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling.factor must be a number >= 1"):
        BumblebeeConfig(**SHAPE, rope_scaling={"rope_type": "linear", "factor": 0.5})


def test_training_key_extends_the_context():
    """rope_scaling (the training key): a mapping, or LLaMA-Factory's bare type with the factor from
    cutoff_len; max_position_embeddings grows by the factor (dynamic keeps it: it grows from there)."""
    model = BumblebeeConfig(**SHAPE)
    scaling, positions = context_scaling({"rope_type": "yarn", "factor": 4}, model, cutoff_len=256)
    assert scaling == {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64} and positions == 256
    scaling, positions = context_scaling("linear", model, cutoff_len=150)
    assert scaling == {"rope_type": "linear", "factor": 3.0} and positions == 192
    scaling, positions = context_scaling("llama3", model, cutoff_len=128)
    assert scaling["low_freq_factor"] == 1.0 and scaling["high_freq_factor"] == 4.0 and positions == 128
    assert context_scaling({"rope_type": "dynamic", "factor": 2}, model, cutoff_len=1000)[1] == 64
    with pytest.raises(ValueError, match="cutoff_len 300 is beyond the 256 positions rope_scaling factor 4 reaches"):
        context_scaling({"rope_type": "yarn", "factor": 4}, model, cutoff_len=300)
    with pytest.raises(ValueError, match="rope_scaling linear: cutoff_len 64 fits the model's 64 positions"):
        context_scaling("linear", model, cutoff_len=64)
    with pytest.raises(ValueError, match="rope_scaling: rope_type yarn needs"):
        context_scaling({"rope_type": "yarn"}, model, cutoff_len=64)
    scaled = BumblebeeConfig(**{**SHAPE, "max_position_embeddings": 256}, rope_scaling=scaling_of("yarn"))
    assert context_scaling({"rope_type": "yarn", "factor": 4.0}, scaled, cutoff_len=256) == (scaled.rope_scaling, 256)
    with pytest.raises(ValueError, match="already has rope scaling"):
        context_scaling({"rope_type": "linear", "factor": 2}, scaled, cutoff_len=256)


def scaling_of(name):
    return dict(SCALINGS[name])
