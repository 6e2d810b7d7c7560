"""Hugging Face config.json <-> BumblebeeConfig: which families Bumblebee expresses exactly (`qwen2`:
qkv bias, RMSNorm, the presets; `qwen3`: per-head q/k RMSNorm; `llama`: no bias; `mistral`: Llama's
layout with a sliding window; else `bumblebee`, e.g. LayerNorm, which only bumblecore loads), and dtypes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from bumblecore.model.config import ACTIVATIONS, BumblebeeConfig
from bumblecore.model.rope import normalize_rope_scaling, rope_parameters

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "bumblebee")
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "bumblebee": "BumblebeeForCausalLM",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# config.json keys that give the weights' shapes (model/adapter_base.py fingerprints a base by them too).
SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
# config.json keys that map 1:1 onto BumblebeeConfig fields.
_SHARED_KEYS = (
    *SHAPE_KEYS,
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "hidden_act",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Keys we write or interpret ourselves; anything else read from config.json is carried in `extra`.
_HANDLED_KEYS = set(_SHARED_KEYS) | {
    "model_type",
    "architectures",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "norm_type",
    "attn_implementation",
    "torch_dtype",
    "dtype",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "transformers_version",
    "use_cache",
    "attention_dropout",
    "pretraining_tp",
    "_name_or_path",
    "qk_norm",
    "family",
}


# ---------------------------------------------------------------------------- config.json


def config_from_hf_dict(raw: dict, source: str = "config.json") -> BumblebeeConfig:
    """Translate a transformers 4 or 5 config.json (qwen2, qwen3, llama, mistral or bumblebee) into a BumblebeeConfig."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not a Bumblebee family (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "other architectures train through transformers' AutoModelForCausalLM"
        )
    missing = unsupported_features(raw)
    if missing:
        raise ValueError(f"{source}: {'; '.join(missing)} (not implemented by Bumblebee)")

    fields = {k: raw[k] for k in _SHARED_KEYS if k in raw}
    # transformers 5 keeps RoPE settings in `rope_parameters`; transformers 4 at top level.
    rope = dict(raw.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
    fields["rope_theta"] = float(theta)
    fields["rope_scaling"] = scaling
    fields["attention_bias"] = {"qwen2": True}.get(model_type, raw.get("attention_bias", model_type == "bumblebee"))
    fields["qk_norm"] = model_type == "qwen3" or bool(raw.get("qk_norm", False))
    fields["sliding_window"], fields["layer_types"] = _read_window(model_type, raw, source)
    fields["family"] = model_type if model_type != "bumblebee" else None
    fields["norm_type"] = raw.get("norm_type", "rmsnorm")
    fields["attn_implementation"] = raw.get("attn_implementation", "sdpa")
    fields["torch_dtype"] = raw.get("torch_dtype", raw.get("dtype"))
    if "num_key_value_heads" not in fields or fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    fields["extra"] = {k: v for k, v in raw.items() if k not in _HANDLED_KEYS}
    try:
        return BumblebeeConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err


def unsupported_features(raw: dict) -> list[str]:
    """What a config.json of a Bumblebee family asks for that Bumblebee does not implement (empty: none)."""
    model_type = raw.get("model_type")
    found = []
    if raw.get("mlp_bias"):
        found.append("mlp_bias=true is not supported")
    if model_type in ("llama", "qwen3", "mistral") and raw.get("attention_bias"):
        found.append(f"{model_type} attention_bias=true (bias on o_proj too) is not supported")
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    scaling = {k: v for k, v in (raw.get(key) or {}).items() if k != "rope_theta"}
    try:
        normalize_rope_scaling(scaling, raw.get("max_position_embeddings", 0), key=key)
    except ValueError as err:
        found.append(str(err))
    if raw.get("hidden_act", "silu") not in ACTIVATIONS:
        found.append(f"hidden_act {raw['hidden_act']!r} is not supported")
    return found


def bumblebee_expresses(model_dir) -> bool:
    """Whether Bumblebee runs this model directory natively: a family it implements, with no feature it
    lacks (`unsupported_features`). Anything else goes through transformers (model/transformers_family.py);
    our own `bumblebee` type always loads here, and fails there with the reason if it cannot."""
    raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") == "bumblebee":
        return True
    return raw.get("model_type") in SUPPORTED_MODEL_TYPES and not unsupported_features(raw)


def _read_window(model_type: str, raw: dict, source: str) -> tuple:
    """(sliding_window, layer_types) as transformers reads them for this family."""
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if model_type == "mistral":
        return window, None  # Mistral slides every layer when sliding_window is set (it ignores layer_types)
    if model_type in ("llama",):
        return None, None
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window"):
            return None, None  # transformers drops the window unless use_sliding_window
        if window is None:
            raise ValueError(f"{source}: use_sliding_window=true needs sliding_window")
        if layer_types is None:  # older files: layers from max_window_layers on slide
            first = raw.get("max_window_layers", raw.get("num_hidden_layers"))
            layer_types = [
                "sliding_attention" if i >= first else "full_attention" for i in range(raw["num_hidden_layers"])
            ]
        return window, layer_types
    return window, layer_types


def _slides_everywhere(config: BumblebeeConfig) -> bool:
    return config.sliding_window is not None and all(
        config.layer_window(i) is not None for i in range(config.num_hidden_layers)
    )


def hf_model_type(config: BumblebeeConfig) -> str:
    """The HF family that expresses this config exactly (the one it was read as, while it still does)."""
    if config.norm_type != "rmsnorm":
        return "bumblebee"
    if config.qk_norm:
        return "bumblebee" if config.attention_bias else "qwen3"
    if config.attention_bias:
        return "qwen2"
    if config.sliding_window is None or all(config.layer_window(i) is None for i in range(config.num_hidden_layers)):
        return "mistral" if config.family == "mistral" else "llama"
    # Some layers slide, no bias: Mistral when all do; otherwise only our own format says which.
    return "mistral" if _slides_everywhere(config) else "bumblebee"


def _window_keys(config: BumblebeeConfig) -> dict:
    """Qwen2/Qwen3's sliding-window keys: use_sliding_window, sliding_window, max_window_layers, layer_types."""
    layers = config.num_hidden_layers
    types = ["sliding_attention" if config.layer_window(i) is not None else "full_attention" for i in range(layers)]
    if "sliding_attention" not in types:
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=layers, layer_types=types)
    # max_window_layers for transformers versions that read it instead of layer_types; exact when the
    # sliding layers are the last ones (the only pattern it can say), layer_types says any pattern.
    first = types.index("sliding_attention")
    return dict(
        use_sliding_window=True, sliding_window=config.sliding_window, max_window_layers=first, layer_types=types
    )


def config_to_hf_dict(config: BumblebeeConfig, dtype: Optional[torch.dtype] = None) -> dict:
    model_type = hf_model_type(config)
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type}
    out.update({k: getattr(config, k) for k in _SHARED_KEYS})
    # transformers 5's rope_parameters, and beside it the transformers 4 layout (top-level rope_theta /
    # rope_scaling) that older readers (transformers 4, vLLM's older releases) look for.
    out["rope_parameters"] = rope_parameters(config)
    out["rope_theta"] = config.rope_theta
    out["rope_scaling"] = config.rope_scaling
    out["attention_dropout"] = 0.0
    out["use_cache"] = True
    if model_type in ("qwen2", "qwen3"):
        out.update(_window_keys(config))
        if model_type == "qwen3":
            out.update(attention_bias=False, head_dim=config.head_dim)
    elif model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type == "mistral":
        out.update(sliding_window=config.sliding_window, head_dim=config.head_dim)
    else:
        out.update(
            attention_bias=config.attention_bias,
            norm_type=config.norm_type,
            qk_norm=config.qk_norm,
            sliding_window=config.sliding_window,
            layer_types=config.layer_types,
        )
    if config.attn_implementation != "sdpa":
        out["attn_implementation"] = config.attn_implementation
    name = dtype_name(dtype) if dtype is not None else config.torch_dtype
    if name:
        out["torch_dtype"] = name
    for key, value in config.extra.items():
        out.setdefault(key, value)
    return out


def read_config(path: Union[str, Path]) -> BumblebeeConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err
    return config_from_hf_dict(raw, source=str(config_file))


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def resolve_dtype(dtype: Union[str, torch.dtype, None], config: BumblebeeConfig) -> torch.dtype:
    """A requested dtype, or the checkpoint's ("auto" or None), or fp32 when neither says."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = config.torch_dtype or "float32"
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return DTYPES[name]
