"""GRPO's objective (Shao et al. 2024, DeepSeekMath), as sums the engine divides by the step's count.

For completion i of a group of G sampled for one prompt, with reward r_i:
    advantage  A_i = (r_i - mean(r_group)) / (std(r_group) + eps)   (scale_rewards false: r_i - mean)
    RLOO       A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean(r_group))   (advantage rloo)
For each completion token t, with ratio rho = exp(logp - old_logp) (old: the policy that sampled it):
    token loss = -min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * KL_t
    KL_t (k3)  = exp(ref_logp - logp) - (ref_logp - logp) - 1
Normalisation (`loss_type`), each as (sum, count) so accumulation and devices do not change it:
    grpo     mean over each sequence's tokens, then mean over the step's sequences: count = sequences
    dapo     mean over every completion token of the step: count = tokens
    dr_grpo  sum over tokens / (sequences x max_completion_length): count = sequences x that constant
std is the unbiased one over the group (a group of one has advantage 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bumblecore.args import GRPO_LOSS_TYPES as LOSS_TYPES


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: bool = True, eps: float = 1e-4, advantage: str = "grpo"
) -> torch.Tensor:
    """rewards: (prompts x group_size,), grouped consecutively -> advantages of the same shape."""
    groups = rewards.view(-1, group_size)
    if advantage == "rloo":  # each completion against the mean of the others (Ahmadian et al. 2024)
        if group_size == 1:
            return torch.zeros_like(rewards)
        others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others).reshape(-1)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


@dataclass
class TokenTerms:
    loss: torch.Tensor
    """(batch, tokens): each completion token's loss, 0 where mask is 0."""
    clipped: torch.Tensor
    """(batch, tokens) bool: the clip decided the token's term (its gradient is 0)."""
    kl: torch.Tensor
    """(batch, tokens): the k3 estimate against the reference (zeros without one)."""


def token_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps=None,
) -> TokenTerms:
    """logps, old_logps, ref_logps, mask: (batch, tokens); advantages: (batch,)."""
    ratio = torch.exp(logps - old_logps)
    advantage = advantages.unsqueeze(1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantage
    loss = -torch.min(unclipped, clipped)
    was_clipped = (clipped < unclipped) & mask.bool()
    if beta and ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(loss)
    mask = mask.to(loss.dtype)
    return TokenTerms(loss * mask, was_clipped, kl * mask)


def _sequences(mask: torch.Tensor, max_completion_length: int) -> int:
    return mask.shape[0]


def _completion_tokens(mask: torch.Tensor, max_completion_length: int) -> int:
    return int(mask.sum().item())


def _completion_slots(mask: torch.Tensor, max_completion_length: int) -> int:
    return mask.shape[0] * max_completion_length


# loss_type -> (the count of a micro-batch, whether each sequence is first averaged over its own tokens)
NORMALISATIONS = {
    "grpo": (_sequences, True),
    "dapo": (_completion_tokens, False),
    "dr_grpo": (_completion_slots, False),
}


def unit_count(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> int:
    """What the step's summed loss is divided by, for this micro-batch's share: sequences, completion
    tokens, or sequences x max_completion_length."""
    if loss_type not in NORMALISATIONS:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    return NORMALISATIONS[loss_type][0](mask, max_completion_length)


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int):
    """(summed loss, count) for the engine: loss / count over the step is the normalisation above."""
    count = unit_count(mask, loss_type, max_completion_length)
    if NORMALISATIONS[loss_type][1]:
        per_sequence = token_loss.sum(-1) / mask.to(token_loss.dtype).sum(-1).clamp(min=1)
        return per_sequence.sum(), count
    return token_loss.sum(), count
