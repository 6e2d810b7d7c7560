"""Rotary position embeddings and their scalings: the inverse frequencies and the cos/sin of each
position, plain or scaled to extend a model's context (linear, dynamic NTK, YaRN, Llama 3's).

Each scaling is the published method with the settings transformers reads from `rope_parameters`
(`tests/model/test_rope.py` compares cos/sin and logits with transformers' rotary embeddings):

    linear    every frequency divided by `factor` (position interpolation)
    dynamic   the base grows with the longest position of the forward once it passes
              max_position_embeddings (NTK-aware); unchanged below it
    yarn      low frequencies interpolated by `factor`, high ones kept, a linear ramp between them
              (beta_fast / beta_slow rotations), and cos/sin scaled by the attention factor
              (0.1 ln(factor) + 1 unless given)
    llama3    Llama 3.1's: long wavelengths slowed by `factor`, short ones kept, the band between blended
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# The settings each scaling reads besides rope_type: required, then optional.
_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_OPTIONAL = {
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}
# Settings other families' files carry that change nothing here (transformers' own ignore list).
_CARRIED = ("type", "rope_theta", "partial_rotary_factor")


def rope_type_of(scaling: Optional[dict]) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def normalize_rope_scaling(scaling: Optional[dict], max_position_embeddings: int, key: str = "rope_scaling"):
    """The scaling as one dict with `rope_type` (None for plain RoPE), checked, with what transformers
    fills in: yarn's and llama3's original_max_position_embeddings default to max_position_embeddings.
    Errors name `key` and the setting."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"{key} must be a mapping with rope_type (one of {', '.join(ROPE_TYPES)}), got {scaling!r}")
    rope_type = rope_type_of(scaling)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{key}.rope_type={rope_type!r} is not supported; choose one of {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return None
    out = {k: v for k, v in scaling.items() if k != "type"}
    out["rope_type"] = rope_type
    if rope_type in ("yarn", "llama3"):
        out.setdefault("original_max_position_embeddings", max_position_embeddings)
    known = {"rope_type", *_REQUIRED[rope_type], *_OPTIONAL.get(rope_type, ()), *_CARRIED}
    unknown = sorted(set(out) - known)
    if unknown:
        raise ValueError(f"{key}: {', '.join(unknown)} is not a setting of rope_type {rope_type}")
    missing = [k for k in _REQUIRED[rope_type] if out.get(k) is None and not (rope_type == "yarn" and k == "factor")]
    if missing:
        raise ValueError(f"{key}: rope_type {rope_type} needs {', '.join(missing)}")
    factor = out.get("factor")
    if factor is not None and (not isinstance(factor, (int, float)) or factor < 1):
        raise ValueError(f"{key}.factor must be a number >= 1, got {factor!r}")
    return out


def inverse_frequencies(config, device=None, longest: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,) in fp32, the factor cos and sin are scaled by) of a
    BumblebeeConfig. `longest`: the forward's largest position + 1 (dynamic scaling grows past
    max_position_embeddings with it)."""
    dim, theta = config.head_dim, config.rope_theta
    scaling = config.rope_scaling or {}
    rope_type = rope_type_of(scaling)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if rope_type == "dynamic":
        return _dynamic(config, scaling["factor"], exponents, longest), 1.0
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "yarn":
        return _yarn(config, scaling, inv_freq, device)
    if rope_type == "llama3":
        return _llama3(scaling, inv_freq), 1.0
    return inv_freq, 1.0


def _dynamic(config, factor: float, exponents: torch.Tensor, longest: Optional[torch.Tensor]) -> torch.Tensor:
    # NTK-aware: base * (factor * L / max - (factor - 1)) ** (d / (d - 2)), L the longest position but at
    # least max_position_embeddings (so nothing changes below it). As tensors: no host sync per forward.
    dim, original = config.head_dim, config.max_position_embeddings
    if longest is None:
        longest = torch.tensor(original, device=exponents.device)
    length = torch.clamp(longest, min=original)
    base = config.rope_theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base**exponents)


def _yarn(config, scaling: dict, inv_freq: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    dim, theta = config.head_dim, config.rope_theta
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def dimension_of(rotations: float) -> float:
        # the rotary dimension that turns `rotations` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(scaling.get("beta_fast") or 32), dimension_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # 1: the frequency as trained (fast rotations), 0: interpolated by factor
    return (inv_freq / factor) * (1 - kept) + inv_freq * kept, float(attention_factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _llama3(scaling: dict, inv_freq: torch.Tensor) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, blended, scaled)


def rotary_cos_sin(config, position_ids: torch.Tensor, dtype: torch.dtype, cache: dict):
    """cos and sin (batch, seq, head_dim) of the positions, in `dtype`. `cache` keeps each device's
    frequencies (keyed by the RoPE settings, so a config given a scaling later is not served stale ones);
    dynamic scaling's depend on the positions and are made per forward."""
    device = position_ids.device
    if rope_type_of(config.rope_scaling) == "dynamic":
        inv_freq, scale = inverse_frequencies(config, device, longest=position_ids.max() + 1)
    else:
        key = (device, config.rope_theta, repr(config.rope_scaling))
        if key not in cache:
            cache[key] = inverse_frequencies(config, device=device)
        inv_freq, scale = cache[key]
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:  # YaRN's attention factor (cos and sin both: q.k grows by its square)
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def rope_parameters(config) -> dict:
    """config.json's `rope_parameters` as transformers 5 writes it: rope_type, rope_theta and the scaling."""
    return {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}


def context_scaling(request, config, cutoff_len: int, key: str = "rope_scaling") -> tuple[dict, int]:
    """The training key `rope_scaling` applied to a model's config: (its rope_scaling, its new
    max_position_embeddings). `request`: a mapping ({rope_type: yarn, factor: 4, ...}) or, as in
    LLaMA-Factory, a bare rope_type whose factor is ceil(cutoff_len / max_position_embeddings).
    Positions grow to original x factor (dynamic keeps max_position_embeddings: it scales from there).
    Errors name the key; a model already scaled keeps its scaling when asked for the same type and factor."""
    trained = config.max_position_embeddings
    if isinstance(request, str):
        if cutoff_len <= trained:
            raise ValueError(
                f"{key} {request}: cutoff_len {cutoff_len} fits the model's {trained} positions already; "
                f"give the factor ({key}: {{rope_type: {request}, factor: F}}) or leave {key} unset"
            )
        request = {"rope_type": request, "factor": float(math.ceil(cutoff_len / trained))}
    if isinstance(request, dict) and rope_type_of(request) == "llama3":
        request = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, **request}  # Llama 3.1's
    scaling = normalize_rope_scaling(request, trained, key)
    if scaling is None:
        raise ValueError(f"{key}: rope_type default scales nothing; leave {key} unset")
    if scaling.get("factor") is None:
        raise ValueError(f"{key}: rope_type {scaling['rope_type']} needs factor")
    existing = config.rope_scaling
    if existing is not None:
        if (existing["rope_type"], existing.get("factor")) == (scaling["rope_type"], scaling["factor"]):
            return existing, trained  # e.g. a second run from a checkpoint this key already extended
        raise ValueError(
            f"{key}: the model already has rope scaling {existing} in its config.json; scalings are not "
            f"stacked (ask for the same rope_type and factor, or edit the model's config.json)"
        )
    if scaling["rope_type"] == "dynamic":
        return scaling, trained
    positions = int(scaling.get("original_max_position_embeddings", trained) * scaling["factor"])
    if cutoff_len > positions:
        raise ValueError(
            f"cutoff_len {cutoff_len} is beyond the {positions} positions {key} factor {scaling['factor']} "
            f"reaches; raise the factor to at least {math.ceil(cutoff_len / (positions / scaling['factor']))}"
        )
    return scaling, positions
