"""Losses. Token-weighted cross-entropy computed in chunks, so the (tokens x vocab) logits never
exist all at once: with a 151,936-token vocabulary they would dominate training memory."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Bytes of fp32 logits one chunk may hold: 256 MB is ~440 tokens at a 151,936 vocabulary.
LOGITS_BUDGET_BYTES = 1 << 28


def shift_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Position t predicts labels[t + 1]. The first token of a packed document is not predicted from
    the previous document (alone it would have no predecessor), and the last position predicts nothing."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if segment_ids is not None:
        crosses = segment_ids[:, 1:] != segment_ids[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, IGNORE_INDEX)
    return targets


def _chunk_loss(hidden: torch.Tensor, lm_head: Callable, targets: torch.Tensor) -> torch.Tensor:
    # fp32 logits for the softmax, as transformers does; summed, normalised by the caller.
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, lm_head: Callable, targets: torch.Tensor, chunk_tokens: int | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target positions, and their count.

    hidden: (..., H) final hidden states; targets: (...) already shifted (see shift_targets), -100 = skip.
    lm_head is called as a module (not its weight) so sharded strategies (ZeRO-3) gather it. Only target
    positions reach the LM head (an SFT prompt costs nothing there), and each chunk's logits (sized to
    LOGITS_BUDGET_BYTES unless chunk_tokens is given) are recomputed in backward instead of stored.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    count = int(targets.numel())
    if count == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected for backward on every rank
    if chunk_tokens is None:
        vocab = lm_head.weight.shape[0] if hasattr(lm_head, "weight") and lm_head.weight.ndim == 2 else 32768
        chunk_tokens = max(64, LOGITS_BUDGET_BYTES // (4 * max(1, vocab)))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, h, lm_head, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, lm_head, t)
    return total, count
