"""OpenAI's text-completions request (`/v1/completions`) and vLLM's `/tokenize` and `/detokenize`,
checked as the chat request is (inference/openai_request.py): each field by its own check, the first
bad one a 400 naming it. Token ids are checked against the tokenizer where it is known (serving_completions).
"""

from dataclasses import dataclass
from typing import Annotated, Optional, Union

from pydantic import BaseModel, BeforeValidator, Field

from bumblecore.inference.openai_fields import (
    REQUIRED,
    Flag,
    FlagDefaultTrue,
    Message,
    OptionalString,
    ResponseFormat,
    integer,
    invalid,
    messages_list,
)
from bumblecore.inference.openai_request import (
    APIError,
    Choices,
    Penalty,
    RepetitionPenalty,
    SampledRequest,
    Seed,
    Stop,
    StreamedBody,
    StreamOptions,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
    check_body,
    sampled_fields,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for text completions

Prompt = Union[str, list[int]]
"""One prompt: text, or token ids."""


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _prompts(value) -> list[Prompt]:
    """OpenAI's four forms of `prompt`: a text, a list of texts, token ids, a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise invalid("expected a string, a list of strings, token ids or a list of token-id lists", "invalid_type")
    if not value:
        raise invalid("must not be empty")
    if all(_is_token(v) for v in value):
        return [value]
    for i, item in enumerate(value):
        if isinstance(item, str):
            continue
        if not (isinstance(item, list) and item and all(_is_token(v) for v in item)):
            raise invalid(f"item {i} is neither a string nor a non-empty list of token ids (integers >= 0)")
    return value


def _no_suffix(value):
    if value:
        raise invalid("suffix (insertion) is not supported")
    return None


class CompletionBody(StreamedBody):
    """The fields of a completions body this server reads, in the order they are checked."""

    model: OptionalString = None
    prompt: Annotated[list[Prompt], BeforeValidator(_prompts)] = REQUIRED
    suffix: Annotated[None, BeforeValidator(_no_suffix)] = None
    n: Choices = None
    max_tokens: Annotated[Optional[int], integer(0)] = None
    stop: Stop = Field(default_factory=list)
    seed: Seed = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    stream_options: StreamOptions = None
    echo: Flag = False
    logprobs: TopLogprobs = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    repetition_penalty: RepetitionPenalty = None
    response_format: Optional[ResponseFormat] = None
    ignore_eos: Flag = False
    stream: Flag = False
    include_usage: Flag = False


@dataclass(kw_only=True)
class CompletionRequest(SampledRequest):
    """A checked completions request."""

    prompts: list[Prompt]
    max_tokens: int = DEFAULT_MAX_TOKENS
    """0 with echo: only the prompt, scored (with logprobs)."""
    echo: bool = False
    logprobs: Optional[int] = None
    """k: each token's log-probability and the k most likely ones (None: no logprobs)."""


def parse_completion_request(body) -> CompletionRequest:
    checked = check_body(body, CompletionBody)
    return CompletionRequest(
        prompts=checked.prompt,
        max_tokens=DEFAULT_MAX_TOKENS if checked.max_tokens is None else checked.max_tokens,
        echo=checked.echo,
        logprobs=checked.logprobs,
        **sampled_fields(checked),
    )


# ---------------------------------------------------------------------------- /tokenize, /detokenize


def _token_list(value) -> list[int]:
    if not (isinstance(value, list) and all(_is_token(v) for v in value)):
        raise invalid("expected a list of token ids (integers >= 0)", "invalid_type")
    return value


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: `prompt` (text) or `messages` (rendered by the chat template)."""

    model: OptionalString = None
    prompt: OptionalString = None
    messages: Annotated[Optional[list[Message]], BeforeValidator(lambda v: v if v is None else messages_list(v))] = None
    add_special_tokens: FlagDefaultTrue = True
    """Text: the tokenizer's own special tokens (its BOS) first. Messages: read but not applied (the
    template writes its own, as the server feeds them to the model)."""
    add_generation_prompt: FlagDefaultTrue = True
    return_token_strs: Flag = False


class DetokenizeBody(BaseModel):
    model: OptionalString = None
    tokens: Annotated[list[int], BeforeValidator(_token_list)] = REQUIRED


def parse_tokenize_request(body) -> TokenizeBody:
    checked = check_body(body, TokenizeBody)
    if (checked.prompt is None) == (checked.messages is None):
        raise APIError(400, "send either prompt or messages", param="prompt", code="invalid_value")
    return checked


def parse_detokenize_request(body) -> DetokenizeBody:
    return check_body(body, DetokenizeBody)
