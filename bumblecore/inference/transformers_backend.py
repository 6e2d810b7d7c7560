"""Generation for architectures Bumblebee does not implement, through transformers, behind the engine's
model interface. Each slot keeps its tokens and every step runs the whole sequence (no KV cache):
exact and simple, slower than the native path."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class TokenHistory:
    """Stands in for KVCache: the tokens of each slot."""

    def __init__(self, batch_size: int, max_len: int):
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]
        self.max_len = max_len

    def reset(self, rows: torch.Tensor) -> None:
        for row in rows.tolist():
            self.rows[row] = []


class RecomputingCausalLM(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.hf = model
        config = model.config
        self.config = SimpleNamespace(vocab_size=config.vocab_size,
                                      max_position_embeddings=getattr(config, "max_position_embeddings", 4096))

    def new_cache(self, batch_size: int, max_len: int) -> TokenHistory:
        return TokenHistory(batch_size, max_len)

    def forward(self, input_ids, attention_mask=None, kv_cache: TokenHistory = None, cache_rows=None):
        rows = cache_rows.tolist()
        counts = attention_mask.sum(-1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(rows)
        for i, (row, n) in enumerate(zip(rows, counts)):
            kv_cache.rows[row] += input_ids[i, :n].tolist()
        sequences = [kv_cache.rows[r] for r in rows]
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=input_ids.device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, device=ids.device)
            mask[i, : len(s)] = 1
        logits = self.hf(input_ids=ids, attention_mask=mask).logits
        out = torch.zeros(len(rows), input_ids.shape[1], logits.shape[-1], dtype=logits.dtype, device=logits.device)
        for i, (s, n) in enumerate(zip(sequences, counts)):
            out[i, :n] = logits[i, len(s) - n : len(s)]
        return out
