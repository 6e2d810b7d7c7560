"""Prefix reuse for the GenerationEngine: an LRU store of KV-cache blocks keyed by token ids.

A multi-turn chat sends its whole history every turn; without reuse every turn prefills it again.
Here a finished request donates the keys and values of its tokens (prompt and completion), cut into
fixed blocks of `block_size` tokens, and a new request copies the longest run of stored blocks that
starts its prompt into its slot, so only the rest is prefilled.

Keys: a block's key is (its parent block's id, its own token ids). A block is thus found only under
the exact same preceding tokens (what its keys and values depend on), a lookup walks the prompt one
block at a time, and the match is exact (dict equality on the token tuples, no hash collisions).
Fixed blocks rather than a token-level trie: one dict lookup per 16 tokens, blocks shared by every
conversation with the same start (a system prompt is stored once), and at most block_size - 1
tokens more to prefill than a token-exact match would leave.

Eviction: least recently used block first, within a byte budget. Every use touches a chain from its
deepest block up to the first, so a parent is always more recently used than its children and the
oldest block is always a leaf: eviction never strands a chain's tail behind a missing parent.

Blocks are copies (the slot's row is reused by the next request), on the cache's device and dtype.
What this reads and writes of the engine's cache (model/bumblebee.py KVCache): per layer `keys[l]`
and `values[l]`, (slots, max_len, kv_heads, head_dim), and `lengths` (slots,); nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

DEFAULT_BLOCK_SIZE = 16


class _Block(NamedTuple):
    id: int
    kv: torch.Tensor
    """(layers, 2, block_size, kv_heads, head_dim): keys [:, 0], values [:, 1]."""


class PrefixCache:
    """An LRU store of KV blocks within `budget_bytes` (0: stores nothing)."""

    def __init__(self, budget_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        self.budget_bytes = max(0, int(budget_bytes))
        self.block_size = block_size
        self.blocks: OrderedDict[tuple, _Block] = OrderedDict()  # oldest first
        self.bytes = 0
        self._next_id = 1  # 0 is the root: the parent of a sequence's first block
        self.stats = {"lookups": 0, "hit_tokens": 0, "stored_blocks": 0, "evicted_blocks": 0}

    def __len__(self) -> int:
        return len(self.blocks)

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0

    def _touch(self, keys: list[tuple]) -> None:
        for key in reversed(keys):  # deepest first: parents end up more recent than their children
            self.blocks.move_to_end(key)

    def match(self, tokens: list[int], limit: int) -> list[torch.Tensor]:
        """The stored blocks that start `tokens`, at most `limit` tokens of them, in order."""
        self.stats["lookups"] += 1
        keys, found, parent = [], [], 0
        b = self.block_size
        for start in range(0, (min(limit, len(tokens)) // b) * b, b):
            key = (parent, tuple(tokens[start : start + b]))
            block = self.blocks.get(key)
            if block is None:
                break
            keys.append(key)
            found.append(block.kv)
            parent = block.id
        self._touch(keys)
        self.stats["hit_tokens"] += len(found) * b
        return found

    def load(self, cache, slot: int, tokens: list[int], limit: int) -> int:
        """Copy the longest stored prefix of `tokens` (at most `limit` tokens) into cache row `slot`
        at positions 0.. and set the row's length to it; returns that length (0: nothing stored)."""
        found = self.match(tokens, limit)
        if not found:
            return 0
        kv = torch.cat(found, dim=2) if len(found) > 1 else found[0]
        n = kv.shape[2]
        for layer in range(len(cache.keys)):
            cache.keys[layer][slot, :n] = kv[layer, 0]
            cache.values[layer][slot, :n] = kv[layer, 1]
        cache.lengths[slot] = n
        return n

    def store(self, cache, slot: int, tokens: list[int]) -> None:
        """Donate the full blocks of cache row `slot`, whose positions hold `tokens` (as many as the
        row's length; extra tokens are ignored): blocks already stored are only touched."""
        if not self.budget_bytes:
            return
        b = self.block_size
        count = min(int(cache.lengths[slot]), len(tokens)) // b
        keys, parent, first_new = [], 0, count
        for i in range(count):
            key = (parent, tuple(tokens[i * b : (i + 1) * b]))
            block = self.blocks.get(key)
            if block is None:
                first_new = i
                break
            keys.append(key)
            parent = block.id
        new = count - first_new
        if new:
            layers = len(cache.keys)
            start, end = first_new * b, count * b
            k0 = cache.keys[0]
            staged = torch.empty(
                (new, layers, 2, b, *k0.shape[2:]), dtype=k0.dtype, device=k0.device
            )  # one copy per layer and kind, then one clone per block (blocks are freed one by one)
            for layer in range(layers):
                staged[:, layer, 0] = cache.keys[layer][slot, start:end].view(new, b, *k0.shape[2:])
                staged[:, layer, 1] = cache.values[layer][slot, start:end].view(new, b, *k0.shape[2:])
            block_bytes = staged[0].numel() * staged.element_size()
            if block_bytes > self.budget_bytes:
                self._touch(keys)
                return
            added = []
            for i in range(first_new, count):
                key = (parent, tuple(tokens[i * b : (i + 1) * b]))
                parent = self._next_id
                self._next_id += 1
                added.append((key, _Block(parent, staged[i - first_new].clone())))
            for key, block in reversed(added):  # deepest first, as _touch orders them
                self.blocks[key] = block
                self.bytes += block_bytes
            self.stats["stored_blocks"] += new
        self._touch(keys)
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.budget_bytes and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.bytes -= block.kv.numel() * block.kv.element_size()
            self.stats["evicted_blocks"] += 1
