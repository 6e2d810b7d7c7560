"""Bumblebee at decode time: the GenerationEngine's model. It runs the model's own forward
(model/bumblebee.py) and adds only what makes generation faster:

- a KV cache whose rows are slots (SlotCache): each forward continues some of them (`cache_rows`),
  new requests prefill into free slots while others wait; a range of equally long rows is written and
  read as slices (a view of the cache, no gather every step); one new token per row of equally long
  rows needs no mask at all;
- prepared weights (inference/prepared.py), which the model's layers take as `prepared`;
- the LM head: a layout picked per row count, and greedy tokens by a half-precision screen.

tests/model/test_model.py compares it with the model run without a SlotCache and with transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from bumblecore.inference.prepared import (
    SCREEN_BLOCK,
    PreparedScreen,
    cpu_seconds,
    prepare_attention,
    prepare_head,
    prepare_mlp,
    prepare_screens,
    usable,
)
from bumblecore.inference.static_decode import StaticDecodeStep
from bumblecore.model.attention import AttentionMask, window_band
from bumblecore.model.bumblebee import Bumblebee, KVCache

CacheRows = Union[None, slice, torch.Tensor]
"""The cache rows (slots) a forward continues, in order: all (None), a range (slice) or a tensor of row numbers."""

SEES_EVERY_KEY = AttentionMask(causal=False)
"""One new token per row and all rows equally long: each query sees every cached key."""


# ---------------------------------------------------------------------------- the slot cache


@dataclass
class SlotWrite:
    """Where one forward's new tokens go in a SlotCache and what they see, planned once for every layer."""

    index: tuple
    """(row index, position index) tensors for advanced indexing, or, when the rows are a range and all
    equally long, (rows, positions) slices: then the write is a plain copy and the read a view."""
    visible: int
    """Positions attention reads afterwards: those of the longest row, new tokens included."""
    rows: CacheRows
    positions: torch.Tensor
    """(batch, seq) absolute position of each new token."""
    shortest: int
    """The shortest row's length before this forward."""
    masks: dict
    """The AttentionMask of each sliding window (None: full attention) among the layers."""


class SlotCache(KVCache):
    """A KVCache whose rows are slots that forwards continue in any subset: the model's forward takes
    `cache.rows(cache_rows)`, or the cache itself for all rows. Same plan / write / advance as KVCache."""

    def rows(self, rows: CacheRows) -> SlotRows:
        return self if rows is None else SlotRows(self, rows)

    def plan(self, seq: int, windows: set, rows: CacheRows = None) -> SlotWrite:
        device = self.lengths.device
        start = self.lengths if rows is None else self.lengths[rows]
        positions = start[:, None] + torch.arange(seq, device=device)
        shortest, longest = start.aminmax()
        shortest, visible = int(shortest), int(longest) + seq
        self.check_room(visible)
        if shortest == visible - seq and not isinstance(rows, torch.Tensor):
            # All rows equally long and a range of cache rows (the usual decode step): slices.
            index = (slice(None) if rows is None else rows, slice(shortest, visible))
        else:
            if rows is None:
                row_numbers = torch.arange(positions.shape[0], device=device)
            elif isinstance(rows, slice):
                row_numbers = torch.arange(self.batch_size, device=device)[rows]
            else:
                row_numbers = rows
            index = (row_numbers[:, None].expand(positions.shape), positions)
        where = SlotWrite(index, visible, rows, positions, shortest, {})
        where.masks.update((w, decode_mask(where, seq, w)) for w in windows)
        return where

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, where: SlotWrite):
        """Store k, v (batch, seq, kv_heads, head_dim); return this layer's first `visible` positions of the rows written."""
        self.keys[layer][where.index] = k
        self.values[layer][where.index] = v
        if where.rows is None:
            return self.keys[layer][:, : where.visible], self.values[layer][:, : where.visible]
        return self.keys[layer][where.rows, : where.visible], self.values[layer][where.rows, : where.visible]

    def advance(self, where: SlotWrite, added) -> None:
        if where.rows is None:
            self.lengths += added
        else:
            self.lengths[where.rows] += added


class SlotRows(NamedTuple):
    """Some rows of a SlotCache, in order: a cache to the model's forward, continuing only those rows."""

    cache: SlotCache
    rows: CacheRows

    def plan(self, seq: int, windows: set) -> SlotWrite:
        return self.cache.plan(seq, windows, self.rows)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, where: SlotWrite):
        return self.cache.write(layer, k, v, where)

    def advance(self, where: SlotWrite, added) -> None:
        self.cache.advance(where, added)


def decode_mask(where: SlotWrite, seq: int, window: Optional[int]) -> AttentionMask:
    """The mask of the layers with this sliding window (None: full attention)."""
    one_token_each = seq == 1 and where.shortest == where.visible - 1
    if one_token_each and (window is None or where.visible <= window):
        return SEES_EVERY_KEY
    key_positions = torch.arange(where.visible, device=where.positions.device)
    if one_token_each:  # every row's query is at position visible - 1: one band for all
        return AttentionMask(dense=(key_positions > where.shortest - window)[None, None, None], window=window)
    return AttentionMask(dense=window_band(where.positions, key_positions, window)[:, None], window=window)


# ---------------------------------------------------------------------------- the decode-time model


class DecodingBumblebee(nn.Module):
    """A Bumblebee (or a peft model over one) for the GenerationEngine: the model's own forward over a
    SlotCache with prepared weights, and `logits` / `greedy` for its LM head. The prepared weights are
    made here (on CPU a second copy of the layer weights and the LM head)."""

    def __init__(self, model: nn.Module, max_rows: int = 1, static_cache: bool = False):
        """max_rows: the most rows a decode step runs (the engine's slots): above one, the layer
        weights are kept in MKL's packed layout where this CPU build has it (see _in_out).
        static_cache: one-token steps over the cache of `new_cache` run as a StaticDecodeStep."""
        super().__init__()
        self.model = model
        self.bumblebee: Bumblebee = model.get_base_model() if hasattr(model, "get_base_model") else model
        if static_cache and model is not self.bumblebee:
            raise ValueError(
                "static_cache: true needs the model's own weights: merge the LoRA adapter first (bumblecore "
                "merge_lora) or set static_cache: false"
            )
        self.static_cache = static_cache
        self.static: Optional[StaticDecodeStep] = None
        self.config = self.bumblebee.config
        with torch.no_grad():
            packed = max_rows > 1
            self.prepared = [
                (prepare_attention(layer.self_attn, packed), prepare_mlp(layer.mlp, packed))
                for layer in self.bumblebee.model.layers
            ]
            """Per layer, (attention, mlp) as DecoderLayer.forward takes them (None: run the module)."""
            self.head = prepare_head(self.bumblebee.lm_head)
            self.screens = prepare_screens(self.bumblebee.lm_head)
        self.screen = self.screens[0] if self.screens else None
        self._head_layouts: dict[int, str] = {}  # rows -> the LM head's layout (see _pick_head_layout)
        self._screen_pays: dict[int, bool] = {}  # rows -> whether greedy screening beats the full head
        self._screen_for: dict[int, PreparedScreen] = {}  # rows -> the screen that was fastest there

    def new_cache(self, batch_size: int, max_len: int) -> SlotCache:
        parameter = next(self.bumblebee.parameters())
        cache = SlotCache(self.config, batch_size, max_len, dtype=parameter.dtype, device=parameter.device)
        if self.static_cache:
            self.static = StaticDecodeStep(self.bumblebee, cache, prepared=self.prepared)
        return cache

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_cache: SlotCache,
        attention_mask: Optional[torch.Tensor] = None,
        cache_rows: CacheRows = None,
        return_hidden_states: bool = False,
    ) -> torch.Tensor:
        """Logits (or final-norm hidden states) of the new tokens, which are appended to the cache rows
        `cache_rows`. attention_mask marks the right-padding of the new tokens, as in Bumblebee.forward."""
        static = self.static
        if static is not None and static.cache is kv_cache and input_ids.shape[1] == 1 and static.usable():
            # One token per row: every slot in the fixed-shape step, and these rows of its result.
            every_row = torch.arange(kv_cache.batch_size, device=input_ids.device)
            rows = every_row if cache_rows is None else every_row[cache_rows]
            hidden = static.decode(input_ids[:, 0], rows)[rows, None]
            return hidden if return_hidden_states else self.logits(hidden).contiguous()
        hidden = self.bumblebee(
            input_ids,
            attention_mask=attention_mask,
            kv_cache=kv_cache.rows(cache_rows),
            return_hidden_states=True,
            prepared=self.prepared,
        )
        return hidden if return_hidden_states else self.logits(hidden).contiguous()

    def logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LM head on final-norm hidden states (..., hidden); on CPU the result may be a transposed
        view (`forward` makes it contiguous). With `out` (rows, vocab), contiguous and of the logits'
        dtype, the logits are written there (no copy where the layout allows) and `out` is returned."""
        lm_head = self.bumblebee.lm_head
        rows = hidden.numel() // hidden.shape[-1]
        flat = hidden.reshape(rows, hidden.shape[-1])
        if rows > 16 or not usable(self.head, lm_head):
            logits = lm_head(hidden)
        elif rows == 1:
            if _fits(out, rows, self.head.weight):
                return torch.mm(flat, self.head.weight, out=out)
            logits = hidden @ self.head.weight
        else:
            layout = self._head_layouts.get(rows)
            if layout is None:
                layout = self._head_layouts[rows] = self._pick_head_layout(flat)
            if layout == "rows_major":
                if _fits(out, rows, self.head.weight):
                    return torch.mm(flat, self.head.weight, out=out)
                logits = flat @ self.head.weight
            elif layout == "vocab_major":
                logits = (lm_head.weight @ flat.t()).t()
            else:
                logits = lm_head(flat)
            logits = logits.view(*hidden.shape[:-1], -1)
        if out is None:
            return logits
        out.copy_(logits.reshape(out.shape))
        return out

    def _pick_head_layout(self, flat: torch.Tensor) -> str:
        """The fastest way to run the LM head on this many rows on this CPU, among those whose logits
        are bit-identical to F.linear's (so the choice never changes a token). Which is fastest depends
        on the CPU's BLAS path: on an Intel Xeon (vocab, hidden) @ (hidden, rows) was ~1.3x faster than
        F.linear at 4-16 rows; on an AMD EPYC (MKL's AVX2 path) (rows, hidden) @ (hidden, vocab) is
        ~1.3x faster at 16 rows and writes the engine's (rows, vocab) buffer directly. Timed once per
        row count, in this process's CPU time, each with the copy into a (rows, vocab) buffer."""
        weight = self.bumblebee.lm_head.weight
        reference = F.linear(flat, weight)
        candidates = {
            "linear": lambda dst: dst.copy_(F.linear(flat, weight)),
            "vocab_major": lambda dst: dst.copy_((weight @ flat.t()).t()),
            "rows_major": lambda dst: torch.mm(flat, self.head.weight, out=dst),
        }
        dst = torch.empty_like(reference)
        best, best_time = "linear", float("inf")
        for name, run in candidates.items():
            run(dst)
            if not torch.equal(dst, reference):
                continue
            seconds = cpu_seconds(lambda run=run: run(dst))
            if seconds < best_time:
                best, best_time = name, seconds
        return best

    def greedy(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """argmax of the logits of final-norm hidden states (rows, hidden) by screening
        (`screened_argmax`) where that is faster than the full fp32 logits at this many rows on this
        CPU, else None (then compute the logits). Decided once per row count by timing the full head
        and each screen (`_screening_pays`)."""
        rows = hidden.shape[0]
        if not usable(self.screen, self.bumblebee.lm_head) or hidden.dtype != torch.float32:
            return None
        pays = self._screen_pays.get(rows)
        if pays is None:
            pays = self._screen_pays[rows] = self._screening_pays(hidden)
        return self.screened_argmax(hidden, self._screen_for.get(rows)) if pays else None

    def _screening_pays(self, hidden: torch.Tensor) -> bool:
        """Times the full head and each screen that decides these rows (a screen whose error bound is
        wide for this model keeps too many candidates and gives up); keeps the fastest screen for this
        row count, or says the full head is faster."""
        best = cpu_seconds(lambda: self.logits(hidden).argmax(dim=-1))
        for screen in self.screens:
            if self.screened_argmax(hidden, screen) is None:
                continue
            seconds = cpu_seconds(lambda screen=screen: self.screened_argmax(hidden, screen))
            if seconds < best:
                best, self._screen_for[hidden.shape[0]] = seconds, screen
        return hidden.shape[0] in self._screen_for

    def screened_argmax(self, hidden: torch.Tensor, screen: Optional[PreparedScreen] = None) -> Optional[torch.Tensor]:
        """argmax of the fp32 logits of hidden states (rows, hidden) from the half-precision screen, or
        None where the screen cannot decide (non-finite scores, nearly flat rows, no screen).

        The screen's scores y' differ from the fp32 logits y by at most B per row (see
        PreparedScreen.error_bound). The true argmax v* has y'_v* >= y_v* - B >= y_u - B >= y'_u - 2B
        for every u, so it is among the tokens within 2B of the row's top y' (so are tokens tied with
        it). Those columns are recomputed with the fp32 weight (bit-identical to the full product's:
        at least 32 columns, measured) and their argmax is the first maximum, as the full argmax."""
        rows = hidden.shape[0]
        lm_head = self.bumblebee.lm_head
        screen = screen or self.screen
        if not usable(screen, lm_head) or hidden.dtype != torch.float32:
            return None
        approx = screen.scores(hidden)
        bound = screen.error_bound(hidden)
        vocab = approx.shape[1]
        if vocab % SCREEN_BLOCK:
            floor = approx.amax(dim=-1) - 2 * bound
            if not bool(torch.isfinite(floor).all()):  # NaN or inf somewhere: the full logits decide
                return None
            columns = (approx >= floor[:, None]).any(dim=0).nonzero()[:, 0]
        else:
            # Blocks first (as greedy_tokens): comparing every score is two more passes over them.
            blocks = approx.view(rows, vocab // SCREEN_BLOCK, SCREEN_BLOCK)
            block_max = blocks.amax(dim=-1)
            floor = block_max.amax(dim=-1) - 2 * bound
            if not bool(torch.isfinite(floor).all()):  # NaN or inf somewhere: the full logits decide
                return None
            kept = (block_max >= floor[:, None]).any(dim=0).nonzero()[:, 0]
            inside = (blocks[:, kept] >= floor[:, None, None]).any(dim=0).nonzero()
            columns = kept[inside[:, 0]] * SCREEN_BLOCK + inside[:, 1]
        if columns.numel() > 1024:  # nearly flat logits: the full product is cheaper
            return None
        if columns.numel() < 32:  # MKL's narrow products round differently: widen with other columns
            columns = torch.cat([columns, torch.arange(32, device=columns.device)]).unique()
        exact = F.linear(hidden, lm_head.weight[columns])
        return columns[exact.argmax(dim=-1)]


def decoding_model(model: nn.Module, max_rows: int, static_cache: bool = False) -> nn.Module:
    """What the GenerationEngine decodes with: a model that brings its own cache (a transformers family,
    model/transformers_family.py) as it is, else a DecodingBumblebee."""
    if not hasattr(model, "new_cache"):
        return DecodingBumblebee(model, max_rows, static_cache)
    if static_cache:
        raise ValueError(
            f"static_cache: true decodes Bumblebee models (Qwen2, Llama, Qwen3, Mistral layouts); this model "
            f"({type(model).__name__}) runs through transformers: set static_cache: false"
        )
    return model


def _fits(out: Optional[torch.Tensor], rows: int, weight_t: torch.Tensor) -> bool:
    return (
        out is not None
        and out.is_contiguous()
        and out.dtype == weight_t.dtype
        and out.shape == (rows, weight_t.shape[1])
    )
