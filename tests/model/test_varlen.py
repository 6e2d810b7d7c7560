"""Packed rows through varlen attention, on the CPU: the `cu_seqlens` built from a real packed batch
(data/packing.py) describe the same documents as the per-document mask, and attention computed document
by document from them equals the masked attention, forward and gradients. FlashAttention's own kernels
need CUDA (bench/gpu.py's flash and varlen checks); here our call into them runs against a reference
written from flash-attn's documented varlen API."""

import json

import numpy as np
import pytest
import torch
from tiny import make_tiny_model

from bumblecore.data.cache import build_cache
from bumblecore.data.packing import build_units, collate
from bumblecore.model import attention
from bumblecore.model.attention import (
    AttentionMask,
    eager_attention,
    flash_attention,
    packed_document_boundaries,
    per_document_attention,
)
from bumblecore.recipes import recipe_for


def packed_batch(tmp_path, tok):
    """A batch of packed SFT rows (greedy packing, padding to the longest row) and its units."""
    rng = np.random.default_rng(0)
    words = ["bee", "hive", "flower", "honey", "wing"]
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(14):
            question = " ".join(rng.choice(words, size=int(rng.integers(1, 9))))
            f.write(json.dumps({"instruction": f"{i} {question}", "output": " ".join(rng.choice(words, 4))}) + "\n")
    reading = recipe_for("sft").reading
    cache = build_cache(tmp_path / "d.jsonl", tok, reading, 256, cache_dir=tmp_path / "c", progress=False)
    units = build_units(cache, reading, 256, packing=True, seed=1)
    batch = collate(units, list(range(len(units))), tok.pad_token_id, packing=True)
    return units, batch


def document_of_each_token(cu_seqlens: torch.Tensor) -> torch.Tensor:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def test_cu_seqlens_of_packed_rows_are_the_documents_of_the_mask(tmp_path, tok):
    units, batch = packed_batch(tmp_path, tok)
    rows, width = batch["input_ids"].shape
    assert rows >= 2 and any(len(row) > 1 for row in units.rows)  # several rows, several samples in a row
    mask = packed_document_boundaries(batch["segment_ids"])

    # Oracle 1: the samples collate() placed, each row's padding one more document.
    starts = []
    for r, row in enumerate(units.rows):
        column = 0
        for piece in row:
            starts.append(r * width + column)
            column += piece.end - piece.start
        if column < width:
            starts.append(r * width + column)
    assert mask.cu_seqlens.tolist() == starts + [rows * width]
    assert mask.cu_seqlens.dtype == torch.int32  # what flash-attn's varlen kernels take
    assert mask.max_seqlen == int((mask.cu_seqlens[1:] - mask.cu_seqlens[:-1]).max())

    # Oracle 2: the dense per-document mask the model builds for eager attention.
    model = make_tiny_model(vocab_size=len(tok), attn_implementation="eager")
    dense = model._build_mask(width, torch.device("cpu"), None, batch["segment_ids"]).dense[:, 0]
    document = document_of_each_token(mask.cu_seqlens).view(rows, width)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    assert torch.equal(dense, (document[:, :, None] == document[:, None, :]) & causal)


def random_packed_segments(rows: int, width: int, seed: int) -> torch.Tensor:
    """Rows of documents of 1-7 tokens, the last of row 0 a padding segment (1 << 20, as collate() marks it),
    row 1 one document with the same segment id as row 2's first (a row start alone separates them)."""
    generator = torch.Generator().manual_seed(seed)
    segments = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        start, index = 0, 0
        while start < width:
            n = int(torch.randint(1, 8, (1,), generator=generator))
            segments[r, start : start + n] = index
            start, index = start + n, index + 1
    segments[0, -5:] = 1 << 20
    segments[1] = 0
    return segments


def masked_reference(q, k, v, segments, window, scale):
    """Eager attention with the dense per-document mask (b, s, heads, d) -> (b, s, heads, d)."""
    steps = torch.arange(q.shape[1])
    allowed = attention.window_band(steps, steps, window)[None] & (segments[:, :, None] == segments[:, None, :])
    mask = AttentionMask(dense=allowed[:, None])
    return eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale).transpose(1, 2)


def qkv(seed: int, rows=3, width=24, heads=4, kv_heads=2, dim=8):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(rows, width, heads, dim), (rows, width, kv_heads, dim), (rows, width, kv_heads, dim)]
    return [torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes]


def assert_same_attention(kernel, window, seed):
    """kernel(q, k, v, mask from cu_seqlens) against the masked reference: outputs and q/k/v gradients."""
    q, k, v = qkv(seed)
    segments = random_packed_segments(q.shape[0], q.shape[1], seed)
    scale = q.shape[-1] ** -0.5
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    results = []
    for run in (kernel, None):
        mask = packed_document_boundaries(segments)
        mask.window = window
        out = run(q, k, v, mask, scale) if run else masked_reference(q, k, v, segments, window, scale)
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
        results.append((out, *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # eager: fp32 softmax


@pytest.mark.parametrize("window", [None, 3])
def test_attention_document_by_document_equals_the_masked_attention(window):
    assert_same_attention(per_document_attention, window, seed=3)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                     window_size=(-1, -1)):  # fmt: skip
    """flash-attn's flash_attn_varlen_func as its docstring defines it, one document at a time:
    q (total, heads, d), k/v (total, kv_heads, d); query i of a document attends keys j with
    i - left <= j <= i + right (negative: unbounded), and j <= i when causal."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    assert max_seqlen_q == max_seqlen_k == max(lengths)
    left, right = window_size
    outputs = []
    for start, n in zip(cu_seqlens_q[:-1].tolist(), lengths):
        qd, kd, vd = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
        kd, vd = (t.repeat_interleave(qd.shape[0] // kd.shape[0], dim=0) for t in (kd, vd))
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = torch.ones(n, n, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        scores = (qd @ kd.transpose(-1, -2) * softmax_scale).masked_fill(~allowed, float("-inf"))
        outputs.append((scores.softmax(-1) @ vd).transpose(0, 1))
    return torch.cat(outputs), None  # flash-attn-4 returns (out, lse): our call takes either


@pytest.mark.parametrize("window", [None, 3])
def test_our_flash_call_passes_the_documents_and_window_flash_attn_expects(monkeypatch, window):
    monkeypatch.setattr(attention, "_flash_kernels", lambda: (None, reference_varlen))
    assert_same_attention(flash_attention, window, seed=5)
