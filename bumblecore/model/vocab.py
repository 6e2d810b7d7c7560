"""Grow a model's vocabulary for tokens added to its tokenizer (`resize_vocab`): new embedding rows (and
new rows of an untied LM head) start at the mean of the existing rows, exactly. transformers'
`resize_token_embeddings(..., mean_resizing=True)` draws them from a normal around that mean instead;
the mean itself keeps the first logits of a new token at the average of the old ones, and is the same
on every rank and every run.

Under LoRA the new rows train through peft's trainable tokens (`lora_token_indices`): only those rows
are trained and saved with the adapter, so the adapter loads on the base grown to its tokenizer's size.
Under ZeRO-3 too (`trainable_tokens_under_zero3`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


def _mean_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The mean of the first `rows` rows, computed in fp32 (a bf16 sum over 50k rows loses digits)."""
    return weight[:rows].float().mean(dim=0).to(weight.dtype)


def vocab_rows(model) -> int:
    """Rows of the model's input embedding (its vocab_size)."""
    bare = getattr(model, "hf", model)
    weight = bare.get_input_embeddings().weight
    return tuple(getattr(weight, "ds_shape", weight.shape))[0]


def grow_vocab(model, new_size: int) -> int:
    """Give `model` (a Bumblebee, our transformers wrapper, or a transformers model) `new_size` embedding
    rows, the new ones the mean of the old; returns the old row count. A model with enough rows is left
    as it is (embeddings are often padded past the tokenizer)."""
    old = vocab_rows(model)
    if new_size <= old:
        return old
    hf = getattr(model, "hf", None) if getattr(model, "is_transformers_fallback", False) else None
    if hf is None and hasattr(model, "resize_token_embeddings"):
        hf = model
    if hf is not None:
        hf.resize_token_embeddings(new_size, mean_resizing=False)
        with torch.no_grad():
            embed = hf.get_input_embeddings().weight
            embed[old:] = _mean_rows(embed, old)
            head = hf.get_output_embeddings()
            if head is not None and head.weight is not embed:
                head.weight[old:] = _mean_rows(head.weight, old)
        return old
    _grow_bumblebee(model, new_size, old)
    return old


def _grown(weight: torch.Tensor, new_size: int, old: int) -> torch.Tensor:
    out = torch.empty(new_size, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[:old] = weight
    out[old:] = _mean_rows(weight, old)
    return out


def _grow_bumblebee(model, new_size: int, old: int) -> None:
    # skip_init: the new modules draw no random numbers, so what follows (LoRA's init) draws the same
    # as on a model built partitioned at the grown size (ZeRO-3), which draws none either.
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        new_embed = nn.utils.skip_init(nn.Embedding, new_size, embed.shape[1], device=embed.device, dtype=embed.dtype)
        new_embed.weight.data = _grown(embed.data, new_size, old)
        new_embed.weight.requires_grad_(embed.requires_grad)
        model.model.embed_tokens = new_embed
        head = model.lm_head
        new_head = nn.utils.skip_init(
            nn.Linear, head.in_features, new_size, bias=False, device=embed.device, dtype=head.weight.dtype
        )
        if model.config.tie_word_embeddings:
            new_head.weight = new_embed.weight
        else:
            new_head.weight.data = _grown(head.weight.data, new_size, old)
            new_head.weight.requires_grad_(head.weight.requires_grad)
        model.lm_head = new_head
    model.config.vocab_size = new_size


def load_grown_into_partitioned(model, path, is_rank_zero: bool) -> None:
    """ZeRO-3: a checkpoint of fewer vocabulary rows into a model built partitioned at the grown size.
    As runtime.load_into_partitioned, tensor by tensor from rank 0; the embedding (and an untied head)
    get the checkpoint's rows, then the mean of them in the new ones."""
    import deepspeed

    from bumblecore.model.hf_io import expected_tensors, iter_checkpoint

    parameters = dict(model.named_parameters())
    expected = expected_tensors(model)
    saved_rows = _checkpoint_rows(path)
    grown = {n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in expected}
    for name in grown:
        expected[name] = (saved_rows, *expected[name][1:])
    for name, load in iter_checkpoint(path, model.config, expected):
        param = parameters[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if is_rank_zero:
                param.data.copy_(_grown(load(), param.shape[0], saved_rows) if name in grown else load())


def _checkpoint_rows(path) -> int:
    from bumblecore.model.hf_config import read_config

    return read_config(path).vocab_size


def lora_token_indices(model, token_ids: list[int]) -> Optional[dict[str, list[int]]]:
    """peft's `trainable_token_indices` for the added tokens: the input embedding's rows, and an untied
    LM head's too (a tied head follows the embedding's)."""
    if not token_ids:
        return None
    bare = getattr(model, "hf", model)
    names = {id(module): name for name, module in model.named_modules()}
    embed, head = bare.get_input_embeddings(), bare.get_output_embeddings()
    indices = {names[id(embed)].rsplit(".", 1)[-1]: list(token_ids)}
    if head is not None and head.weight is not embed.weight:
        indices[names[id(head)].rsplit(".", 1)[-1]] = list(token_ids)
    return indices


@contextlib.contextmanager
def whole_token_weights(model):
    """ZeRO-3, a model built partitioned: its embedding (and an untied head) gathered whole on every rank
    while peft copies the rows it will train from them (peft's own ZeRO-3 path needs CUDA and
    transformers' DeepSpeed config, neither of which a Fabric run on CPU has)."""
    bare = getattr(model, "hf", model)
    heads = [bare.get_input_embeddings(), bare.get_output_embeddings()]
    partitioned = {id(m.weight): m.weight for m in heads if m is not None and hasattr(m.weight, "ds_id")}
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(partitioned.values()), modifier_rank=None):
        yield


def trainable_tokens_under_zero3(peft_model) -> None:
    """ZeRO-3 gathers a weight only around its own module's forward. peft's trainable-token layer reads
    its base layer's whole weight (the embedding, or the LM head) and its own new rows (held in a
    ParameterDict, which is never called) in its forward: register them with DeepSpeed as that layer's
    external parameters, so it gathers them around the layer's forward and backward."""
    import deepspeed
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    for module in peft_model.modules():
        if isinstance(module, TrainableTokensLayer):
            for weight in (module.base_layer.weight, *module.trainable_tokens_delta.values()):
                deepspeed.zero.register_external_parameter(module, weight)


def adapter_vocab_size(adapter_dir, tokenizer, base_dir) -> int:
    """The rows a base needs under this adapter: len(tokenizer) when the tokenizer has tokens past the
    base's vocabulary and the adapter trained every one of them (peft trainable tokens, saved by a
    resize_vocab run), else 0 (then the tokenizer must fit the base as it is)."""
    import json
    from pathlib import Path

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    indices = config.get("trainable_token_indices") or {}
    trained = set(indices) if isinstance(indices, list) else {i for ids in indices.values() for i in ids}
    base = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    rows = base.get("vocab_size") or base.get("text_config", {}).get("vocab_size") or 0
    beyond = set(range(rows, len(tokenizer)))
    return len(tokenizer) if beyond and beyond <= trained else 0
