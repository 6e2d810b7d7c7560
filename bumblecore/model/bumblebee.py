"""Bumblebee: a Qwen2.5-style decoder in one file.

token embedding -> N x [norm -> GQA attention with RoPE -> residual -> norm -> gated MLP -> residual]
-> final norm -> LM head (tied to the embedding or not).

Parameter names are exactly Hugging Face Qwen2's (`model.layers.0.self_attn.q_proj.weight`, ...),
so loading and saving HF checkpoints is an identity and peft target-module names match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bumblecore.model.config import BumblebeeConfig

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
        # Normalise in fp32 and scale in the input dtype, as Qwen2/Llama do, so bf16 matches them.
        # (F.rms_norm is x * rsqrt(mean(x^2) + eps) as one fused op.)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def make_norm(config: BumblebeeConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


# ---------------------------------------------------------------------------- RoPE


def rope_inverse_frequencies(config: BumblebeeConfig, device=None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding (fp32), with linear or Llama 3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(in_band, blended, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys/values, one row per sequence, each row with its own length.

    Layout per layer: (batch, max_len, kv_heads, head_dim). A forward call writes its new tokens
    at positions `lengths[row] + t` and then advances each row by its number of real tokens, so
    rows of different lengths decode together without left padding (right-padded prompts are
    fine: a pad is written past the row's end and overwritten by the row's next token).
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
        """Empty all rows, or only `rows` (a slot freed for a new sequence)."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_index, visible: int, rows=None):
        """Store k, v (batch, seq, kv_heads, head_dim) and return this layer's first `visible` positions
        of the rows written (all rows, or the cache rows `rows`: a tensor of row numbers or a slice).

        `slot_index` is (row index, position index) tensors for advanced indexing, or, when the rows
        are a slice and all start at the same position, a (rows, positions) pair of slices: then the
        write is a plain copy and the read a view (no gather of the cache every step)."""
        self.keys[layer][slot_index] = k
        self.values[layer][slot_index] = v
        if rows is None:
            return self.keys[layer][:, :visible], self.values[layer][:, :visible]
        return self.keys[layer][rows, :visible], self.values[layer][rows, :visible]


# ---------------------------------------------------------------------------- attention


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
    """False only when every query may see every key (one new token per row, all rows equally long)."""
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
    b, heads, q_len, d = q.shape
    kv_heads = k.shape[1]
    if mask.dense is None and mask.window is not None:
        mask = AttentionMask(dense=_dense_for(mask, q_len, k.shape[2], q.device), causal=mask.causal)
    if mask.dense is None and not mask.causal and q_len == 1 and heads != kv_heads:
        # One new token that sees every key: the query heads sharing a kv head are, to the kernel, that
        # head's queries. A plain (non-GQA) call with heads/kv_heads queries per row, ~2x faster on CPU.
        out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, heads // kv_heads, d), k, v, scale=scale)
        return out.reshape(b, heads, 1, d)
    if mask.dense is None:
        # No mask tensor: lets PyTorch pick its flash / memory-efficient kernel, GQA native.
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    n_rep = q.shape[1] // k.shape[1]
    if q.device.type == "cpu":  # the CPU kernel takes grouped heads directly: no copy of the cache per step
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, scale=scale, enable_gqa=n_rep > 1)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask.dense, scale=scale)


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
            q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]),
            cu_seqlens_q=mask.cu_seqlens, cu_seqlens_k=mask.cu_seqlens,
            max_seqlen_q=mask.max_seqlen, max_seqlen_k=mask.max_seqlen, softmax_scale=scale, causal=True,
            **_window_kwargs(mask),
        )
        out = out[0] if isinstance(out, tuple) else out  # flash-attn-4 also returns the log-sum-exp
        return out.reshape(b, s, *out.shape[1:])
    out = dense_fn(q, k, v, softmax_scale=scale, causal=True, **_window_kwargs(mask))
    return out[0] if isinstance(out, tuple) else out


def _versions(*linears: nn.Linear) -> tuple:
    """In-place updates (optimiser steps, load_state_dict) bump a tensor's version counter."""
    return tuple(m.weight._version for m in linears) + tuple(m.bias._version for m in linears if m.bias is not None)


def _in_out(weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) weight as (in, out). On CPU a contiguous copy: MKL multiplies small batches by it
    ~1.3-1.5x faster than by the transposed (out, in) layout F.linear uses (measured for every
    projection shape of the benchmark model). Elsewhere a view, which is what F.linear uses anyway."""
    return weight.t().contiguous() if weight.device.type == "cpu" else weight.t()


def _project(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear with an (in, out) weight."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ weight_t if bias is None else torch.addmm(bias, flat, weight_t)
    return out.view(*x.shape[:-1], weight_t.shape[1])


class Attention(nn.Module):
    def __init__(self, config: BumblebeeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.backend = config.attn_implementation
        self.window = config.layer_window(layer_idx)
        """This layer's sliding window (None: full causal attention); picks its mask in Bumblebee.hidden_states."""
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # Qwen3: per-head RMSNorm of q and k, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    fused_qkv: Optional[tuple] = None
    """(q/k/v weight, bias, o weight, versions), weights (in, out), set by Bumblebee.fuse_projections, used without grad."""

    def forward(self, x, cos, sin, mask: AttentionMask, kv_cache: Optional[KVCache] = None, cache_slots=None):
        b, s, _ = x.shape
        fused = self.fused_qkv
        if fused is not None and (torch.is_grad_enabled() or fused[3] != _versions(self.q_proj, self.k_proj, self.v_proj, self.o_proj)):
            fused = None
        if fused is not None:
            # One matmul for q, k and v, and RoPE on q and k together: fewer kernel launches per decode step.
            qkv = _project(x, fused[0], fused[1]).view(b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            v = qkv[:, :, self.num_heads + self.num_kv_heads :]
            if self.qk_norm:
                q = apply_rope(self.q_norm(qkv[:, :, : self.num_heads]), cos, sin)
                k = apply_rope(self.k_norm(qkv[:, :, self.num_heads : self.num_heads + self.num_kv_heads]), cos, sin)
            else:
                qk = apply_rope(qkv[:, :, : self.num_heads + self.num_kv_heads], cos, sin)
                q, k = qk[:, :, : self.num_heads], qk[:, :, self.num_heads :]
        else:
            q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if kv_cache is not None:
            slot_index, visible, rows = cache_slots
            k, v = kv_cache.write(self.layer_idx, k, v, slot_index, visible, rows)

        use_flash = self.backend == "flash_attn" and kv_cache is None and mask.dense is None and x.is_cuda
        if use_flash:
            out = flash_attention(q, k, v, mask, self.scale)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            attend = eager_attention if self.backend == "eager" else sdpa_attention
            out = attend(q, k, v, mask, self.scale).transpose(1, 2)
        out = out.reshape(b, s, self.num_heads * self.head_dim)
        return _project(out, fused[2]) if fused is not None else self.o_proj(out)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); with silu this is SwiGLU."""

    def __init__(self, config: BumblebeeConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT_FNS[config.hidden_act]

    fused_gate_up: Optional[tuple] = None
    """(gate/up weight, down weight, versions), weights (in, out), set by Bumblebee.fuse_projections, used without grad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused_gate_up
        if fused is not None and not torch.is_grad_enabled() and fused[2] == _versions(self.gate_proj, self.up_proj, self.down_proj):
            gate, up = _project(x, fused[0]).chunk(2, dim=-1)
            return _project(self.act(gate) * up, fused[1])
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: BumblebeeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_slots)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.apply(self._init_weights)

    # -- construction

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if module.weight.device.type != "meta":
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None and module.bias.device.type != "meta":
                nn.init.zeros_(module.bias)

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Fresh random init (normal(0, initializer_range) weights, zero biases, unit norms)."""
        std = self.config.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "layernorm" in name or name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def fuse_projections(self) -> "Bumblebee":
        """For inference: concatenate q/k/v and gate/up weights so each runs as one matmul, and keep
        every projection's weight (in, out) (on CPU a copy: see `_in_out`). Used only when gradients
        are off and the separate parameters (HF names, the source of truth) have not changed since
        (their version counters are compared), so training later is always safe. On CPU this holds
        a second copy of the layer weights (and of the LM head, below)."""
        def plain(*modules):  # an unmerged LoRA layer (peft) computes more than its weight: leave it alone
            return all(type(m) is nn.Linear for m in modules)

        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.fused_qkv = mlp.fused_gate_up = None
            if plain(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
                bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]) if attn.q_proj.bias is not None else None
                attn.fused_qkv = (_in_out(weight), bias, _in_out(attn.o_proj.weight),
                                  _versions(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
            if plain(mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                mlp.fused_gate_up = (_in_out(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), _in_out(mlp.down_proj.weight),
                                     _versions(mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.lm_head_t = None
        if plain(self.lm_head) and self.lm_head.weight.device.type == "cpu":
            # One token's logits are a matrix-vector product: with the (vocab, hidden) weight, 32,000
            # short dot products; a (hidden, vocab) copy streams its rows instead, ~1.5-2x faster here.
            self.lm_head_t = (self.lm_head.weight.t().contiguous(), _versions(self.lm_head))
        return self

    lm_head_t: Optional[tuple] = None  # (lm_head weight as (hidden, vocab), versions) from fuse_projections

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final-norm hidden states (..., hidden). At inference on CPU (after
        fuse_projections) the result may be a transposed view: `forward` makes it contiguous."""
        rows = hidden.numel() // hidden.shape[-1]
        if (self.lm_head_t is None or torch.is_grad_enabled() or rows > 16
                or self.lm_head_t[1] != _versions(self.lm_head)):
            return self.lm_head(hidden)
        if rows == 1:
            return hidden @ self.lm_head_t[0]
        if rows >= 4:
            # A few rows: MKL runs (vocab, hidden) @ (hidden, rows) ~1.3x faster than F.linear's
            # (rows, hidden) @ (hidden, vocab)^T on this CPU (measured for 4-16 rows; 2-3 are slower).
            flat = hidden.reshape(rows, hidden.shape[-1])
            return (self.lm_head.weight @ flat.t()).t().view(*hidden.shape[:-1], -1)
        return self.lm_head(hidden)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Bumblebee":
        from bumblecore.model.hf_io import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_size="5GB", state_dict=None) -> None:
        """Write the Hugging Face layout; `state_dict` (e.g. gathered or cast for export) replaces the live weights."""
        from bumblecore.model.hf_io import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size, state_dict=state_dict)

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
        device = position_ids.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inverse_frequencies(self.config, device=device)
        freqs = position_ids[..., None].float() * self._inv_freq[device]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        cache_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (batch, seq, hidden). See `forward` for the arguments."""
        batch, seq = input_ids.shape
        device = input_ids.device
        x = self.model.embed_tokens(input_ids)
        steps = torch.arange(seq, device=device)

        cache_slots = None
        if kv_cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
            start = kv_cache.lengths if cache_rows is None else kv_cache.lengths[cache_rows]
            positions = start[:, None] + steps  # absolute position of each new token
            first, last = start.aminmax()
            first, visible = int(first), int(last) + seq
            if visible > kv_cache.max_len:
                raise ValueError(f"KV cache overflow: needs {visible} positions, holds {kv_cache.max_len}")
            if first == visible - seq and not isinstance(cache_rows, torch.Tensor):
                # All rows equally long and a range of cache rows (the usual decode step): slices.
                row_slice = slice(None) if cache_rows is None else cache_rows
                cache_slots = ((row_slice, slice(first, visible)), visible, cache_rows)
            else:
                if cache_rows is None:
                    rows = torch.arange(batch, device=device)
                elif isinstance(cache_rows, slice):
                    rows = torch.arange(kv_cache.batch_size, device=device)[cache_rows]
                else:
                    rows = cache_rows
                cache_slots = ((rows[:, None].expand(batch, seq), positions), visible, cache_rows)
            key_index = torch.arange(visible, device=device)
            masks = {}
            for window in self._windows():
                if seq == 1 and first == visible - 1 and (window is None or visible <= window):
                    masks[window] = AttentionMask(causal=False)  # one token per row, all rows equally long: it sees every key
                elif seq == 1 and first == visible - 1:
                    masks[window] = AttentionMask(dense=(key_index > first - window)[None, None, None], window=window)
                else:
                    masks[window] = AttentionMask(dense=window_band(positions, key_index, window)[:, None], window=window)
        else:
            positions = steps[None].expand(batch, seq)
            masks = {w: self._build_mask(seq, device, attention_mask, segment_ids, w) for w in self._windows()}
        if position_ids is None:
            position_ids = positions

        cos, sin = self.rope_cos_sin(position_ids, x.dtype)
        for layer in self.model.layers:
            mask = masks[layer.self_attn.window]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, cache_slots)
        if kv_cache is not None:
            added = attention_mask.sum(-1).long() if attention_mask is not None else seq
            if cache_rows is None:
                kv_cache.lengths += added
            else:
                kv_cache.lengths[cache_rows] += added
        return self.model.norm(x)

    def _windows(self) -> set:
        """The distinct sliding windows of the layers (None = full attention): one mask each per forward."""
        return {layer.self_attn.window for layer in self.model.layers}

    def _build_mask(self, seq, device, attention_mask, segment_ids, window=None) -> AttentionMask:
        if window is not None and seq <= window:
            window = None  # no query reaches past the window: plain causal, the fast kernels
        flash = (self.config.attn_implementation == "flash_attn" and device.type == "cuda" and flash_available(window))
        if attention_mask is None and segment_ids is None:
            if window is None or flash:
                return AttentionMask(window=window)
            steps = torch.arange(seq, device=device)
            return AttentionMask(dense=window_band(steps, steps, window)[None, None], window=window)
        if attention_mask is None and flash:
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

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        return_hidden_states: bool = False,
        cache_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab), or with return_hidden_states the final-norm hidden states
        (batch, seq, hidden), for losses that apply `lm_head` in chunks.

        position_ids: (batch, seq) RoPE positions; default 0..seq-1, or each row's cache length onward.
        attention_mask: (batch, seq) 1 for real tokens, 0 for padding (HF convention). With a KV cache,
            it marks the right-padding of the new tokens, and each row advances by its count of ones.
        segment_ids: (batch, seq) document index of each token in packed rows; tokens attend only
            within their own document.
        kv_cache: a KVCache; the new tokens are appended to it.
        cache_rows: (batch,) the cache rows (slots) these inputs continue, or a slice of them (a range of
            rows: the cache is then read as a view); default all rows in order. Lets new sequences
            prefill into free slots while others wait, and decode only active slots.
        """
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, segment_ids, kv_cache, cache_rows)
        return hidden if return_hidden_states else self.logits(hidden).contiguous()


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
