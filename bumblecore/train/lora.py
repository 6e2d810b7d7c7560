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
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def save_adapter(peft_model, directory, base_model_path: str) -> None:
    """adapter_config.json + adapter_model.safetensors, with base_model_name_or_path pointing at the base."""
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    config_file = Path(directory) / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(Path(base_model_path).resolve())
    config.pop("auto_mapping", None)  # the base is a plain HF-format dir; any peft user can load it
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
