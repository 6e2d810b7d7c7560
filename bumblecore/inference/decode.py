"""Bumblebee at decode time: the GenerationEngine's model. The same layers and weights as the reference
model (bumblecore/model/bumblebee.py), run with what only makes generation faster:

- a KV cache whose rows are slots: each forward continues some of them (`cache_rows`), new requests
  prefill into free slots while others wait; a range of equally long rows is written and read as
  slices (a view of the cache, no gather every step);
- prepared weights: q/k/v and gate/up concatenated so each runs as one matmul, every projection kept
  (in, out), and on CPU a (hidden, vocab) copy of the LM head. The model's parameters stay the source
  of truth: a prepared weight is used only while its parameters' version counters are unchanged and
  gradients are off, so training the model later is always safe;
- masks and kernels for one new token per row (rows equally long: no mask at all).

The math is the reference model's; tests/test_model.py compares the two.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from bumblecore.model.attention import AttentionMask, window_band
from bumblecore.model.bumblebee import MLP, Attention, Bumblebee, KVCache

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


# ---------------------------------------------------------------------------- prepared weights


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
        return _usable(self, *_attention_linears(attn))

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
        return _usable(self, *_mlp_linears(mlp))

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


def _cpu_seconds(run, repeats: int = 3) -> float:
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


def _usable(prepared, *linears: nn.Linear) -> bool:
    return prepared is not None and not torch.is_grad_enabled() and prepared.versions == _versions(*linears)


# ---------------------------------------------------------------------------- the decode-time model


class DecodingBumblebee(nn.Module):
    """A Bumblebee (or a peft model over one) for the GenerationEngine: the model's own forward over a
    SlotCache with prepared weights, and `logits` / `greedy` for its LM head. The prepared weights are
    made here (on CPU a second copy of the layer weights and the LM head)."""

    def __init__(self, model: nn.Module, max_rows: int = 1):
        """max_rows: the most rows a decode step runs (the engine's slots): above one, the layer
        weights are kept in MKL's packed layout where this CPU build has it (see _in_out)."""
        super().__init__()
        self.model = model
        self.bumblebee: Bumblebee = model.get_base_model() if hasattr(model, "get_base_model") else model
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
        return SlotCache(self.config, batch_size, max_len, dtype=parameter.dtype, device=parameter.device)

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
        hidden = self.bumblebee.hidden_states(
            input_ids, attention_mask=attention_mask, kv_cache=kv_cache.rows(cache_rows), prepared=self.prepared
        )
        return hidden if return_hidden_states else self.logits(hidden).contiguous()

    def logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LM head on final-norm hidden states (..., hidden); on CPU the result may be a transposed
        view (`forward` makes it contiguous). With `out` (rows, vocab), contiguous and of the logits'
        dtype, the logits are written there (no copy where the layout allows) and `out` is returned."""
        lm_head = self.bumblebee.lm_head
        rows = hidden.numel() // hidden.shape[-1]
        flat = hidden.reshape(rows, hidden.shape[-1])
        if rows > 16 or not _usable(self.head, lm_head):
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
            seconds = _cpu_seconds(lambda run=run: run(dst))
            if seconds < best_time:
                best, best_time = name, seconds
        return best

    def greedy(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """argmax of the logits of final-norm hidden states (rows, hidden) by screening
        (`screened_argmax`) where that is faster than the full fp32 logits at this many rows on this
        CPU, else None (then compute the logits). Decided once per row count by timing the full head
        and each screen (`_screening_pays`)."""
        rows = hidden.shape[0]
        if not _usable(self.screen, self.bumblebee.lm_head) or hidden.dtype != torch.float32:
            return None
        pays = self._screen_pays.get(rows)
        if pays is None:
            pays = self._screen_pays[rows] = self._screening_pays(hidden)
        return self.screened_argmax(hidden, self._screen_for.get(rows)) if pays else None

    def _screening_pays(self, hidden: torch.Tensor) -> bool:
        """Times the full head and each screen that decides these rows (a screen whose error bound is
        wide for this model keeps too many candidates and gives up); keeps the fastest screen for this
        row count, or says the full head is faster."""
        best = _cpu_seconds(lambda: self.logits(hidden).argmax(dim=-1))
        for screen in self.screens:
            if self.screened_argmax(hidden, screen) is None:
                continue
            seconds = _cpu_seconds(lambda screen=screen: self.screened_argmax(hidden, screen))
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
        if not _usable(screen, lm_head) or hidden.dtype != torch.float32:
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


def _fits(out: Optional[torch.Tensor], rows: int, weight_t: torch.Tensor) -> bool:
    return (
        out is not None
        and out.is_contiguous()
        and out.dtype == weight_t.dtype
        and out.shape == (rows, weight_t.shape[1])
    )
