"""LoRA through peft, for any family: wrap a model's linear layers (training), save the adapter in the
standard peft files, attach one to its base (inference) and merge it into a full model (`bumblecore merge_lora`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import nn


def linear_layer_names(model) -> list[str]:
    """peft's "all-linear" for any family: the last name of every linear layer except the output head
    (Qwen2/Llama: q/k/v/o_proj, gate/up/down_proj; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2-style layers are linear too

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head and not name.endswith("lm_head"):
            names[name.rsplit(".", 1)[-1]] = None
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers for LoRA; set lora_target_modules")
    return list(names)


def apply_lora(
    model,
    rank: int,
    alpha: int,
    dropout: float,
    target_modules: Optional[list[str]] = None,
    trainable_token_indices: Optional[dict[str, list[int]]] = None,
):
    """The model with LoRA adapters on `target_modules` (default: every linear layer but the output
    head, whatever the family); only the adapters train, and the embedding rows of
    `trainable_token_indices` (tokens added to the vocabulary: model/vocab.py)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules or linear_layer_names(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        trainable_token_indices=trainable_token_indices,
    )
    return get_peft_model(model, config)


def attach_adapter(base, adapter_dir):
    """A peft adapter on `base`, whatever `task_type` it was saved with (peft's docs, TRL and
    LLaMA-Factory write CAUSAL_LM, whose wrapper needs transformers' generation hooks; the plain
    PeftModel holds the same weights and runs the same forward)."""
    from peft import PeftConfig, PeftModel

    adapter_config = PeftConfig.from_pretrained(str(adapter_dir))
    adapter_config.task_type = None
    return PeftModel.from_pretrained(base, str(adapter_dir), config=adapter_config)


def adapter_base_dir(adapter_dir) -> Path:
    """The base model directory an adapter names (base_model_name_or_path), checked."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (expected a peft LoRA adapter directory)")
    base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{config_file}: base_model_name_or_path {base!r} is not a model directory")
    return Path(base)


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
    if getattr(peft_model.get_base_model(), "is_transformers_fallback", False):
        # Trained through our wrapper (its model under `.hf`): store the names a peft model over the
        # plain transformers model has, so every peft user (and our own loaders) can apply it.
        from safetensors.torch import load_file, save_file

        weights = Path(directory) / "adapter_model.safetensors"
        renamed = {name.replace(".hf.", ".", 1): tensor for name, tensor in load_file(weights).items()}
        save_file(renamed, weights, metadata={"format": "pt"})
    config_file = Path(directory) / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(Path(base_model_path).resolve())
    config.pop("auto_mapping", None)  # the base is a plain HF-format dir; any peft user can load it
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def _logits(model, ids):
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()  # transformers returns an output object


def merge_lora(
    base_model_path: str,
    lora_model_path: str,
    save_path: str,
    max_shard_size: str = "5GB",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> None:
    """Merge a LoRA adapter into its base and save a full Hugging Face model, then check it.

    Works for any family and any peft task_type. The merged model's logits are compared with the
    unmerged (base + adapter) model's on a few tokens; the max difference is printed and a
    difference beyond the dtype's tolerance is an error.

    Args:
        base_model_path: the base model directory the adapter was trained on.
        lora_model_path: the adapter directory (adapter_config.json + adapter_model.safetensors).
        save_path: where the merged model is written (config, sharded safetensors, tokenizer, generation config).
        max_shard_size: largest safetensors shard.
        dtype: auto (the base's), float32, float16 or bfloat16.
        trust_remote_code: allow a base model (and tokenizer) that ships its own modelling code.
    """
    import shutil

    import torch

    from bumblecore.model.hf_io import dtype_name, load_model
    from bumblecore.model.vocab import adapter_vocab_size, grow_vocab
    from bumblecore.tokenizer import load_tokenizer

    adapter_base_dir(lora_model_path)  # a readable adapter dir, or a clear error
    base = load_model(base_model_path, dtype, trust_remote_code=trust_remote_code)
    tokenizer_dir = lora_model_path if (Path(lora_model_path) / "tokenizer_config.json").is_file() else base_model_path
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    # rows for tokens added in training (the adapter holds their values)
    grow_vocab(base, adapter_vocab_size(lora_model_path, tokenizer, base_model_path))
    unmerged = attach_adapter(base, lora_model_path).eval()
    torch_dtype = next(unmerged.parameters()).dtype
    vocab_size = unmerged.get_base_model().config.vocab_size
    probe = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _logits(unmerged, probe)
    merged = unmerged.merge_and_unload().eval()
    out = Path(save_path)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out))
    for source in (Path(lora_model_path), Path(base_model_path)):  # the adapter's own stop tokens first
        if (source / "generation_config.json").is_file():
            shutil.copy(source / "generation_config.json", out / "generation_config.json")
            break
    name = dtype_name(torch_dtype)
    with torch.no_grad():
        got = _logits(load_model(out, name, trust_remote_code=trust_remote_code).eval(), probe)
    difference = (got - expected).abs().max().item()
    print(
        f"merged {lora_model_path} into {base_model_path} -> {save_path}; max logit difference merged vs unmerged: {difference:.3g} ({name})"
    )
    if difference > MERGE_TOLERANCE[name]:
        raise ValueError(
            f"merge check failed: max logit difference {difference:.3g} exceeds {MERGE_TOLERANCE[name]} for {name}"
        )
