"""Load a model directory for inference: a full model of any causal-LM family, or a peft LoRA adapter
on one. Bumblebee runs the families it implements (ours, Qwen2, Llama ...); any other family runs
through transformers behind the same engine interface (model/transformers_family.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from bumblecore.model.hf_config import bumblebee_expresses
from bumblecore.model.reward import is_reward_adapter, is_reward_model
from bumblecore.model.transformers_family import load_model


def resolve_device(device_map: str) -> torch.device:
    if device_map in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_map)


def refuse_reward_model(model_dir, model_path) -> None:
    """A reward model (or a LoRA reward model's adapter) scores conversations; it has no LM head to generate with."""
    adapter = is_reward_adapter(model_path)
    if adapter or is_reward_model(model_dir):
        why = (
            "adapter_config.json's task_type SEQ_CLS"
            if adapter
            else "config.json's architectures: a ForSequenceClassification"
        )
        raise ValueError(
            f"{model_path}: a reward model ({why}); it scores "
            "conversations and does not generate text (score with `bumblecore score`)"
        )


def load_for_inference(
    model_path: str,
    dtype: str = "auto",
    device_map: str = "auto",
    merge: bool = True,
    trust_remote_code: bool = False,
    chat_template: Optional[str] = None,
    base_model_path: Optional[str] = None,
    ignore_base_mismatch: bool = False,
):
    """(model, tokenizer, eos ids). A dir with adapter_config.json is a LoRA adapter (any peft
    task_type): its base is loaded from `base_model_path`, else from the adapter's base_model_name_or_path,
    checked against the base the adapter was trained on (`ignore_base_mismatch` uses it anyway), grown to
    the adapter's tokenizer where tokens were added in training, the adapter applied and (by default)
    merged. `chat_template`: a built-in name or .jinja file instead of the tokenizer's own."""
    from bumblecore.chat.templates import use_chat_template
    from bumblecore.model.adapter_base import adapter_base_dir
    from bumblecore.model.lora import attach_adapter
    from bumblecore.model.transformers_family import TransformersCausalLM
    from bumblecore.model.vocab import adapter_vocab_size, grow_vocab
    from bumblecore.tokenizer import check_fits_model, load_tokenizer

    path = Path(model_path)
    device = resolve_device(device_map)
    adapter = (path / "adapter_config.json").is_file()
    base_dir = adapter_base_dir(path, base_model_path, ignore_base_mismatch) if adapter else path
    refuse_reward_model(base_dir, model_path)
    tokenizer_dir = path if not adapter or (path / "tokenizer_config.json").is_file() else base_dir
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    use_chat_template(tokenizer, chat_template, str(path))
    # Ids past the model's vocabulary would fail inside the model on every request that has one:
    # refuse before the (possibly large) model is read, unless the adapter trained those rows itself.
    grown = adapter_vocab_size(path, tokenizer, base_dir) if adapter else 0
    if not grown:
        check_fits_model(tokenizer, base_dir, tokenizer_dir)
    model = load_model(base_dir, dtype, device, trust_remote_code)
    if adapter:
        grow_vocab(model, grown)  # new rows for the adapter's trained ones to replace
        model = attach_adapter(model, path)
        model = model.merge_and_unload() if merge else model
    if not bumblebee_expresses(base_dir):
        model = TransformersCausalLM(model, for_training=False)
    generation_dir = path if (path / "generation_config.json").is_file() else base_dir
    return model.eval(), tokenizer, default_eos_ids(generation_dir, tokenizer)


def default_eos_ids(model_path, tokenizer) -> list[int]:
    """generation_config.json's eos_token_id (int or list), else the tokenizer's eos; plus the chat
    template's end-of-turn token (Llama-3's <|eot_id|>, ChatML's <|im_end|>), where a reply ends."""
    from bumblecore.chat.format import ChatFormatError, chat_format

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if model_path is not None:
        file = Path(model_path) / "generation_config.json"
        if file.is_file():
            eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
            if eos is not None:
                ids = [eos] if isinstance(eos, int) else list(eos)
    try:
        end_of_turn = chat_format(tokenizer).end_of_turn_ids
    except ChatFormatError:  # no chat template: raw-text models stop on eos only
        end_of_turn = []
    return ids + [i for i in end_of_turn if i not in ids]
