"""Prepared weights for decoding (inference/decode.py): the model's parameters laid out for one new token
per row. q/k/v and gate/up concatenated so each runs as one matmul, every projection kept (in, out) or
in MKL's packed layout, on CPU a (hidden, vocab) copy of the LM head, and half-precision screens of the
LM head for greedy tokens. The parameters stay the source of truth: a prepared weight is used only
while its parameters' version counters are unchanged and gradients are off (`usable`), so training
the model later is always safe.
"""

from __future__ import annotations

import time
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

from bumblecore.model.bumblebee import MLP, Attention


def _versions(*linears: nn.Linear) -> tuple:
    """In-place updates (optimiser steps, load_state_dict) bump a tensor's version counter."""
    return tuple(m.weight._version for m in linears) + tuple(m.bias._version for m in linears if m.bias is not None)


class PackedWeight(NamedTuple):
    """An (out, in) weight in MKL's packed GEMM layout (CPU, fp32), for batches of two or more rows."""

    packed: torch.Tensor
    shape: torch.Tensor
    """A zero-stride (out, in) view: the kernel reads the weight's shape from it, never its values."""


def mkl_packing_available() -> bool:
    return (
        torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


def _in_out(weight: torch.Tensor, packed: bool = False):
    """An (out, in) weight as the decode steps multiply by it. On CPU a contiguous (in, out) copy:
    MKL multiplies one row by it ~1.1x faster than F.linear's (out, in) layout. With `packed` (an
    fp32 CPU weight, for an engine of several rows a step), MKL's packed layout instead: an
    unpacked weight is repacked by every small-batch product, which made 8 rows x 30 thin layers
    of SmolLM2-135M ~1.2-1.4x slower (measured; one row is a matrix-vector product either way).
    The packed copy serves any row count (checked bit-for-bit against a copy packed for each)."""
    if packed and weight.device.type == "cpu" and weight.dtype == torch.float32 and mkl_packing_available():
        rows_hint = 8  # the packed layout is the same for every hint; only the kernel's rows matter
        return PackedWeight(
            torch.ops.mkl._mkl_reorder_linear_weight(weight.detach().contiguous(), rows_hint),
            torch.empty((), dtype=weight.dtype).expand(weight.shape),
        )
    return weight.t().contiguous() if weight.device.type == "cpu" else weight.t()


def _project(x: torch.Tensor, weight_t, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear with an (in, out) weight or a PackedWeight."""
    flat = x.reshape(-1, x.shape[-1])
    if isinstance(weight_t, PackedWeight):
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), weight_t.packed, weight_t.shape, bias, flat.shape[0])
        return out.view(*x.shape[:-1], weight_t.shape.shape[0])
    out = flat @ weight_t if bias is None else torch.addmm(bias, flat, weight_t)
    return out.view(*x.shape[:-1], weight_t.shape[1])


def _plain(*modules: nn.Module) -> bool:
    """An unmerged LoRA layer (peft) computes more than its weight: such layers are not prepared."""
    return all(type(m) is nn.Linear for m in modules)


class PreparedAttention(NamedTuple):
    """An Attention's projections as Attention.forward takes them for decoding (`prepared`)."""

    qkv_weight: torch.Tensor
    """q, k and v weights concatenated, (hidden, (heads + 2 * kv_heads) * head_dim)."""
    qkv_bias: Optional[torch.Tensor]
    o_weight: torch.Tensor
    """(heads * head_dim, hidden)."""
    versions: tuple

    def matches(self, attn: Attention) -> bool:
        return usable(self, *_attention_linears(attn))

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return _project(x, self.qkv_weight, self.qkv_bias)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return _project(x, self.o_weight)


class PreparedMLP(NamedTuple):
    """An MLP's projections as MLP.forward takes them for decoding (`prepared`)."""

    gate_up_weight: torch.Tensor
    """gate and up weights concatenated, (hidden, 2 * intermediate)."""
    down_weight: torch.Tensor
    versions: tuple

    def matches(self, mlp: MLP) -> bool:
        return usable(self, *_mlp_linears(mlp))

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return _project(x, self.gate_up_weight)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return _project(x, self.down_weight)


class PreparedHead(NamedTuple):
    weight: torch.Tensor
    """The LM head weight as (hidden, vocab), contiguous."""
    versions: tuple


def _attention_linears(attn: Attention) -> tuple:
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj


def _mlp_linears(mlp: MLP) -> tuple:
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def prepare_attention(attn: Attention, packed: bool = False) -> Optional[PreparedAttention]:
    if not _plain(*_attention_linears(attn)):
        return None
    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]) if attn.q_proj.bias is not None else None
    return PreparedAttention(
        _in_out(weight, packed), bias, _in_out(attn.o_proj.weight, packed), _versions(*_attention_linears(attn))
    )


def prepare_mlp(mlp: MLP, packed: bool = False) -> Optional[PreparedMLP]:
    if not _plain(*_mlp_linears(mlp)):
        return None
    return PreparedMLP(
        _in_out(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), packed),
        _in_out(mlp.down_proj.weight, packed),
        _versions(*_mlp_linears(mlp)),
    )


def prepare_head(lm_head: nn.Linear) -> Optional[PreparedHead]:
    # One token's logits are a matrix-vector product: with the (vocab, hidden) weight, 32,000 short
    # dot products; a (hidden, vocab) copy streams its rows instead, ~1.5-2x faster on CPU.
    if not _plain(lm_head) or lm_head.weight.device.type != "cpu":
        return None
    return PreparedHead(lm_head.weight.t().contiguous(), _versions(lm_head))


class PreparedScreen(NamedTuple):
    """A half-precision copy of the LM head (CPU, fp32 models): approximate logits with half the weight
    traffic, to find greedy tokens (DecodingBumblebee.screened_argmax)."""

    kind: str
    """"fp16": FBGEMM's packed fp16 weight times fp32 activations. "bf16": a (vocab, hidden) bf16 copy
    times bf16-rounded activations (oneDNN's AMX / AVX-512 BF16 product where the CPU has one)."""
    weight: torch.Tensor
    max_norm: float
    """The largest L2 norm of a vocabulary row of the (fp32) weight."""
    versions: tuple

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Approximate logits (rows, vocab) of fp32 hidden states (rows, hidden)."""
        if self.kind == "fp16":
            return torch.fbgemm_linear_fp16_weight_fp32_activation(hidden, self.weight, None)
        # (vocab, hidden) @ (hidden, rows) is oneDNN's fast layout; the fp32 copy makes the screening
        # passes contiguous (bf16 elementwise work and strided reductions cost more than the copy).
        vocab_major = self.weight @ hidden.to(torch.bfloat16).t()
        return torch.empty(hidden.shape[0], self.weight.shape[0], dtype=torch.float32).copy_(vocab_major.t())

    def error_bound(self, hidden: torch.Tensor) -> torch.Tensor:
        """B per row: |scores - fp32 logits| <= B for every token. With u the format's unit roundoff
        (fp16 2^-11, bf16 2^-8) and x one row, each score is off by at most: the weight's rounding,
        u |x| max_v |w_v| (Cauchy-Schwarz); for bf16 the same again for x's rounding and once more
        for the bf16 result's; the fp32 sums' rounding (n terms: <= n 2^-24 relative, 2^-14 for
        n <= 1024); and 2^-25 |x|_1 below fp16's normal range. So <= 1.1 u |x| max|w| + 2^-25 |x|_1
        for fp16, <= 3.1 u |x| max|w| for bf16; B is about 4x (fp16) and 1.3x (bf16) that."""
        relative = 2.0**-9 if self.kind == "fp16" else 2.0**-6
        return hidden.norm(dim=-1) * (self.max_norm * relative) + hidden.abs().sum(-1) * 2.0**-23


def cpu_seconds(run, repeats: int = 3) -> float:
    """The least process CPU time of `repeats` calls, after one warm-up call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best


SCREEN_BLOCK = 128


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16): oneDNN's bf16 product then beats
    FBGEMM's fp16 one."""
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def prepare_screens(lm_head: nn.Linear) -> list[PreparedScreen]:
    """The screens this build can make, the hardware's pick (prepare_screen) first. Both are kept: which
    one decides fastest depends on the model too. bf16's error bound is 8x fp16's, and on SmolLM2-135M
    (hidden-state norms ~55, vocabulary rows up to 7.5) it keeps ~5,000-45,000 of 49,152 tokens, so it
    gives up, where fp16 keeps 3-30 (measured): DecodingBumblebee times each where it decides."""
    first = prepare_screen(lm_head)
    if first is None:
        return []
    other = prepare_screen(lm_head, "fp16" if first.kind == "bf16" else "bf16")
    return [first] + ([other] if other is not None else [])


def prepare_screen(lm_head: nn.Linear, kind: Optional[str] = None) -> Optional[PreparedScreen]:
    """A half-precision copy of the LM head: `kind`, or bf16 on a CPU with native bf16 products, else
    fp16 where FBGEMM has it. Measured at batch 16 on a Xeon with AMX, decode ran ~1.2x faster with
    bf16 than fp16 (though on its own, in cache, the two products were close: the pick is by hardware,
    not by a timing that favours the wrong one). None for a GPU, a non-fp32, non-finite or biased head,
    or a `kind` this build or weight cannot have."""
    weight = lm_head.weight
    if not _plain(lm_head) or lm_head.bias is not None or weight.device.type != "cpu":
        return None
    if weight.dtype != torch.float32 or not bool(torch.isfinite(weight).all()):
        return None
    fbgemm = getattr(torch, "fbgemm_pack_gemm_matrix_fp16", None)
    if kind is None:
        kind = "bf16" if native_bf16_matmul() or fbgemm is None else "fp16"
    weight = weight.detach()
    max_norm = float(weight.norm(dim=1).max())
    if kind == "bf16":
        return PreparedScreen("bf16", weight.to(torch.bfloat16), max_norm, _versions(lm_head))
    if fbgemm is None or not bool(weight.abs().max() < 60000):
        return None
    try:
        with warnings.catch_warnings():  # deprecated in torch, still the fastest fp16 CPU product
            warnings.simplefilter("ignore")
            screen = PreparedScreen("fp16", fbgemm(weight), max_norm, _versions(lm_head))
            screen.scores(weight[:1])
    except (RuntimeError, AttributeError):  # a build without FBGEMM
        return None
    return screen


def usable(prepared, *linears: nn.Linear) -> bool:
    return prepared is not None and not torch.is_grad_enabled() and prepared.versions == _versions(*linears)
