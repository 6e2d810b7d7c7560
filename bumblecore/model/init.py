"""`bumblecore init_model`: a model directory to pretrain from (config + tokenizer, no weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from bumblecore.model.config import PRESETS, BumblebeeConfig
from bumblecore.model.hf_config import config_to_hf_dict
from bumblecore.model.hf_io import replace_directory, write_generation_config


def init_model(
    tokenizer_path: str,
    output_dir: str,
    preset: str = "0.5B",
    vocab_size: Optional[int] = None,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
    num_hidden_layers: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_key_value_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    max_position_embeddings: Optional[int] = None,
    rope_theta: Optional[float] = None,
    rms_norm_eps: Optional[float] = None,
    tie_word_embeddings: Optional[bool] = None,
    attention_bias: Optional[bool] = None,
    hidden_act: Optional[str] = None,
    norm_type: Optional[str] = None,
    attn_implementation: Optional[str] = None,
    initializer_range: Optional[float] = None,
    torch_dtype: str = "bfloat16",
    trust_remote_code: bool = False,
    overwrite_output_dir: bool = False,
) -> str:
    """Write a model directory for pretraining from scratch: config.json, generation_config.json and the tokenizer.

    No weights are written: `bumblecore train` with `training_stage: pretrain` initialises them.
    The preset's shape is kept exactly (vocab 151,936 included, so presets equal Qwen2.5) unless a
    field is overridden; for small models pass `--vocab_size`, e.g. the tokenizer's size rounded up to 64.

    Args:
        tokenizer_path: a Hugging Face tokenizer directory (e.g. from `bumblecore train_tokenizer`).
        output_dir: where the model directory is written.
        preset: model shape: 0.5B, 1.5B, 3B, 7B, 14B, 32B or 72B (Qwen2.5 shapes).
        vocab_size: embedding rows; must hold every token of the tokenizer.
        hidden_size: override the preset's hidden size.
        intermediate_size: override the MLP width.
        num_hidden_layers: override the number of decoder layers.
        num_attention_heads: override the number of query heads.
        num_key_value_heads: override the number of key/value heads (GQA groups).
        head_dim: override the per-head width (default hidden_size // heads).
        max_position_embeddings: override the context length.
        rope_theta: override the RoPE base.
        rms_norm_eps: override the norm epsilon.
        tie_word_embeddings: share the embedding and LM head weights.
        attention_bias: bias on q/k/v (Qwen2 style); false gives a Llama-family model.
        hidden_act: MLP activation: silu, gelu, gelu_pytorch_tanh, relu.
        norm_type: rmsnorm or layernorm (layernorm is saved as model_type bumblebee).
        attn_implementation: sdpa, flash_attn or eager.
        initializer_range: std of the normal weight init.
        torch_dtype: dtype recorded in config.json for the weights pretraining will write.
        trust_remote_code: allow a tokenizer that ships its own Python code.
        overwrite_output_dir: replace what output_dir holds (without it a non-empty output_dir is refused, as `train` refuses another run's outputs).
    """
    from bumblecore.tokenizer import load_tokenizer

    out = Path(output_dir)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite_output_dir:  # before anything is read: a model dir is never replaced unasked
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise ValueError(
            f"output_dir {out} is not empty ({shown}); set overwrite_output_dir: true to replace it, "
            "or choose another output_dir"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file; choose a directory")
    if held and out.resolve() in Path(tokenizer_path).resolve().parents:
        raise ValueError(
            f"tokenizer_path {tokenizer_path} is inside output_dir {out}, which overwrite_output_dir would replace; "
            "move the tokenizer out of it or choose another output_dir"
        )
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    overrides = {k: v for k, v in locals().items() if k in BumblebeeConfig.__dataclass_fields__ and v is not None}
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    tokenizer_size = len(tokenizer)
    eos_ids = [
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.get_vocab()
    ]
    # A tokenizer with its own template (Llama-3 ...): replies end at its end-of-turn token and its EOS.
    from bumblecore.chat.format import ChatFormatError, chat_format

    try:
        eos_ids += [i for i in chat_format(tokenizer).end_of_turn_ids if i not in eos_ids]
    except ChatFormatError:
        pass
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    config = BumblebeeConfig.from_preset(
        preset,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    if tokenizer_size > config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tokenizer_size} tokens but vocab_size is {config.vocab_size}; "
            f"pass --vocab_size {-(-tokenizer_size // 64) * 64} (its size rounded up to 64) or larger"
        )
    # Written whole under a temporary name, then renamed over output_dir: a replaced model dir keeps
    # nothing of the old one (its weights), and a failed write leaves the old one as it was.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.init.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed init_model
    staging.mkdir()
    try:
        (staging / "config.json").write_text(json.dumps(config_to_hf_dict(config), indent=2) + "\n", encoding="utf-8")
        write_generation_config(staging, config, eos_token_ids=eos_ids or None)
        tokenizer.save_pretrained(str(staging))
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"wrote {out}: preset {preset}, {config.num_parameters_estimate:,} parameters once initialised, "
        f"vocab {config.vocab_size} (tokenizer {tokenizer_size})"
    )
    return str(out)
