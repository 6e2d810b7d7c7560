"""Load a model directory for inference: a full model (ours, Qwen2, Llama) or a peft LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from bumblecore.model.hf_io import SUPPORTED_MODEL_TYPES, read_config, resolve_dtype


def resolve_device(device_map: str) -> torch.device:
    if device_map in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def load_for_inference(model_path: str, dtype: str = "auto", device_map: str = "auto", merge: bool = True):
    """(model, tokenizer, eos ids). A dir with adapter_config.json is a LoRA adapter: its base is
    loaded from base_model_name_or_path, the adapter applied with peft and (by default) merged.
    Architectures Bumblebee does not implement load through transformers (RecomputingCausalLM)."""
    from bumblecore.inference.generate import default_eos_ids
    from bumblecore.model.hf_io import load_pretrained
    from bumblecore.tokenizer import load_tokenizer

    path = Path(model_path)
    device = resolve_device(device_map)
    adapter_file = path / "adapter_config.json"
    if adapter_file.is_file():
        base_path = json.loads(adapter_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base_path or not (Path(base_path) / "config.json").is_file():
            raise FileNotFoundError(f"{adapter_file}: base_model_name_or_path {base_path!r} is not a model directory")
        base = load_pretrained(base_path, dtype=resolve_dtype(dtype, read_config(base_path)), device=device)
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(path))
        model = model.merge_and_unload() if merge else model
        tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else Path(base_path)
        eos_dir = Path(base_path)
    elif json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") not in SUPPORTED_MODEL_TYPES:
        from transformers import AutoModelForCausalLM

        from bumblecore.inference.transformers_backend import RecomputingCausalLM

        torch_dtype = "auto" if dtype == "auto" else {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        model = RecomputingCausalLM(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(device))
        tokenizer_dir = eos_dir = path
    else:
        model = load_pretrained(path, dtype=resolve_dtype(dtype, read_config(path)), device=device)
        tokenizer_dir = eos_dir = path
    tokenizer = load_tokenizer(tokenizer_dir)
    return model.eval(), tokenizer, default_eos_ids(eos_dir, tokenizer)
