"""Losses. Token-weighted cross-entropy computed in chunks, so the (tokens x vocab) logits never
exist all at once: with a 151,936-token vocabulary they would dominate training memory."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bumblecore.data.packing import IGNORE_INDEX  # the label of positions that are not trained

# Bytes of fp32 logits one chunk may hold: 64 MB is ~110 tokens at a 151,936 vocabulary, ~340 at
# SmolLM2's 49,152. A chunk is alive at the start of backward, training's peak: at 256 MB it was ~200 MB
# of SmolLM2's peak RSS, and the LM head's products stay wide enough at either size.
LOGITS_BUDGET_BYTES = 1 << 26


def shift_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Position t predicts labels[t + 1]. The first token of a packed document is not predicted from
    the previous document (alone it would have no predecessor), and the last position predicts nothing."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if segment_ids is not None:
        crosses = segment_ids[:, 1:] != segment_ids[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, IGNORE_INDEX)
    return targets


def head_weight(lm_head) -> torch.Tensor | None:
    """The LM head's weight as stored (its shape, dtype, ZeRO-3 state). Through a FamilyHead or
    TemperatureHead (`.head`) and peft's trainable-token wrapper (`.original_module`), whose own `.weight`
    builds a merged copy of the whole head on each access (and cannot on a ZeRO-3 partitioned one)."""
    head = getattr(lm_head, "head", lm_head)
    head = getattr(head, "original_module", head)
    return getattr(head, "weight", None)


def tokens_per_chunk(lm_head) -> int:
    """Target positions per LM-head chunk: as many as LOGITS_BUDGET_BYTES of fp32 logits hold."""
    weight = head_weight(lm_head)
    shape = tuple(getattr(weight, "ds_shape", None) or getattr(weight, "shape", ()))  # ZeRO-3: the real shape
    vocab = shape[0] if len(shape) == 2 else 32768
    return max(64, LOGITS_BUDGET_BYTES // (4 * max(1, vocab)))


def chunk_starts(
    hidden: torch.Tensor, lm_head, count: int, chunk_tokens: int | None = None, head_calls: int | None = None
) -> tuple[int, range]:
    """(tokens per chunk, chunk starts) for `count` target positions, one LM-head call per start.

    `head_calls` splits them evenly over exactly that many calls (some chunks possibly empty). Without it,
    a ZeRO-3 partitioned head with more than one rank gets it agreed: each call all-gathers the weight, so
    every rank calls the head as often as the rank with the most targets needs (one all-reduce here), or
    the ranks' gathers no longer pair up (gloo: "Received data size doesn't match expected size")."""
    chunk_tokens = chunk_tokens or tokens_per_chunk(lm_head)
    if head_calls is None and _gathered_per_call(lm_head):
        most = torch.tensor(count, device=hidden.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        head_calls = -(-int(most) // chunk_tokens)
    if head_calls is None:
        return chunk_tokens, range(0, count, chunk_tokens)
    chunk_tokens = max(1, -(-count // max(1, head_calls)))
    return chunk_tokens, range(0, head_calls * chunk_tokens, chunk_tokens)


def _gathered_per_call(lm_head) -> bool:
    """A ZeRO-3 partitioned head shared by several ranks: gathered by a collective around each call."""
    weight = head_weight(lm_head)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return hasattr(weight, "ds_id") and distributed and torch.distributed.get_world_size() > 1


def _recompute_in_backward(h: torch.Tensor, lm_head) -> bool:
    """Recompute a chunk's logits in backward rather than keep them, except for a ZeRO-3 partitioned
    LM head: DeepSpeed does not gather a frozen partitioned weight again inside a checkpoint's recompute."""
    weight = head_weight(lm_head)
    partitioned = weight is not None and hasattr(weight, "ds_status")
    return torch.is_grad_enabled() and h.requires_grad and not (partitioned and not weight.requires_grad)


def _head(lm_head: Callable, hidden: torch.Tensor) -> torch.Tensor:
    # A 16-bit head without autocast (DeepSpeed's bf16/fp16) gets the hidden states in its own dtype:
    # Fabric hands the wrapped forward's outputs back in fp32.
    weight = head_weight(lm_head)
    if weight is not None and weight.dtype in (torch.bfloat16, torch.float16) and hidden.dtype == torch.float32:
        hidden = hidden.to(weight.dtype)
    return lm_head(hidden)


class SummedCrossEntropy(torch.autograd.Function):
    """sum of cross_entropy(logits, targets) whose backward holds one chunk-sized tensor, not three.

    F.cross_entropy keeps its log-softmax for backward and builds two more (tokens x vocab) tensors
    there; this keeps only the logits and the (tokens,) log-sum-exp and forms the gradient,
    softmax - one-hot, from them. With `overwrite` it does so in the logits' own memory: only for
    logits no other backward reads (a plain nn.Linear's output, or the fp32 copy of it).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, overwrite: bool) -> torch.Tensor:
        log_normalizer = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, log_normalizer)
        ctx.overwrite = overwrite
        return (log_normalizer - logits.gather(1, targets[:, None]).squeeze(1)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, log_normalizer = ctx.saved_tensors
        shifted = logits.sub_(log_normalizer[:, None]) if ctx.overwrite else logits - log_normalizer[:, None]
        probs = shifted.exp_()
        probs[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
        return probs.mul_(grad), None, None


def summed_cross_entropy(hidden: torch.Tensor, lm_head: Callable, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one chunk (the caller normalises), with fp32 logits for the
    softmax as transformers does."""
    # A plain Linear's backward reads its input and weight, never its output: the logits may be overwritten.
    overwrite = type(lm_head) is torch.nn.Linear
    return SummedCrossEntropy.apply(_head(lm_head, hidden).float(), targets, overwrite)


@functools.cache
def _compiled_summed_cross_entropy():
    return torch.compile(summed_cross_entropy)


def chunk_loss(lm_head) -> Callable:
    """summed_cross_entropy, compiled for a head that compile: true marked (model/regional_compile.py)."""
    return _compiled_summed_cross_entropy() if getattr(lm_head, "compiled_loss", False) else summed_cross_entropy


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head: Callable,
    targets: torch.Tensor,
    chunk_tokens: int | None = None,
    head_calls: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target positions, and their count.

    hidden: (..., H) final hidden states; targets: (...) already shifted (see shift_targets), -100 = skip.
    lm_head is called as a module (not its weight) so sharded strategies (ZeRO-3) gather it. Only target
    positions reach the LM head (an SFT prompt costs nothing there), and each chunk's logits (sized to
    LOGITS_BUDGET_BYTES unless chunk_tokens is given) are recomputed in backward instead of stored.

    A head with `take_extra_loss` (transformers_family.FamilyHead: a MoE family's router aux loss) adds that
    term once per target token, so after the engine's division by the target count the loss is the
    family's own: mean CE + router_aux_loss_coef * aux.

    `head_calls`: call the head exactly this many times (see chunk_starts; sequence parallelism knows it
    without a collective).
    """
    take_extra = getattr(lm_head, "take_extra_loss", None)
    extra = take_extra() if take_extra is not None else None
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    count = int(targets.numel())
    chunk_tokens, starts = chunk_starts(hidden, lm_head, count, chunk_tokens, head_calls)
    if not starts:
        zero = hidden.sum() * 0.0  # keeps the graph connected for backward on every rank
        return (zero + extra * 0.0 if extra is not None else zero), 0
    fused = getattr(lm_head, "fused_cross_entropy", None)  # liger's head (model/liger.py): no logits stored
    total = fused(hidden, targets) if fused is not None else None
    if total is not None:  # (a Bumblebee's head: no family's extra loss)
        return total, count
    total = hidden.new_zeros((), dtype=torch.float32)
    summed = chunk_loss(lm_head)
    for start in starts:
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if _recompute_in_backward(h, lm_head):
            total = total + checkpoint(summed, h, lm_head, t, use_reentrant=False)
        else:
            total = total + summed(h, lm_head, t)
    if extra is not None:
        total = total + extra.float() * count
    return total, count


def _chunk_loss_by_source(
    hidden: torch.Tensor,
    lm_head: Callable,
    targets: torch.Tensor,
    sources: torch.Tensor,
    per_source: bool,
    num_sources: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _head(lm_head, hidden).float()
    per_token = F.cross_entropy(logits, targets, reduction="none")
    sums = per_token.new_zeros(num_sources).index_add(0, sources, per_token)
    if not per_source:  # the optimised sum exactly as chunked_cross_entropy computes it
        return SummedCrossEntropy.apply(logits, targets, False), sums.detach()
    return sums, sums.detach()


def chunked_cross_entropy_by_source(
    hidden: torch.Tensor,
    lm_head: Callable,
    targets: torch.Tensor,
    sources: torch.Tensor,
    num_sources: int,
    per_source: bool = False,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunked_cross_entropy over a mixture: (optimised sum(s), per-source sums (S,), per-source counts (S,)).

    sources: each target position's source index, shaped like targets. The optimised value is
    chunked_cross_entropy's own sum, computed the same way, bit for bit; with per_source, the (S,)
    vector of each source's summed token losses instead (loss weights make each its own term). The
    second value carries no gradient: it is what the run logs as loss/<name>."""
    take_extra = getattr(lm_head, "take_extra_loss", None)
    extra = take_extra() if take_extra is not None else None
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets, sources = targets.reshape(-1), sources.reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets, sources = hidden[keep], targets[keep], sources[keep]
    counts = torch.bincount(sources, minlength=num_sources)
    count = int(targets.numel())
    sums = hidden.new_zeros(num_sources, dtype=torch.float32)
    total = hidden.new_zeros(num_sources if per_source else (), dtype=torch.float32)
    chunk_tokens, starts = chunk_starts(hidden, lm_head, count, chunk_tokens)
    if not starts:
        zero = total + hidden.sum() * 0.0
        return (zero + extra * 0.0 if extra is not None else zero), sums, counts
    for start in starts:
        piece = slice(start, start + chunk_tokens)
        args = (hidden[piece], lm_head, targets[piece], sources[piece], per_source, num_sources)
        if _recompute_in_backward(hidden[piece], lm_head):
            loss, chunk_sums = checkpoint(_chunk_loss_by_source, *args, use_reentrant=False)
        else:
            loss, chunk_sums = _chunk_loss_by_source(*args)
        total = total + loss
        sums = sums + chunk_sums
    if extra is not None:  # a per-token auxiliary loss (MoE routers): each source's tokens carry their share
        total = total + extra.float() * (counts.to(total.dtype) if per_source else count)
    return total, sums, counts


def _chunk_logps(hidden: torch.Tensor, lm_head: Callable, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(_head(lm_head, hidden).float(), targets, reduction="none")


def chunked_token_logps(
    hidden: torch.Tensor, lm_head: Callable, targets: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """log p(target) at every position, 0 where targets is -100; shaped like targets.

    Same chunking as chunked_cross_entropy: only target positions meet the LM head, chunk by chunk,
    recomputed in backward, so the (tokens x vocab) logits never exist at once."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    keep = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    out = flat_hidden.new_zeros(flat_targets.shape, dtype=torch.float32)
    chunk_tokens, starts = chunk_starts(hidden, lm_head, keep.numel(), chunk_tokens)
    if not starts:
        return (out + flat_hidden.sum() * 0.0).reshape(targets.shape)
    pieces = []
    for start in starts:
        index = keep[start : start + chunk_tokens]
        h, t = flat_hidden[index], flat_targets[index]
        if _recompute_in_backward(h, lm_head):
            pieces.append(checkpoint(_chunk_logps, h, lm_head, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(h, lm_head, t))
    return out.index_put((keep,), torch.cat(pieces)).reshape(targets.shape)


# ---------------------------------------------------------------------------- preference losses


def length_desensitized_weights(targets: torch.Tensor, num_pairs: int, ld_alpha: float) -> torch.Tensor:
    """LD-DPO token weights for rows [chosen_1..chosen_n, rejected_1..rejected_n]: 1 for a response's
    first l target tokens, l = the shorter response's target count in its pair, ld_alpha beyond."""
    is_target = targets != IGNORE_INDEX
    rank = is_target.cumsum(dim=-1)  # 1-based index of each target token within its response
    lengths = is_target.sum(dim=-1)
    shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)
    weights = torch.where(rank <= shared[:, None], 1.0, float(ld_alpha))
    return weights * is_target


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair preference loss from sequence log-probs (sums, or means per token for ipo).

    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    sigmoid: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)   (e > 0: conservative DPO)
    ipo:     (h - 1 / (2 beta))^2
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(
        f"pref_loss {loss_type!r} is not supported here; choose sigmoid or ipo (orpo and simpo: reference_free_loss)"
    )


# Mean log-probs are capped just below 0: a response predicted with p = 1 in fp32 would have infinite
# log odds (and gradient); the cap bounds them at ~13.8.
MAX_MEAN_LOGP = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012): log(-expm1(x)) near 0, where
    1 - exp(x) loses its digits, and log1p(-exp(x)) below -ln 2, where expm1 would."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of the length-normalised sequence probability p = exp(mean token log-prob)."""
    mean_logp = mean_logp.clamp(max=MAX_MEAN_LOGP)
    return mean_logp - log1mexp(mean_logp)


def reference_free_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, loss_type: str, simpo_gamma: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (loss, chosen reward, rejected reward) from per-token mean log-probs, no reference.

    orpo:  L = -mean_w + beta * -log sigmoid(log odds(y_w) - log odds(y_l)); rewards are the log odds
           (beta, ORPO's lambda, weighs the term outside the sigmoid, so it scales no reward)
    simpo: L = -log sigmoid(r_w - r_l - gamma), rewards r = beta * mean logp
    """
    if loss_type not in REFERENCE_FREE:
        raise ValueError(f"pref_loss {loss_type!r} is not reference-free; choose orpo or simpo")
    return REFERENCE_FREE[loss_type](chosen_mean, rejected_mean, beta, simpo_gamma)


def _odds_ratio(chosen_mean, rejected_mean, beta: float, simpo_gamma: float):
    chosen, rejected = log_odds(chosen_mean), log_odds(rejected_mean)
    return -chosen_mean + beta * -F.logsigmoid(chosen - rejected), chosen, rejected


def _length_normalised_margin(chosen_mean, rejected_mean, beta: float, simpo_gamma: float):
    chosen, rejected = beta * chosen_mean, beta * rejected_mean
    return -F.logsigmoid(chosen - rejected - simpo_gamma), chosen, rejected


# pref_loss -> its per-pair (loss, chosen reward, rejected reward); ORPO's odds ratio, SimPO's margin
REFERENCE_FREE = {"orpo": _odds_ratio, "simpo": _length_normalised_margin}


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_reference_point: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-example KTO loss (Ethayarajh et al. 2024) from summed response log-probs.

    r = policy_logps - reference_logps (the implied reward / beta), z = the KL reference point
    (an estimate of KL(policy || reference) from mismatched prompt/response pairs, clamped at 0,
    detached by the caller):
    desirable:   desirable_weight   * (1 - sigmoid(beta (r - z)))
    undesirable: undesirable_weight * (1 - sigmoid(beta (z - r)))
    """
    r = policy_logps - reference_logps
    z = kl_reference_point
    return torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - r))),
    )


def kto_reference_point(
    policy_mismatched_logps: torch.Tensor, reference_mismatched_logps: torch.Tensor
) -> torch.Tensor:
    """z: the mean over mismatched pairs of (policy - reference) summed log-probs, at least 0, with no
    gradient (KTO treats it as a constant of the step)."""
    return (policy_mismatched_logps - reference_mismatched_logps).mean().clamp(min=0).detach()


# A transformers family trains through chunked_cross_entropy over its hidden states: at load, its loss
# must equal the family's own forward's loss (fp32) within this, else it is refused (check_loss_parity).
FAMILY_PARITY_RTOL = 1e-3


@torch.no_grad()
def check_loss_parity(model, tokens: int = 12) -> tuple[float, float]:
    """(ours, the family's) loss on a few fixed tokens; ValueError when they differ: the family's forward
    does something after its hidden states (or in its loss) that this wrapper does not reproduce."""
    from bumblecore.model.transformers_family import LOGIT_TRANSFORMS

    parameter = next(model.hf.parameters())
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(parameter.device)
    was_training = model.hf.training
    model.hf.eval()
    try:
        try:
            reference = float(model.hf(input_ids=ids, labels=ids, use_cache=False).loss)
        except TypeError:  # custom code whose forward takes no labels: nothing to compare with
            print(f"warning: {type(model.hf).__name__} computes no loss from labels; its loss parity is unchecked")
            return math.nan, math.nan
        total, count = chunked_cross_entropy(model(ids, return_hidden_states=True), model.lm_head, shift_targets(ids))
        ours = float(total) / count
    finally:
        model.hf.train(was_training)
        model._extra_loss = None
    tolerance = FAMILY_PARITY_RTOL if parameter.dtype == torch.float32 else 3e-2
    if not abs(ours - reference) <= tolerance * abs(reference):
        raise ValueError(
            f"{type(model.hf).__name__}: BumbleCore's loss {ours:.6g} differs from the family's own {reference:.6g}: its "
            "forward changes the logits after the hidden states (or adds to the loss) in a way not reproduced here "
            f"(known: {', '.join(LOGIT_TRANSFORMS)}, MoE output_router_logits); refusing to train another objective"
        )
    return ours, reference
