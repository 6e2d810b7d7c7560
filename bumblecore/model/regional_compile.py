"""`compile: true`: regional compilation for training, as torchtitan and torchtune do it.

Each decoder layer's forward goes through torch.compile (inductor), not the whole model. Every layer runs
the same code object, so Dynamo compiles it once and reuses that graph for all of them (its parameters
are graph inputs, not constants): compile time is one layer's, whatever the depth. The LM-head loss
chunks are compiled too (train/losses.py reads the head's `compiled_loss` mark).

What stays eager, and why:
- everything outside the layers (embedding, RoPE tables, masks, the loop over layers, the optimizer);
- a layer that is not training (evaluation, generation with a KV cache): the compiled graph is the
  training one, and decoding has its own fast path (inference/decode.py);
- packed rows' per-document attention (model/attention.py, `keep_per_document_attention_eager`): its loop is over
  this batch's documents, so the layer runs as two graphs around it and new document boundaries
  never recompile; RoPE positions and masks are tensors made outside the layers;
- a transformers family that transformers does not mark compilable (`_can_compile_fullgraph`).
Sequence lengths that change between batches (unpacked rows) recompile once, then Dynamo marks that
dimension dynamic. Dropout draws from PyTorch's generator as eager does (inductor's `fallback_random`),
so LoRA dropout and resumed runs give the numbers eager gives.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: Bumblebee's DecoderLayer, or the blocks a transformers family names in
    `_no_split_modules` (found through wrappers: peft, TransformersCausalLM)."""
    from bumblecore.model.bumblebee import DecoderLayer

    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    return [m for m in model.modules() if isinstance(m, DecoderLayer) or type(m).__name__ in names]


def family_refusal(model: nn.Module) -> Optional[str]:
    """Why a transformers family's layers stay eager (None: they compile)."""
    wrapper = next((m for m in model.modules() if getattr(m, "is_transformers_fallback", False)), None)
    if wrapper is None or getattr(wrapper.hf, "_can_compile_fullgraph", False):
        return None
    return f"{type(wrapper.hf).__name__} is not marked compilable by transformers (_can_compile_fullgraph)"


def compile_for_training(model: nn.Module, lm_head: Optional[nn.Module] = None) -> list[str]:
    """Compile each decoder layer's training forward (and, given the plain `lm_head`, the loss chunks);
    returns the banner's notes. Call before the model is wrapped for DDP/DeepSpeed."""
    import torch._inductor.config as inductor_config

    from bumblecore.model.attention import keep_per_document_attention_eager

    keep_per_document_attention_eager()
    inductor_config.fallback_random = True  # dropout from PyTorch's generator: eager's numbers, resumable
    refusal = family_refusal(model)
    if refusal is not None:
        return [f"compile: the decoder layers run eager: {refusal}"]
    blocks = repeated_blocks(model)
    for block in blocks:
        block.forward = functools.partial(_training_forward, block, block.forward, torch.compile(block.forward))
    loss = lm_head is not None and type(lm_head) is nn.Linear  # not a family's head with its own transform
    if loss:
        lm_head.compiled_loss = True
    return [
        f"compile: {len(blocks)} decoder layers compiled (one graph, reused)"
        + (", the loss chunks too" if loss else "")
    ]


def _training_forward(block: nn.Module, eager, compiled, *args, **kwargs):
    return compiled(*args, **kwargs) if block.training else eager(*args, **kwargs)


def check_compile(
    stage: str, stage_compiles: bool, zero_stage: Optional[int], lora: bool, long_context: tuple[str, ...] = ()
) -> None:
    """`compile: true` refusals, before anything is written. `long_context`: the long-sample keys the run
    turns on (sequence_parallel_size, tiled_mlp, activation_offload), none yet checked compiled."""
    if long_context:
        raise ValueError(
            f"compile: true together with {', '.join(long_context)} is not checked equal to eager yet; "
            "set compile: false (or turn those off)"
        )
    if not stage_compiles:
        raise ValueError(
            f"compile: true is not supported for training_stage {stage} yet (checked: pretrain, continue_pretrain, "
            "sft); set compile: false"
        )
    if zero_stage == 3 and lora:  # full fine-tuning under ZeRO-3 is checked (2 ranks = eager); LoRA is not
        raise ValueError(
            "compile: true with LoRA under DeepSpeed ZeRO-3 is not supported yet (checked: full fine-tuning under "
            "ZeRO-3, LoRA under DDP); use ZeRO-2 or DDP, or set compile: false"
        )
