"""Attention kernels of Bumblebee (model/bumblebee.py): the mask a forward shares across its layers, the
readable eager reference, PyTorch's SDPA, SDPA per packed document (CPU) and FlashAttention (CUDA).

Every kernel computes softmax(q k^T * scale + mask) v with grouped-query heads; they differ only in
layouts and speed (tests/model/test_model.py compares them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class AttentionMask:
    """How tokens may attend, computed once per forward and shared by every layer.

    `dense` is a boolean (batch, 1, q_len, k_len) mask (True = may attend), or None for plain
    causal attention. `cu_seqlens`/`max_seqlen` describe packed documents for varlen kernels.
    """

    dense: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    causal: bool = True
    """False when every query may see every key (no mask at all)."""
    window: Optional[int] = None
    """Sliding window of the layers using this mask. Folded into `dense` where there is one; without
    `dense` only a FlashAttention kernel reads it (the mask builders give SDPA/eager a dense band)."""


def window_band(query_positions: torch.Tensor, key_positions: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """(..., q, k) True where a key is causally visible: at or before the query and, with a window,
    fewer than `window` positions back (transformers' sliding window: key > query - window)."""
    q, k = query_positions[..., :, None], key_positions[..., None, :]
    allowed = k <= q
    return allowed if window is None else allowed & (k > q - window)


def _dense_for(mask: AttentionMask, q_len: int, k_len: int, device) -> Optional[torch.Tensor]:
    """The boolean mask SDPA/eager need, or None for plain causal (or no) masking."""
    if mask.dense is not None or mask.window is None or not mask.causal:
        return mask.dense
    steps = torch.arange(k_len, device=device)
    return window_band(steps[k_len - q_len :], steps, mask.window)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim): query head i uses kv head i // n_rep."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def eager_attention(q, k, v, mask: AttentionMask, scale: float) -> torch.Tensor:
    """The readable reference. q: (b, heads, q_len, d); k, v: (b, kv_heads, k_len, d)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = _dense_for(mask, q.shape[2], k.shape[2], q.device)
    if allowed is None and mask.causal:
        q_len, k_len = q.shape[2], k.shape[2]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def sdpa_attention(q, k, v, mask: AttentionMask, scale: float) -> torch.Tensor:
    if mask.dense is None and mask.window is not None:
        mask = AttentionMask(dense=_dense_for(mask, q.shape[2], k.shape[2], q.device), causal=mask.causal)
    if mask.dense is None:
        # No mask tensor: lets PyTorch pick its flash / memory-efficient kernel, GQA native.
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=mask.causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    n_rep = q.shape[1] // k.shape[1]
    if q.device.type == "cpu":  # the CPU kernel takes grouped heads directly: no copy of the cache per step
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale, enable_gqa=n_rep > 1)
    return F.scaled_dot_product_attention(
        q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask.dense, scale=scale
    )


_per_document_untraced = None
"""per_document_attention behind torch.compiler.disable, made by `keep_per_document_attention_eager`."""


def keep_per_document_attention_eager() -> None:
    """compile: true: compiled layers run per_document_attention eagerly between their two graphs. Its
    loop is over this batch's documents, so traced, each new set of document lengths would recompile.
    (Made on demand, not as a decorator: torch.compiler.disable imports Dynamo, seconds at startup.)"""
    global _per_document_untraced
    if _per_document_untraced is None:
        _per_document_untraced = torch.compiler.disable(per_document_attention)


def per_document_attention(q, k, v, mask: AttentionMask, scale: float) -> torch.Tensor:
    """SDPA over each packed document on its own: q (b, s, heads, d), k/v (b, s, kv_heads, d) ->
    (b, s, heads, d). The CPU's answer to a varlen kernel: a dense (s, s) mask would compute every
    query against every key of the row, while each document only needs its own causal triangle."""
    if _per_document_untraced is not None and torch.compiler.is_compiling():
        return _per_document_untraced(q, k, v, mask, scale)
    b, s = q.shape[:2]
    # (tokens, heads, d) -> (heads, tokens, d): each document is then a contiguous slice of dim 1.
    q, k, v = (t.reshape(b * s, *t.shape[2:]).transpose(0, 1) for t in (q, k, v))
    lengths = (mask.cu_seqlens[1:] - mask.cu_seqlens[:-1]).tolist()
    outputs = []
    # split, not slicing: the backward of a split concatenates, a slice's would fill a whole zero tensor each.
    for qd, kd, vd in zip(q.split(lengths, dim=1), k.split(lengths, dim=1), v.split(lengths, dim=1)):
        band = None
        if mask.window is not None and qd.shape[1] > mask.window:
            steps = torch.arange(qd.shape[1], device=q.device)
            band = window_band(steps, steps, mask.window)
        outputs.append(
            F.scaled_dot_product_attention(
                qd[None],
                kd[None],
                vd[None],
                attn_mask=band,
                is_causal=band is None,
                scale=scale,
                enable_gqa=q.shape[0] != k.shape[0],
            )[0]
        )
    heads, _, dim = q.shape
    return torch.cat(outputs, dim=1).transpose(0, 1).reshape(b, s, heads, dim)


@functools.cache  # asked by every layer's forward: the imports are tried once
def _flash_kernels():
    """(dense, varlen) FlashAttention functions: flash-attn 2 if installed, else flash-attn-4, else None."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        return flash_attn_func, flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

        return flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None


def flash_available(window: Optional[int] = None) -> bool:
    """FlashAttention can run here (and, for a sliding window, its kernels take `window_size`)."""
    if not torch.cuda.is_available() or _flash_kernels() is None:
        return False
    if window is None:
        return True
    import inspect

    return all("window_size" in inspect.signature(fn).parameters for fn in _flash_kernels())


def _window_kwargs(mask: AttentionMask) -> dict:
    # flash-attn's window_size=(left, right): keys i - left .. i + right, so left = window - 1.
    return {} if mask.window is None else {"window_size": (mask.window - 1, 0)}


def flash_attention(q, k, v, mask: AttentionMask, scale: float) -> torch.Tensor:
    """q: (b, q_len, heads, d), k/v: (b, k_len, kv_heads, d) -> (b, q_len, heads, d). GQA is native."""
    dense_fn, varlen_fn = _flash_kernels()
    if mask.cu_seqlens is not None:
        b, s = q.shape[:2]
        out = varlen_fn(
            q.reshape(b * s, *q.shape[2:]),
            k.reshape(b * s, *k.shape[2:]),
            v.reshape(b * s, *v.shape[2:]),
            cu_seqlens_q=mask.cu_seqlens,
            cu_seqlens_k=mask.cu_seqlens,
            max_seqlen_q=mask.max_seqlen,
            max_seqlen_k=mask.max_seqlen,
            softmax_scale=scale,
            causal=True,
            **_window_kwargs(mask),
        )
        out = out[0] if isinstance(out, tuple) else out  # flash-attn-4 also returns the log-sum-exp
        return out.reshape(b, s, *out.shape[1:])
    out = dense_fn(q, k, v, softmax_scale=scale, causal=True, **_window_kwargs(mask))
    return out[0] if isinstance(out, tuple) else out


def packed_document_boundaries(segment_ids: torch.Tensor) -> AttentionMask:
    """cu_seqlens over the flattened batch: a new document starts where the segment id changes or a row starts."""
    batch, seq = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::seq] = True
    start_index = torch.nonzero(starts).flatten()
    cu_seqlens = torch.cat([start_index, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return AttentionMask(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
