"""Log-probabilities of tokens, for requests that ask for them (the API's `logprobs`): the model's
log-softmax of its raw logits (temperature 1, before repetition penalty, top-k or top-p), as vLLM's
default "raw" logprobs. The engine computes them only for the rows that ask.

A token's entry is `(token_id, logprob, top)`, `top` the k most likely `(token_id, logprob)` pairs
of that position, most likely first: plain tuples, as they travel from the inference worker to the
HTTP process.
"""

from collections.abc import Callable

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs (chat) and vLLM's default max_logprobs
PROMPT_CHUNK = 256  # prompt positions per log-softmax: a long prompt's vocab-wide rows are not all held at once

TokenLogprob = tuple[int, float, list[tuple[int, float]]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: list[int]) -> list[TokenLogprob]:
    """For each row of logits (rows, vocab): its token's log-probability and the row's `top[row]`
    most likely tokens."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    best_values, best_ids = logprobs.topk(max(top), dim=-1)
    best_values, best_ids = best_values.tolist(), best_ids.tolist()
    return [
        (token, value, list(zip(best_ids[row][: top[row]], best_values[row][: top[row]])))
        for row, (token, value) in enumerate(zip(tokens.tolist(), chosen))
    ]


def prompt_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, prompt: list[int], top: int
) -> list[TokenLogprob]:
    """The log-probability of each prompt token after the first, given the ones before it: `states`
    holds the prompt's positions but the last (seq - 1, hidden), `head` turns them into logits."""
    following = torch.tensor(prompt[1:], device=states.device)
    entries: list[TokenLogprob] = []
    for start in range(0, len(following), PROMPT_CHUNK):
        end = start + PROMPT_CHUNK
        entries += token_logprobs(head(states[start:end]), following[start:end], [top] * len(following[start:end]))
    return entries
