"""A static-shape, compiled decode step for the GenerationEngine (`static_cache: true`).

Every decode step of the engine runs one new token for every slot of its cache: the same shapes each
step, so the step compiles once (per length bucket, below) and replays: inductor's C++ kernels on CPU,
CUDA graphs on CUDA (`mode="reduce-overhead"`). What a step does, in one graph:

- the model's own forward (model/bumblebee.py) over `StaticSlots`, a view of the engine's SlotCache
  (preallocated (slots, max_len, kv_heads, head_dim) per layer) that writes each row's new key and
  value in place at that row's length (`index_put_`) and masks every key past it: rows of any lengths
  in one fixed-shape step, with no Python per row;
- the LM head and each row's greedy token (argmax), so an all-greedy batch reads back one id per row.

Shapes: all slots every step (a free slot computes a throwaway row) and the keys of the first
`visible` positions, rounded up to a bucket (a power of two, at least 64): a bucket is one compiled
graph, so a step over a short context does not read the whole max_len of keys, and a context that
grows recompiles only at each doubling. Slots not decoding this step (free, or left out of a retry)
write their throwaway key at their own length, which no query sees until they write it again.

On CPU the weights are frozen into the graph (inductor's `freezing`), which lets it prepack them for
oneDNN/MKL once instead of in every product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bumblecore.model.attention import AttentionMask, window_band
from bumblecore.model.bumblebee import Bumblebee, KVCache

SMALLEST_BUCKET = 64


def bucket(length: int, max_len: int) -> int:
    """The keys a step reads for rows of at most `length` positions: the next power of two (>= 64)."""
    size = SMALLEST_BUCKET
    while size < length:
        size *= 2
    return min(size, max_len)


class StaticWrite(NamedTuple):
    """Bumblebee.forward's plan of one step: each row's new token at its own length."""

    positions: torch.Tensor
    """(slots, 1) position of each row's new token."""
    masks: dict


class StaticSlots:
    """A KVCache's rows as the compiled step reads them: all rows, a fixed `visible` length."""

    def __init__(self, cache: KVCache, visible: int):
        self.cache = cache
        self.visible = visible

    def plan(self, seq: int, windows: set) -> StaticWrite:
        # A row past the bucket is not decoding this step: its throwaway key goes to the bucket's end.
        positions = self.cache.lengths.clamp(max=self.visible - 1)[:, None]
        key_positions = torch.arange(self.visible, device=positions.device)
        masks = {w: AttentionMask(dense=window_band(positions, key_positions, w)[:, None], window=w) for w in windows}
        return StaticWrite(positions, masks)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, where: StaticWrite):
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys.index_put_((rows, where.positions), k)
        values.index_put_((rows, where.positions), v)
        return keys[:, : self.visible], values[:, : self.visible]

    def advance(self, where: StaticWrite, added) -> None:
        pass  # the engine advances only the rows that decoded (StaticDecodeStep.__call__)


class ConcatenatedAttention(NamedTuple):
    """An Attention's q, k and v as one product, concatenated inside the graph: frozen, the concatenation
    is folded into one constant weight that inductor prepacks (Attention.forward's `prepared`)."""

    attn: nn.Module

    def matches(self, attn: nn.Module) -> bool:
        return True

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        return F.linear(x, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), bias)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.o_proj(x)


class ConcatenatedMLP(NamedTuple):
    """An MLP's gate and up as one product (as ConcatenatedAttention)."""

    mlp: nn.Module

    def matches(self, mlp: nn.Module) -> bool:
        return True

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.cat([self.mlp.gate_proj.weight, self.mlp.up_proj.weight]))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(x)


class StaticDecodeStep:
    """One new token for every row of the engine's cache, as one fixed-shape (compiled) step that returns
    the final-norm hidden states (slots, hidden); the engine's LM head and greedy screen take them
    from there (decode.py). Used only while the weights are those it was built with (`usable`):
    compiled, they are frozen into the graph."""

    def __init__(self, bumblebee: Bumblebee, cache: KVCache, compile: bool = True, prepared=None):
        """prepared: the eager step's weights per layer (DecodingBumblebee.prepared); compiled, the
        step concatenates the projections in its graph instead."""
        self.bumblebee = bumblebee
        self.cache = cache
        device = cache.lengths.device
        if compile:
            prepared = [(ConcatenatedAttention(l.self_attn), ConcatenatedMLP(l.mlp)) for l in bumblebee.model.layers]
        self.prepared = prepared
        self.versions = _versions(bumblebee)
        self.freeze = compile and device.type == "cpu"
        bumblebee.rope_cos_sin(torch.zeros(1, 1, dtype=torch.long, device=device), cache.keys[0].dtype)  # its table
        if compile and device.type == "cuda":
            for tensor in (*cache.keys, *cache.values):
                torch._dynamo.mark_static_address(tensor)  # written in place: CUDA graphs keep their address
            self._step = torch.compile(self._hidden, mode="reduce-overhead", dynamic=False)
        elif compile:
            self._step = torch.compile(self._hidden, dynamic=False)
        else:
            self._step = self._hidden

    def usable(self) -> bool:
        return not torch.is_grad_enabled() and _versions(self.bumblebee) == self.versions

    def _hidden(self, tokens: torch.Tensor, visible: int) -> torch.Tensor:
        return self.bumblebee(
            tokens[:, None],
            kv_cache=StaticSlots(self.cache, visible),
            return_hidden_states=True,
            prepared=self.prepared,
        )[:, 0]

    def decode(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The hidden states of every row after its token: `tokens` for the cache rows `rows` (in
        order), which alone advance; any token for the others."""
        decoding = torch.zeros(self.cache.batch_size, dtype=torch.bool, device=tokens.device)
        decoding[rows] = True
        every = torch.zeros(self.cache.batch_size, dtype=tokens.dtype, device=tokens.device)
        every[rows] = tokens
        return self(every, decoding)

    def __call__(self, tokens: torch.Tensor, decoding: torch.Tensor) -> torch.Tensor:
        """tokens: (slots,) each row's last token (any valid id for rows not decoding); decoding:
        (slots,) bool, the rows that decode: their lengths grow by one."""
        longest = int(torch.where(decoding, self.cache.lengths, 0).max()) + 1
        self.cache.check_room(longest)
        # Freezing is read when a graph compiles (torch.compile's `options` do not reach it), and each
        # engine's buckets are graphs of the one step function: both set here, for this step only (a
        # new bucket compiles inside this call).
        with torch._inductor.config.patch(freezing=self.freeze), torch._dynamo.config.patch(recompile_limit=RECOMPILES):
            hidden = self._step(tokens, bucket(longest, self.cache.max_len))
        self.cache.lengths += decoding
        return hidden


RECOMPILES = 64
"""Graphs of the step kept at once: every engine's buckets (one per doubling of the context)."""


def _versions(model: nn.Module) -> tuple:
    """In-place updates (an optimiser step, a load) bump a tensor's version: frozen weights are then stale."""
    return tuple(p._version for p in model.parameters())
