"""Bumblebee: a Qwen2.5-style decoder in one file.

token embedding -> N x [norm -> GQA attention with RoPE -> residual -> norm -> gated MLP -> residual]
-> final norm -> LM head (tied to the embedding or not).

Parameter names are exactly Hugging Face Qwen2's (`model.layers.0.self_attn.q_proj.weight`, ...),
so loading and saving HF checkpoints is an identity and peft target-module names match.

This file is the readable reference, and the one forward: training runs it as is, and generation
(inference/decode.py) runs it with an explicit cache object (a KVCache, or decoding's SlotCache whose
rows are slots of a continuous batch: `plan`, `write`, `advance`) and `prepared` weights (the same
projections laid out for one new token per row). The attention kernels are in model/attention.py.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bumblecore.model.attention import (
    AttentionMask,
    eager_attention,
    flash_attention,
    flash_available,
    packed_document_boundaries,
    per_document_attention,
    sdpa_attention,
    window_band,
)
from bumblecore.model.config import BumblebeeConfig
from bumblecore.model.hf_config import dtype_name, read_config, resolve_dtype
from bumblecore.model.hf_io import expected_tensors, iter_checkpoint, save_pretrained
from bumblecore.model.rope import rotary_cos_sin
from bumblecore.model.tiling import checkpointed_layer, tiled_mlp

ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# ---------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _recompute_in_backward(x, self.weight):
            return checkpoint(self._scaled_norm, x, use_reentrant=False)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # fp32 inference: the same numbers as _scaled_norm (its casts are no-ops) as one op with the
            # weight, ~30 instead of ~60 us a call on CPU: a decode step calls it twice per layer.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self._scaled_norm(x)

    def _scaled_norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as Qwen2/Llama do, so bf16 matches them.
        # (F.rms_norm is x * rsqrt(mean(x^2) + eps) as one fused op.)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def _recompute_in_backward(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether an elementwise step (a norm, the MLP's gate) should keep only its inputs for backward and
    recompute its output there: training, and nothing that would stop the recompute.

    Its intermediates (the normalised x before scaling, silu(gate)) are as large as the input and cost
    almost nothing to recompute; with 30 thin layers (SmolLM2-135M, hidden 576) they were ~20% of
    training's saved activations. The recompute runs the very same ops, so gradients are bit-identical.
    Not under ZeRO-3: a partitioned weight is only gathered around its module's own call. (Inside a
    checkpointed layer it nests: the layer's recompute then keeps less too.)"""
    if not (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
        return False  # compiled (compile: true), the partitioner decides what backward recomputes
    return not any(hasattr(w, "ds_id") for w in weights)


def make_norm(config: BumblebeeConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------------- RoPE


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, head_dim), their two halves equal.

    The same numbers as x * cos + rotate_half(x) * sin, bit for bit, in three passes over x instead of
    five and without rotate_half's concatenation in either direction (backward is the same rotation
    by -angle, and keeps only cos and sin)."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(2), sin[..., :half].unsqueeze(2)
    if torch.compiler.is_compiling():  # the plain formula: inductor fuses it, and traces no out= writes
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotation.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), each product rounded before the sum."""
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    first, second = x.chunk(2, dim=-1)
    out_first, out_second = out.chunk(2, dim=-1)
    torch.mul(first, cos, out=out_first).sub_(second * sin)
    torch.mul(second, cos, out=out_second).add_(first * sin)
    return out


class _Rotation(torch.autograd.Function):
    """RoPE as one autograd node: its gradient is the inverse rotation (by -angle) of the incoming one."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


# ---------------------------------------------------------------------------- KV cache


class CacheWrite(NamedTuple):
    """Where one forward's new tokens go in a KVCache and what they see, planned once for every layer."""

    positions: torch.Tensor
    """(batch, seq) absolute position of each new token."""
    visible: int
    """Positions attention reads afterwards: those of the longest row, new tokens included."""
    masks: dict
    """The AttentionMask of each sliding window (None: full attention) among the layers."""


class KVCache:
    """Keys and values of the tokens seen so far, preallocated, one row per sequence with its own length.

    Layout per layer: (batch, max_len, kv_heads, head_dim). A forward writes each row's new tokens at
    positions `lengths[row] + t` and then advances the row by its number of real tokens, so rows of
    different lengths decode together without left padding (right-padded prompts are fine: a pad is
    written past the row's end and overwritten by the row's next token).

    What the forward asks of a cache: `plan` (once), `write` (each layer), `advance` (once at the end).
    Decoding's SlotCache (inference/decode.py) answers the same three for a subset of its rows.
    """

    def __init__(self, config: BumblebeeConfig, batch_size: int, max_len: int, dtype=None, device=None):
        shape = (batch_size, max_len, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def reset(self, rows: Optional[torch.Tensor] = None) -> None:
        """Empty all rows, or only `rows`."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def check_room(self, visible: int) -> None:
        if visible > self.max_len:
            raise ValueError(f"KV cache overflow: needs {visible} positions, holds {self.max_len}")

    def plan(self, seq: int, windows: set) -> CacheWrite:
        """Positions and masks of `seq` new tokens per row: each row continues from its own length."""
        positions = self.lengths[:, None] + torch.arange(seq, device=self.lengths.device)
        visible = int(self.lengths.max()) + seq
        self.check_room(visible)
        key_positions = torch.arange(visible, device=positions.device)
        masks = {w: AttentionMask(dense=window_band(positions, key_positions, w)[:, None], window=w) for w in windows}
        return CacheWrite(positions, visible, masks)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, where: CacheWrite):
        """Store k, v (batch, seq, kv_heads, head_dim) at `where.positions`; return this layer's keys and
        values of the first `where.visible` positions."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.keys[layer][rows, where.positions] = k
        self.values[layer][rows, where.positions] = v
        return self.keys[layer][:, : where.visible], self.values[layer][:, : where.visible]

    def advance(self, where: CacheWrite, added) -> None:
        """After the forward: each row grows by `added` (its count of real new tokens, or one int for all)."""
        self.lengths += added


# ---------------------------------------------------------------------------- attention


class Attention(nn.Module):
    def __init__(self, config: BumblebeeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.attn_implementation = config.attn_implementation
        """The attention kernel: sdpa, flash_attn or eager."""
        self.window = config.layer_window(layer_idx)
        """This layer's sliding window (None: full causal attention); picks its mask in Bumblebee.hidden_states."""
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.ulysses = None  # sequence parallel: the heads exchange (model/sequence_parallel.py), None without
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # Qwen3: per-head RMSNorm of q and k, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask: AttentionMask, kv_cache=None, cache_write=None, prepared=None):
        """kv_cache: a KVCache (or decoding's SlotCache) that stores this forward's k, v and returns the
        visible ones, at `cache_write` (its plan). prepared: the same projections with weights laid out
        for decoding (inference/decode.py PreparedAttention); used while they still match ours."""
        fused = prepared if prepared is not None and prepared.matches(self) else None
        q, k, v = self.qkv(x, cos, sin, fused)
        if kv_cache is not None:
            k, v = kv_cache.write(self.layer_idx, k, v, cache_write)
        out = self.attend(q, k, v, mask)
        return self.o_proj(out) if fused is None else fused.out(out)

    def qkv(self, x, cos, sin, fused=None):
        """Queries, keys and values (batch, seq, heads, head_dim), with RoPE on q and k."""
        b, s, _ = x.shape
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        if fused is None:
            q = self.q_proj(x).view(b, s, heads, d)
            k = self.k_proj(x).view(b, s, kv_heads, d)
            v = self.v_proj(x).view(b, s, kv_heads, d)
        else:  # q, k and v weights concatenated: one matmul
            qkv = fused.qkv(x).view(b, s, heads + 2 * kv_heads, d)
            q, k, v = qkv[:, :, :heads], qkv[:, :, heads : heads + kv_heads], qkv[:, :, heads + kv_heads :]
            if not self.qk_norm:  # RoPE on q and k together: fewer kernel launches per decode step
                qk = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin)
                return qk[:, :, :heads], qk[:, :, heads:], v
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return (*self.rope(q, k, cos, sin), v)

    def rope(self, q, k, cos, sin):
        """RoPE on queries and keys (model/liger.py swaps in liger's kernel)."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def attend(self, q, k, v, mask: AttentionMask) -> torch.Tensor:
        """q: (b, q_len, heads, d), k/v: (b, k_len, kv_heads, d) -> (b, q_len, heads * d)."""
        b, s = q.shape[:2]
        out = (self.ulysses or self.attention_kernel)(q, k, v, mask)
        return out.reshape(b, s, self.num_heads * self.head_dim)

    def attention_kernel(self, q, k, v, mask: AttentionMask) -> torch.Tensor:
        """The kernel on whatever heads q, k, v hold (all, or a sequence-parallel rank's share) -> (b, q_len, heads, d)."""
        b, s, heads, kv_heads = *q.shape[:3], k.shape[2]
        every_key = not mask.causal and mask.dense is None
        flash = self.attn_implementation == "flash_attn" and q.is_cuda and flash_available()  # else SDPA
        if every_key and s == 1 and heads != kv_heads and self.attn_implementation != "eager":
            # One query per row that sees every key (a decode step): the query heads sharing a kv head
            # are, to the kernel, that head's queries: a plain (non-GQA) call, ~2x faster on CPU.
            q = q.reshape(b, kv_heads, heads // kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), scale=self.scale)
        elif flash and mask.dense is None and mask.causal:
            out = flash_attention(q, k, v, mask, self.scale)
        elif mask.cu_seqlens is not None:
            out = per_document_attention(q, k, v, mask, self.scale)
        else:  # eager and SDPA take (b, heads, seq, d)
            kernel = eager_attention if self.attn_implementation == "eager" else sdpa_attention
            out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale).transpose(1, 2)
        return out.reshape(b, s, heads, self.head_dim)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); with silu this is SwiGLU."""

    def __init__(self, config: BumblebeeConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT_FNS[config.hidden_act]
        self.tiles = 1  # tiled_mlp: the tokens in this many chunks (model/tiling.py)

    def forward(self, x: torch.Tensor, prepared=None) -> torch.Tensor:
        """prepared: decoding's weights (inference/decode.py PreparedMLP: gate and up as one matmul)."""
        if prepared is not None and prepared.matches(self):
            gate, up = prepared.gate_up(x).chunk(2, dim=-1)
            return prepared.down(self._gated(gate, up))
        return tiled_mlp(self, x, self.tiles) if self.tiles > 1 else self.untiled(x)

    def untiled(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if _recompute_in_backward(gate):  # keep gate and up for backward, not act(gate) as well
            return self.down_proj(checkpoint(self._gated, gate, up, use_reentrant=False))
        return self.down_proj(self._gated(gate, up))

    def _gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, config: BumblebeeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_write=None, prepared=None):
        """prepared: decoding's (attention, mlp) weights of this layer, or None."""
        attention, mlp = prepared if prepared is not None else (None, None)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_write, attention)
        return x + self.mlp(self.post_attention_layernorm(x), mlp)


# ---------------------------------------------------------------------------- the model


class BumblebeeBackbone(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: BumblebeeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)


class Bumblebee(nn.Module):
    def __init__(self, config: BumblebeeConfig):
        super().__init__()
        self.config = config
        self.model = BumblebeeBackbone(config)
        self.add_head(config)
        self.gradient_checkpointing = False
        self.activation_offload = False  # checkpointed layers' inputs in host memory (model/tiling.py)
        self._inv_freq: dict = {}  # RoPE frequencies per device and settings (model/rope.py)
        self.apply(self._init_weights)

    # -- construction

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if module.weight.device.type != "meta":
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None and module.bias.device.type != "meta":
                nn.init.zeros_(module.bias)

    def add_head(self, config: BumblebeeConfig) -> None:
        """The LM head, tied to the embedding or not (a reward model, model/reward.py, adds its `score`)."""
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_head()

    def tie_head(self) -> None:
        """The tied LM head shares the embedding's weight (again after a load assigns new tensors)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # What peft reads to adapt embeddings (trainable tokens): the modules and, when tied, the tied head.
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, seed: Optional[int] = None) -> Bumblebee:
        """Load a HF-layout directory of a Bumblebee, Qwen2, Qwen3, Llama or Mistral model, tensor by
        tensor straight into `dtype` on `device` (the host never holds a second copy). `seed`: what a
        new head is drawn from when the checkpoint lacks it (a reward model's, model/reward.py)."""
        config = read_config(path)
        target_dtype = resolve_dtype(dtype, config)
        with torch.device("meta"):
            model = cls(config)
        state = {
            name: load().to(device=device or "cpu", dtype=target_dtype)
            for name, load in model.checkpoint_tensors(path, seed)
        }
        model.load_state_dict(state, strict=False, assign=True)  # iter_checkpoint said what is missing
        model.tie_head()
        config.torch_dtype = dtype_name(target_dtype)
        return model

    def checkpoint_tensors(self, path, seed: Optional[int] = None):
        """(name, load) of every weight this model reads from `path`, checked against its names and shapes."""
        return iter_checkpoint(path, self.config, expected_tensors(self))

    def save_pretrained(self, path, max_shard_size="5GB", state_dict=None, stream=None) -> None:
        """Write the Hugging Face layout; `state_dict` (e.g. gathered or cast for export) or `stream`
        (layout and tensors one at a time, see hf_io.save_pretrained) replaces the live weights."""
        save_pretrained(self, path, max_shard_size=max_shard_size, state_dict=state_dict, stream=stream)

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    # -- forward

    def rope_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos and sin of the positions, with the config's RoPE scaling (model/rope.py)."""
        return rotary_cos_sin(self.config, position_ids, dtype, self._inv_freq)

    def windows(self) -> set:
        """The distinct sliding windows of the layers (None = full attention): one mask each per forward."""
        return {layer.self_attn.window for layer in self.model.layers}

    def _build_mask(self, seq, device, attention_mask, segment_ids, window=None) -> AttentionMask:
        if window is not None and seq <= window:
            window = None  # no query reaches past the window: plain causal, the fast kernels
        flash = self.config.attn_implementation == "flash_attn" and device.type == "cuda" and flash_available(window)
        if attention_mask is None and segment_ids is None:
            if window is None or flash:
                return AttentionMask(window=window)
            steps = torch.arange(seq, device=device)
            return AttentionMask(dense=window_band(steps, steps, window)[None, None], window=window)
        # Packed documents without padding go to a varlen kernel: FlashAttention's when installed (CUDA),
        # else SDPA per document (each document's causal triangle, not every query against the row).
        per_document = self.config.attn_implementation != "eager"
        if attention_mask is None and (flash or per_document):
            mask = packed_document_boundaries(segment_ids)
            mask.window = window
            return mask
        steps = torch.arange(seq, device=device)
        allowed = window_band(steps, steps, window)[None]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :].bool()
        # A query that may see nothing (a left pad) would give NaN; let it see itself. Its output is never used.
        allowed = allowed | torch.eye(seq, dtype=torch.bool, device=device)
        return AttentionMask(dense=allowed[:, None], window=window)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final-norm hidden states (..., hidden)."""
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        return_hidden_states: bool = False,
        prepared: Optional[list] = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab), or with return_hidden_states the final-norm hidden states
        (batch, seq, hidden), for losses that apply `lm_head` in chunks.

        position_ids: (batch, seq) RoPE positions; default 0..seq-1, or each row's cache length onward.
        attention_mask: (batch, seq) 1 for real tokens, 0 for padding (HF convention). With a KV cache,
            it marks the right-padding of the new tokens, and each row advances by its count of ones.
        segment_ids: (batch, seq) document index of each token in packed rows; tokens attend only
            within their own document.
        kv_cache: a KVCache (or decoding's SlotCache); the new tokens are appended to it.
        prepared: decoding's (attention, mlp) weights per layer (inference/decode.py), or None.
        """
        batch, seq = input_ids.shape
        device = input_ids.device
        x = self.model.embed_tokens(input_ids)

        cache_write = None
        if kv_cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
            cache_write = kv_cache.plan(seq, self.windows())
            positions, masks = cache_write.positions, cache_write.masks
        else:
            positions = torch.arange(seq, device=device)[None].expand(batch, seq)
            # Sequence parallel: segment_ids are the full row's, as the attention sees it (model/sequence_parallel.py).
            mask_len = seq if segment_ids is None else segment_ids.shape[1]
            masks = {w: self._build_mask(mask_len, device, attention_mask, segment_ids, w) for w in self.windows()}
        if position_ids is None:
            position_ids = positions

        cos, sin = self.rope_cos_sin(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            mask = masks[layer.self_attn.window]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpointed_layer(layer, x, cos, sin, mask, offload=self.activation_offload)
            else:
                x = layer(x, cos, sin, mask, kv_cache, cache_write, None if prepared is None else prepared[i])
        if kv_cache is not None:
            kv_cache.advance(cache_write, attention_mask.sum(-1).long() if attention_mask is not None else seq)
        hidden = self.model.norm(x)
        return hidden if return_hidden_states else self.logits(hidden)
