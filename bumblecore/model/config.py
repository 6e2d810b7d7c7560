"""BumblebeeConfig: the model's shape, in the fields of a Hugging Face Qwen2 `config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from bumblecore.model.rope import normalize_rope_scaling

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
NORMS = ("rmsnorm", "layernorm")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attn", "eager")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Qwen2.5 shapes (their config.json files). Common to all: silu, RMSNorm 1e-6, rope_theta 1e6,
# 32768 positions, qkv bias, no sliding window.
PRESETS: dict[str, dict[str, Any]] = {
    "0.5B": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_hidden_layers=24,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
    "1.5B": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_attention_heads=12,
        num_hidden_layers=28,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
    "3B": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_attention_heads=16,
        num_hidden_layers=36,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vocab_size=151936,
    ),
    "7B": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_hidden_layers=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        vocab_size=152064,
    ),
    "14B": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_attention_heads=40,
        num_hidden_layers=48,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        vocab_size=152064,
    ),
    "32B": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_attention_heads=40,
        num_hidden_layers=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        vocab_size=152064,
    ),
    "72B": dict(
        hidden_size=8192,
        intermediate_size=29568,
        num_attention_heads=64,
        num_hidden_layers=80,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        vocab_size=152064,
    ),
}


@dataclass
class BumblebeeConfig:
    """Shape and switches of a Bumblebee model. Defaults are the Qwen2.5-0.5B shape."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[dict] = None
    """None (plain RoPE), or {"rope_type": linear, dynamic, yarn or llama3, "factor": f, ...} (model/rope.py)."""
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    """Bias on q/k/v projections (Qwen2 has it, Llama does not)."""
    qk_norm: bool = False
    """RMSNorm over each head's queries and keys before RoPE (Qwen3)."""
    sliding_window: Optional[int] = None
    """Tokens a query sees in a sliding-window layer (itself and the window - 1 before it); None: no window."""
    layer_types: Optional[list[str]] = None
    """Per layer "full_attention" or "sliding_attention"; None: every layer slides when sliding_window is set (Mistral)."""
    family: Optional[str] = None
    """The HF model_type this config was read as (e.g. mistral): saving keeps it while it still expresses the config."""
    hidden_act: str = "silu"
    """Activation of the gated MLP: silu (SwiGLU), gelu, gelu_pytorch_tanh or relu."""
    norm_type: str = "rmsnorm"
    """rmsnorm, or layernorm (saved as model_type bumblebee: no HF family expresses it)."""
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"
    """sdpa (default), flash_attn (CUDA, flash-attn 2 or 4 when installed) or eager (the readable reference)."""
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None
    pad_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None
    """The dtype weights were saved in (read from / written to config.json)."""
    extra: dict = field(default_factory=dict, repr=False)
    """Unrecognised config.json keys, carried through a load/save untouched."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _check_choice("norm_type", self.norm_type, NORMS)
        _check_choice("attn_implementation", self.attn_implementation, ATTENTION_IMPLEMENTATIONS)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            for kind in self.layer_types:
                _check_choice("layer_types entry", kind, LAYER_TYPES)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (or None), got {self.sliding_window}")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BumblebeeConfig:
        """A Qwen2.5-shaped config ("0.5B" ... "72B"); any field can be overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def layer_window(self, layer_idx: int) -> Optional[int]:
        """The sliding window of one layer, or None when it attends to everything before it."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def num_parameters_estimate(self) -> int:
        """Parameter count from the shape alone (equals the built model's count)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        norm = h if self.norm_type == "rmsnorm" else 2 * h
        layer = attn + 3 * h * i + 2 * norm + (2 * d if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + norm + head

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(choices)}")
