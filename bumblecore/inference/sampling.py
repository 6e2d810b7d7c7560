"""Sampling: the options users give for each reply (SamplingArgs, whose field docstrings are the
`--help` of generate, chat and serve; SamplingParams adds one request's own for the engine) and the filters that apply them to a batch of logits, each row
with its own values, in the order and with the semantics of transformers' logits processors:
repetition penalty (greedy too), then temperature, top-k, top-p.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

# Below ~0.01 the penalty turns seen tokens' logits into infinities (1e-300 did).
MIN_REPETITION_PENALTY = 0.01


@dataclass(frozen=True)
class SamplingArgs:
    """Sampling: how each reply is generated"""

    # The class defaults are generate's; chat and serve declare their own instance as their default.
    max_new_tokens: Optional[int] = 256
    """Most tokens to generate per reply (null: up to the end of the context)."""
    do_sample: bool = False
    """Sample from the filtered distribution (true) or take the most likely token (false: greedy)."""
    temperature: float = 1.0
    """Sampling temperature, 0 to 100 (below 1: more focused, above: more varied)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: no top-k filter)."""
    top_p: float = 1.0
    """Nucleus sampling: the most likely tokens that together hold this probability mass, above 0 and at most 1."""
    repetition_penalty: float = 1.0
    """Above 1 discourages tokens already in the prompt or the reply (1: none), 0.01 to 10."""

    def __post_init__(self) -> None:
        # NaN fails every comparison: it is refused too.
        if not (
            0 <= self.temperature <= 100
            and 0 < self.top_p <= 1
            and self.top_k >= 0
            and MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10
        ):
            raise ValueError(
                f"expected 0 <= temperature <= 100, 0 < top_p <= 1, top_k >= 0 and "
                f"{MIN_REPETITION_PENALTY} <= repetition_penalty <= 10"
            )


@dataclass(frozen=True)
class SamplingParams(SamplingArgs):
    """One request's sampling: the options generate, chat and serve share (SamplingArgs, whose
    defaults are generate's), and the ones that belong to a single request."""

    stop: list[str] = field(default_factory=list)
    """Stop strings (not included in the text)."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence ids."""
    seed: Optional[int] = None
    """Seeds this request's own generator: the same seed gives the same text whatever else is batched."""
    response_format: Optional[tuple[str, bool]] = None
    """(JSON Schema text, strict): the reply is JSON that follows it (inference/constrained.py)."""
    tool_calls: Optional[str] = None
    """A structural tag (JSON text): the reply is tool calls in the chat template's markup (inference/tool_choice.py)."""
    logprobs: Optional[int] = None
    """Each generated token's log-probability and this many most likely ones (inference/logprobs.py)."""
    prompt_logprobs: Optional[int] = None
    """The same for the prompt's tokens after the first (the whole prompt is prefilled: no prefix reuse)."""

    def __post_init__(self) -> None:
        # Not range-checked: the engine takes any values, and a request whose values break sampling (NaN,
        # a penalty that overflows the logits) fails alone in step(). Options are checked where users
        # give them: SamplingArgs (the commands' flags) and the API's request models.
        pass

    @classmethod
    def from_group(cls, sampling: SamplingArgs, **per_request) -> SamplingParams:
        """The group's values, with this request's stop, ignore_eos and seed."""
        shared = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(SamplingArgs)}
        return cls(**shared, **per_request)


# ---------------------------------------------------------------------------- the filters


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Tokens already in the row (prompt + generated): negative scores x penalty, positive / penalty."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k highest scores (ties at the k-th kept); k = 0 keeps all."""
    vocab = logits.shape[-1]
    k = top_k.clamp(min=0, max=vocab)
    kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, (k.clamp(min=1) - 1)[:, None])
    remove = (logits < kth) & (k > 0)[:, None]
    return logits.masked_fill(remove, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose mass exceeds top_p (at least one)."""
    sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_index, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def warp_logits(logits, temperature, top_k, top_p) -> torch.Tensor:
    """The sampling warpers in transformers' order: temperature, top-k, top-p (per-row values)."""
    return apply_top_p(apply_top_k(logits / temperature[:, None], top_k), top_p)


def greedy_tokens(logits: torch.Tensor, block: int = 128) -> torch.Tensor:
    """logits.argmax(-1): each row's first maximum (NaN counts as the maximum, as in argmax).

    On CPU argmax (and max with indices) over a row is a scalar loop: ~0.7-1.3 ms for 16 x 32,000
    logits. Here the vectorised amax finds each block's maximum, the first block holding the row's
    maximum is searched, then the first maximum inside it: the same index, ~4x faster at batch 16."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or vocab % block or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    blocks = logits.view(rows, vocab // block, block)
    first_block = blocks.amax(dim=-1).argmax(dim=-1)
    inside = blocks[torch.arange(rows), first_block].argmax(dim=-1)
    return first_block * block + inside
