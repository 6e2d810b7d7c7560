"""Liger kernels (liger-kernel's Triton kernels) in Bumblebee, for training on CUDA: RMSNorm, SwiGLU,
RoPE and the fused linear cross-entropy, which never materialises a chunk's logits.

`use_liger_kernels(model)` swaps the class of the modules it speeds up for a subclass below: the
parameters, their names and the checkpoints stay exactly as they were, only `forward` (or one
method of it) runs liger's kernel. The readable reference stays model/bumblebee.py.

Not applied to what liger has no kernel for here: LayerNorm models, MLPs whose activation is not
silu, and the head under ZeRO-3 (its weight is a partition outside its module's own call: that head
keeps our chunked cross-entropy, train/losses.py).
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from bumblecore.model.bumblebee import MLP, Attention, Bumblebee, RMSNorm

LIGER_KERNELS = ("rms_norm", "swiglu", "rope", "cross_entropy")
INSTALL_HINT = "pip install 'bumblecore[gpu]' (liger-kernel and its triton)"


def liger_refusal(device_type: str) -> Optional[str]:
    """Why liger's kernels cannot run on this device (None: they can). Triton's kernels need CUDA."""
    if importlib.util.find_spec("liger_kernel") is None:
        return f"liger-kernel is not installed: {INSTALL_HINT}"
    if device_type != "cuda" or not torch.cuda.is_available():
        return f"liger's Triton kernels need a CUDA GPU; this run's device is {device_type}"
    return None


class LigerRMSNorm(RMSNorm):
    """RMSNorm as one kernel: fp32 statistics, scaled in the input dtype (liger's "llama" casting, ours)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.transformers.functional import liger_rms_norm

        return liger_rms_norm(x, self.weight, self.eps, casting_mode="llama")


class LigerMLP(MLP):
    """silu(gate) * up as one kernel that keeps only gate and up for backward."""

    def _gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from liger_kernel.transformers.functional import liger_swiglu

        return liger_swiglu(gate, up)


class LigerAttention(Attention):
    """RoPE on q and k in one kernel, in place."""

    def rope(self, q, k, cos, sin):
        from liger_kernel.transformers.functional import liger_rope

        # liger reads (batch, heads, seq, d): our (batch, seq, heads, d) transposed is that view, no copy.
        # cos/sin are computed in the embedding's dtype; liger wants them in q's (as transformers casts them).
        q, k = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos.to(q.dtype), sin.to(q.dtype))
        return q.transpose(1, 2), k.transpose(1, 2)


class LigerHead(torch.nn.Linear):
    """The LM head; train/losses.py's cross-entropy calls `fused_cross_entropy` when the head has one."""

    def fused_cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """Summed cross-entropy of (tokens, hidden) against (tokens,) targets, the logits computed a
        chunk at a time inside the kernel; None when the weight is a ZeRO-3 partition."""
        if hasattr(self.weight, "ds_id"):
            return None
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, self.weight, targets, bias=self.bias, reduction="sum").float()


_SWAPS = {"rms_norm": (RMSNorm, LigerRMSNorm), "swiglu": (MLP, LigerMLP), "rope": (Attention, LigerAttention)}


def use_liger_kernels(model: torch.nn.Module, kernels: tuple[str, ...] = LIGER_KERNELS) -> list[str]:
    """Swap the model's modules for their liger versions (only `kernels` of LIGER_KERNELS); returns what
    was swapped, e.g. ["rms_norm x61", "swiglu x30", ...]. The model must be a Bumblebee (peft's wrapper
    around one too): a transformers family is refused by the caller."""
    unknown = set(kernels) - set(LIGER_KERNELS)
    if unknown:
        raise ValueError(f"unknown liger kernels {sorted(unknown)}; expected some of {LIGER_KERNELS}")
    counts = dict.fromkeys(kernels, 0)
    for module in model.modules():
        for name in kernels:
            if name == "cross_entropy":
                continue
            ours, theirs = _SWAPS[name]
            if type(module) is ours and (name != "swiglu" or module.act is torch.nn.functional.silu):
                module.__class__ = theirs
                counts[name] += 1
    if "cross_entropy" in kernels:
        bumblebee = next(m for m in model.modules() if isinstance(m, Bumblebee))
        if type(bumblebee.lm_head) is torch.nn.Linear:
            bumblebee.lm_head.__class__ = LigerHead
            counts["cross_entropy"] += 1
    return [f"{name} x{count}" for name, count in counts.items()]
