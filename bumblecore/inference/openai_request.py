"""The OpenAI chat-completions request, without any web framework: a request body is checked by the
pydantic model `ChatCompletionBody` into a `ChatRequest` (or an `APIError` naming the field). Its parts'
checks are inference/openai_fields.py's; replies are shaped by inference/openai_reply.py.

Each field's check raises its own message with an OpenAI error code as the pydantic error type, so
the first pydantic error becomes the OpenAI error as it is: its location is the `param`
(`messages[2].role`), its message follows it. The extras our engine supports (`top_k`,
`repetition_penalty`, `ignore_eos`) are fields like OpenAI's own, not silently dropped.
"""

import re
from dataclasses import dataclass, field
from typing import Annotated, Optional

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bumblecore.chat.format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from bumblecore.inference.constrained import format_schema
from bumblecore.inference.logprobs import MAX_TOP_LOGPROBS
from bumblecore.inference.openai_fields import (
    INT64,
    REQUIRED,
    Flag,
    FlagDefaultTrue,
    Message,
    OptionalString,
    ResponseFormat,
    Tool,
    check_integer,
    integer,
    invalid,
    messages_list,
    number,
    of_type,
)
from bumblecore.inference.sampling import MIN_REPETITION_PENALTY  # the server's flags and the requests share the range
from bumblecore.inference.tool_choice import ToolChoice, ToolChoiceField, check_against_tools

MAX_NESTING = 64  # deeper than any real request; a 100k-deep body must not exhaust the stack
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error the client caused; becomes `{"error": {...}}` with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass(kw_only=True)
class SampledRequest:
    """The fields a chat and a text completions request share (one sampling_params reads both)."""

    model: Optional[str] = None
    # None = not sent: the server's defaults apply (its --max_new_tokens, --temperature ... flags).
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    """0 = greedy."""
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    """stream_options.include_usage: a last chunk with the token counts and no choices."""
    n: int = 1
    """Independent samples of the reply, each a choice."""
    response_format: Optional[tuple[str, bool]] = None
    """(JSON Schema text, strict), for the engine (inference/constrained.py); None: plain text."""
    tool_calls: Optional[str] = None
    """A forced tool call's structural tag, for the engine (inference/tool_choice.py); None: free text."""


@dataclass(kw_only=True)
class ChatRequest(SampledRequest):
    messages: list[dict]
    """Messages as the chat template reads them: role, content (a string), optional tool_calls."""
    tools: Optional[list] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: bool = True
    tool_call_markers: tuple[str, str] = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
    """What opens and closes a call in the reply: the template's own (chat/tool_markup.py) once known."""
    logprobs: bool = False
    top_logprobs: int = 0


# ---------------------------------------------------------------------------- the request

MAX_CHOICES = 128  # n: each choice holds a slot of the engine while it runs; more is no real client's need


def _stop(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        raise invalid("expected a string or a list of strings", "invalid_type")
    return value


# The fields chat and text completions share, each with its check.
Choices = Annotated[Optional[int], integer(1, MAX_CHOICES)]
Stop = Annotated[list[str], BeforeValidator(_stop)]
Seed = Annotated[Optional[int], integer(-INT64)]  # OpenAI's seed is an int64, as torch.Generator takes it
Penalty = Annotated[Optional[float], number(-2.0, 2.0)]  # presence/frequency: not applied, but a number or refused
StreamOptions = Annotated[Optional[dict], BeforeValidator(of_type(dict, "expected an object", True))]
Temperature = Annotated[Optional[float], number(0.0, 2.0)]
TopP = Annotated[Optional[float], number(0.0, 1.0, low_open=True)]
TopK = Annotated[Optional[int], integer(0, 2**31 - 1)]
# Below ~0.01 the penalty turns seen tokens' logits into infinities (1e-300 did).
RepetitionPenalty = Annotated[Optional[float], number(MIN_REPETITION_PENALTY, 10.0)]
TopLogprobs = Annotated[Optional[int], integer(0, MAX_TOP_LOGPROBS)]


class StreamedBody(BaseModel):
    """A body with `stream_options`: its include_usage is lifted out as a field of its own (checked
    where the body declares it, and named `include_usage`)."""

    @model_validator(mode="before")
    @classmethod
    def lift_include_usage(cls, body: dict):
        options = body.get("stream_options")
        return {**body, "include_usage": options.get("include_usage") if isinstance(options, dict) else None}


def seeds(seed: Optional[int], n: int) -> list[Optional[int]]:
    """Each of n samples' own seed: seed, seed + 1, ... (wrapped into int64), so the samples of one
    request differ and the same request gives the same samples again."""
    if seed is None:
        return [None] * n
    return [(seed + i + INT64) % (2 * INT64) - INT64 for i in range(n)]


class ChatCompletionBody(StreamedBody):
    """The fields of a chat-completions body this server reads, in the order they are checked (the
    first failing one is reported); other fields are ignored."""

    model: OptionalString = None
    n: Choices = None
    max_completion_tokens: Annotated[Optional[int], integer(1)] = None
    max_tokens: Optional[int] = None
    stop: Stop = Field(default_factory=list)
    seed: Seed = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    stream_options: StreamOptions = None
    messages: Annotated[list[Message], BeforeValidator(messages_list)] = REQUIRED
    tools: Annotated[
        Optional[list[Tool]], BeforeValidator(of_type(list, "expected a list of tool definitions", True))
    ] = None
    tool_choice: Annotated[Optional[ToolChoice], ToolChoiceField] = Field(None, validate_default=True)
    parallel_tool_calls: FlagDefaultTrue = True
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    repetition_penalty: RepetitionPenalty = None
    ignore_eos: Flag = False
    stream: Flag = False
    logprobs: Flag = False
    top_logprobs: TopLogprobs = None
    response_format: Optional[ResponseFormat] = None
    include_usage: Flag = False
    """stream_options.include_usage, lifted out: checked last."""

    @field_validator("max_tokens", mode="before")
    @classmethod
    def unless_max_completion_tokens(cls, value, info: ValidationInfo):
        """OpenAI's older name: read only when max_completion_tokens is not sent."""
        if info.data.get("max_completion_tokens") is not None:
            return None
        return check_integer(value, 1)

    @field_validator("tool_choice", mode="after")
    @classmethod
    def among_tools(cls, choice, info: ValidationInfo):
        return check_against_tools(choice, info.data.get("tools"))

    @field_validator("top_logprobs", mode="after")
    @classmethod
    def with_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise invalid("needs logprobs: true")
        return value


def field_path(loc: tuple) -> str:
    """A pydantic error location as the field's name in the body: ("messages", 2, "role") -> "messages[2].role"."""
    path = ""
    for part in loc:
        part = part if isinstance(part, int) else part.rstrip("_")  # `schema_`: a field aliased to "schema"
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def api_error(error: ValidationError) -> APIError:
    """The first failed check as OpenAI's error: its location is the param, its type the code."""
    first = error.errors(include_url=False)[0]
    param = field_path(first["loc"])
    return APIError(400, f"{param}: {first['msg']}", param=param, code=first["type"])


def check_json_values(body, limit: int = MAX_NESTING) -> None:
    """Refuse what JSON can carry but no field may hold: nesting deeper than `limit` and lone UTF-16
    surrogates ("\\ud800"), which no tokenizer (and no UTF-8 reply) can encode. Iterative, so a deep
    body cannot overflow the stack here either. Runs before the model: over the fields it ignores too."""

    def not_text(where: str, message: str) -> APIError:
        return APIError(400, f"{where}: {message}", param=where, code="invalid_value")

    stack = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > limit:
            raise APIError(
                400,
                f"The request body is nested more than {limit} levels deep.",
                param=where or None,
                code="invalid_json",
            )
        if isinstance(value, str):
            if LONE_SURROGATE.search(value):
                raise not_text(where or "body", "contains a lone UTF-16 surrogate, which is not text")
        elif isinstance(value, dict):
            for key, item in value.items():
                if LONE_SURROGATE.search(key):
                    raise not_text(where or "body", "a key contains a lone UTF-16 surrogate, which is not text")
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))


def check_body(body, model: type[BaseModel]):
    """A decoded JSON body checked by `model`; APIError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    check_json_values(body)
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise api_error(err) from None


def parse_chat_request(body) -> ChatRequest:
    """Check a decoded JSON body; raise APIError (400) naming the first bad field."""
    checked = check_body(body, ChatCompletionBody)
    return ChatRequest(
        messages=[message.template_form() for message in checked.messages],
        # As sent: the template writes the definitions as they are. tool_choice none: no tools in the
        # prompt (the model is not invited to call) and none parsed from the reply.
        tools=(body.get("tools") or None) if checked.tool_choice.mode != "none" else None,
        tool_choice=checked.tool_choice,
        parallel_tool_calls=checked.parallel_tool_calls,
        max_tokens=checked.max_tokens if checked.max_completion_tokens is None else checked.max_completion_tokens,
        logprobs=checked.logprobs,
        top_logprobs=checked.top_logprobs or 0,
        **sampled_fields(checked),
    )


def sampled_fields(checked) -> dict:
    """SampledRequest's fields from a checked chat or completions body."""
    return dict(
        model=checked.model,
        temperature=checked.temperature,
        top_p=checked.top_p,
        top_k=checked.top_k,
        repetition_penalty=checked.repetition_penalty,
        stop=[s for s in checked.stop if s],
        seed=checked.seed,
        ignore_eos=checked.ignore_eos,
        stream=checked.stream,
        include_usage=checked.include_usage,
        n=checked.n or 1,
        response_format=format_schema(checked.response_format and checked.response_format.as_dict()),
    )
