"""LoRA through peft: wrap a model's linear layers, save the adapter in the standard peft files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

# Every linear layer of a Qwen2/Llama decoder (peft target names match our parameter names).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def apply_lora(model, rank: int, alpha: int, dropout: float, target_modules: Optional[list[str]] = None):
    """The model with LoRA adapters on `target_modules` (default: every linear layer of the decoder);
    only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules or ALL_LINEAR
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)


def trainable_share(model) -> tuple[int, int]:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        count = getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned weight's local tensor is empty
        total += count
        trainable += count if p.requires_grad else 0
    return trainable, total


def save_adapter(peft_model, directory, base_model_path: str, state_dict: Optional[dict] = None) -> None:
    """adapter_config.json + adapter_model.safetensors, with base_model_name_or_path pointing at the base.
    `state_dict`: the adapter's tensors gathered from their ZeRO-3 shards (default: the live ones)."""
    peft_model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
    config_file = Path(directory) / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(Path(base_model_path).resolve())
    config.pop("auto_mapping", None)  # the base is a plain HF-format dir; any peft user can load it
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def merge_lora(base_model_path: str, lora_model_path: str, save_path: str, max_shard_size: str = "5GB",
               dtype: str = "auto") -> None:
    """Merge a LoRA adapter into its base and save a full Hugging Face model, then check it.

    The merged model's logits are compared with the unmerged (base + adapter) model's on a few
    tokens; the max difference is printed and a difference beyond the dtype's tolerance is an error.

    Args:
        base_model_path: the base model directory the adapter was trained on.
        lora_model_path: the adapter directory (adapter_config.json + adapter_model.safetensors).
        save_path: where the merged model is written (config, sharded safetensors, tokenizer, generation config).
        max_shard_size: largest safetensors shard.
        dtype: auto (the base's), float32, float16 or bfloat16.
    """
    import shutil
    from pathlib import Path as _Path

    import torch
    from peft import PeftModel

    from bumblecore.model.hf_io import load_pretrained, read_config, resolve_dtype
    from bumblecore.tokenizer import load_tokenizer

    if not (_Path(lora_model_path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{lora_model_path}: no adapter_config.json (expected a peft LoRA adapter directory)")
    torch_dtype = resolve_dtype(dtype, read_config(base_model_path))
    unmerged = PeftModel.from_pretrained(load_pretrained(base_model_path, dtype=torch_dtype), lora_model_path).eval()
    probe = torch.randint(0, unmerged.base_model.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unmerged(probe).float()
    merged = unmerged.merge_and_unload().eval()
    out = _Path(save_path)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer_dir = lora_model_path if (_Path(lora_model_path) / "tokenizer_config.json").is_file() else base_model_path
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    if (_Path(base_model_path) / "generation_config.json").is_file():
        shutil.copy(_Path(base_model_path) / "generation_config.json", out / "generation_config.json")
    with torch.no_grad():
        got = load_pretrained(out, dtype=torch_dtype)(probe).float()
    difference = (got - expected).abs().max().item()
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[torch_dtype]
    print(f"merged {lora_model_path} into {base_model_path} -> {save_path}; max logit difference merged vs unmerged: {difference:.3g} ({name})")
    if difference > MERGE_TOLERANCE[name]:
        raise ValueError(f"merge check failed: max logit difference {difference:.3g} exceeds {MERGE_TOLERANCE[name]} for {name}")
