"""The OpenAI chat-completions wire format, without any web framework: a request body is checked by
the pydantic model `ChatCompletionBody` into a `ChatRequest` (or an `APIError` naming the field),
and replies, stream chunks and errors are shaped as OpenAI's clients expect them.

Each field's check raises its own message with an OpenAI error code as the pydantic error type, so
the first pydantic error becomes the OpenAI error as it is: its location is the `param`
(`messages[2].role`), its message follows it. The extras our engine supports (`top_k`,
`repetition_penalty`, `ignore_eos`) are fields like OpenAI's own, not silently dropped.
"""

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bumblecore.args import MIN_REPETITION_PENALTY  # the server's flags and the requests share the range

# The <tool_call> convention and its parser live with the chat template (one chat-format module).
from bumblecore.data.template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_call

ROLES = ("system", "user", "assistant", "tool")
INT64 = 2**63
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


@dataclass
class ChatRequest:
    messages: list[dict]
    """Messages as the chat template reads them: role, content (a string), optional tool_calls."""
    tools: Optional[list] = None
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


# ---------------------------------------------------------------------------- checks of single values
# Each takes the value as JSON decoded it (before pydantic converts anything: `-1`, not `-1.0`, in
# the message) and raises a PydanticCustomError whose type is the OpenAI error code.


def _invalid(message: str, code: str = "invalid_value") -> PydanticCustomError:
    return PydanticCustomError(code, message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(low: float, high: float, low_open: bool = False) -> BeforeValidator:
    """A number in [low, high] ((low, high] with low_open), or null."""

    def check(value) -> Optional[float]:
        if value is None:
            return None
        if not _is_number(value):
            raise _invalid(f"expected a number, got {type(value).__name__}", "invalid_type")
        # Python's JSON reads NaN and Infinity, and NaN fails every comparison: test finiteness first.
        if not math.isfinite(value):
            raise _invalid(f"{value} is not a finite number")
        if value < low or (low_open and value == low) or value > high:
            raise _invalid(f"{value} is outside {'(' if low_open else '['}{low}, {high}]")
        return float(value)

    return BeforeValidator(check)


def check_integer(value, minimum: int, maximum: int = INT64 - 1) -> Optional[int]:
    if value is None:
        return None
    if not _is_integer(value):
        raise _invalid(f"expected an integer, got {type(value).__name__}", "invalid_type")
    if not minimum <= value <= maximum:  # the engine keeps them in 64-bit tensors and generators
        raise _invalid(f"{value} is outside [{minimum}, {maximum}]")
    return value


def integer(minimum: int, maximum: int = INT64 - 1) -> BeforeValidator:
    """An integer in [minimum, maximum], or null."""
    return BeforeValidator(lambda value: check_integer(value, minimum, maximum))


def _flag(value) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"expected true or false, got {type(value).__name__}", "invalid_type")
    return value


def _optional_string(value) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise _invalid("expected a string", "invalid_type")
    return value


def _string(value) -> str:
    if not isinstance(value, str):
        raise _invalid("expected a string", "invalid_type")
    return value


def _name(value) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid("expected a non-empty string", "invalid_type")
    return value


def _object(value) -> Optional[dict]:
    if value is not None and not isinstance(value, dict):
        raise _invalid("expected an object", "invalid_type")
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]
OptionalString = Annotated[Optional[str], BeforeValidator(_optional_string)]
Name = Annotated[str, BeforeValidator(_name)]
REQUIRED = Field(None, validate_default=True)  # checked when absent too: a missing one fails its own check


# ---------------------------------------------------------------------------- messages


class TextPart(BaseModel):
    """A part of a message's content (OpenAI's list form); only text parts are read."""

    text: Annotated[str, BeforeValidator(_string)] = REQUIRED

    @model_validator(mode="before")
    @classmethod
    def only_text(cls, part):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise _invalid('only text parts are supported ({"type": "text", "text": ...})')
        return part


def _arguments(value) -> Union[str, dict]:
    if not isinstance(value, (str, dict)):
        raise _invalid("expected a JSON string", "invalid_type")
    return value


class ToolCallFunction(BaseModel):
    name: Name = REQUIRED
    arguments: Annotated[Union[str, dict], BeforeValidator(_arguments)] = "{}"


class ToolCall(BaseModel):
    """A tool call in an earlier assistant message, as the chat template writes it back."""

    function: ToolCallFunction

    @model_validator(mode="before")
    @classmethod
    def function_object(cls, call):
        # A call that is not an object, or has no function object, is refused for its missing name.
        function = call.get("function") if isinstance(call, dict) else None
        return {"function": function if isinstance(function, dict) else {}}

    def template_form(self) -> dict:
        return {"type": "function", "function": {"name": self.function.name, "arguments": self.function.arguments}}


def _role(value) -> str:
    if value not in ROLES:
        raise _invalid(f"unknown role {value!r}; expected one of {', '.join(ROLES)}")
    return value


class Message(BaseModel):
    """One message; fields in the order they are checked (content may depend on the two before it)."""

    role: Annotated[str, BeforeValidator(_role)] = REQUIRED
    tool_calls: Optional[list[ToolCall]] = None
    content: Optional[list[TextPart]] = REQUIRED

    @model_validator(mode="before")
    @classmethod
    def an_object(cls, message):
        if not isinstance(message, dict):
            raise _invalid("expected an object with role and content", "invalid_type")
        return message

    @field_validator("tool_calls", mode="before")
    @classmethod
    def calls_of_an_assistant(cls, calls, info: ValidationInfo):
        """Read on assistant messages only; elsewhere ignored."""
        if info.data.get("role") != "assistant" or not calls:
            return None
        if not isinstance(calls, list):
            raise _invalid("expected a list", "invalid_type")
        return calls

    @field_validator("content", mode="before")
    @classmethod
    def text_or_text_parts(cls, content, info: ValidationInfo):
        """A string, or OpenAI's list of parts; required unless the message makes tool calls."""
        if content is None:
            if info.data.get("tool_calls"):
                return []
            raise _invalid("missing content", "missing_field")
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if isinstance(content, list):
            return content
        raise _invalid(f"expected a string or a list of text parts, got {type(content).__name__}", "invalid_type")

    def template_form(self) -> dict:
        text = "".join(part.text for part in self.content)
        if self.tool_calls:
            return {
                "role": self.role,
                "tool_calls": [call.template_form() for call in self.tool_calls],
                "content": text,
            }
        return {"role": self.role, "content": text}


def _messages(value) -> list:
    if not isinstance(value, list):
        raise _invalid("expected a list of messages", "invalid_type" if value is not None else "missing_field")
    if not value:
        raise _invalid("must contain at least one message")
    return value


# ---------------------------------------------------------------------------- tools


def _json_schema(value) -> Optional[dict]:
    if value is not None and not isinstance(value, dict):
        raise _invalid("expected a JSON Schema object", "invalid_type")
    return value


class ToolFunction(BaseModel):
    name: Name = REQUIRED
    description: OptionalString = None
    parameters: Annotated[Optional[dict], BeforeValidator(_json_schema)] = None


def _function_type(value) -> str:
    if value != "function":
        raise _invalid(f"only function tools are supported, got {value!r}")
    return value


class Tool(BaseModel):
    """OpenAI's tool definition, `{"type": "function", "function": {"name", "description"?, "parameters"?}}`,
    checked because the template writes it into the system message as it is."""

    type: Annotated[str, BeforeValidator(_function_type)] = "function"
    function: ToolFunction = REQUIRED

    @model_validator(mode="before")
    @classmethod
    def an_object(cls, tool):
        if not isinstance(tool, dict):
            raise _invalid('expected {"type": "function", "function": {...}}', "invalid_type")
        return tool

    @field_validator("function", mode="before")
    @classmethod
    def function_object(cls, function):
        if not isinstance(function, dict):
            raise _invalid("expected an object with name, description and parameters", "invalid_type")
        return function


def _tools(value) -> Optional[list]:
    if value is not None and not isinstance(value, list):
        raise _invalid("expected a list of tool definitions", "invalid_type")
    return value


# ---------------------------------------------------------------------------- the request


def _n(value) -> Optional[int]:
    n = check_integer(value, 1)
    if n not in (None, 1):
        raise _invalid("only n = 1 is supported")
    return n


def _stop(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        raise _invalid("expected a string or a list of strings", "invalid_type")
    return value


class ChatCompletionBody(BaseModel):
    """The fields of a chat-completions body this server reads, in the order they are checked (the
    first failing one is reported); other fields are ignored."""

    model: OptionalString = None
    n: Annotated[Optional[int], BeforeValidator(_n)] = None
    max_completion_tokens: Annotated[Optional[int], integer(1)] = None
    max_tokens: Optional[int] = None
    stop: Annotated[list[str], BeforeValidator(_stop)] = Field(default_factory=list)
    seed: Annotated[Optional[int], integer(-INT64)] = None  # OpenAI's seed is an int64, as torch.Generator takes it
    # Not applied, but still a number or refused.
    presence_penalty: Annotated[Optional[float], number(-2.0, 2.0)] = None
    frequency_penalty: Annotated[Optional[float], number(-2.0, 2.0)] = None
    stream_options: Annotated[Optional[dict], BeforeValidator(_object)] = None
    messages: Annotated[list[Message], BeforeValidator(_messages)] = REQUIRED
    tools: Annotated[Optional[list[Tool]], BeforeValidator(_tools)] = None
    temperature: Annotated[Optional[float], number(0.0, 2.0)] = None
    top_p: Annotated[Optional[float], number(0.0, 1.0, low_open=True)] = None
    top_k: Annotated[Optional[int], integer(0, 2**31 - 1)] = None
    # Below ~0.01 the penalty turns seen tokens' logits into infinities (1e-300 did).
    repetition_penalty: Annotated[Optional[float], number(MIN_REPETITION_PENALTY, 10.0)] = None
    ignore_eos: Flag = False
    stream: Flag = False
    include_usage: Flag = False
    """stream_options.include_usage, lifted out (below): checked last and named `include_usage`."""

    @model_validator(mode="before")
    @classmethod
    def lift_include_usage(cls, body: dict):
        options = body.get("stream_options")
        return {**body, "include_usage": options.get("include_usage") if isinstance(options, dict) else None}

    @field_validator("max_tokens", mode="before")
    @classmethod
    def unless_max_completion_tokens(cls, value, info: ValidationInfo):
        """OpenAI's older name: read only when max_completion_tokens is not sent."""
        if info.data.get("max_completion_tokens") is not None:
            return None
        return check_integer(value, 1)


def field_path(loc: tuple) -> str:
    """A pydantic error location as the field's name in the body: ("messages", 2, "role") -> "messages[2].role"."""
    path = ""
    for part in loc:
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


def parse_chat_request(body) -> ChatRequest:
    """Check a decoded JSON body; raise APIError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    check_json_values(body)
    try:
        checked = ChatCompletionBody.model_validate(body)
    except ValidationError as err:
        raise api_error(err) from None
    return ChatRequest(
        messages=[message.template_form() for message in checked.messages],
        tools=body.get("tools") or None,  # as sent: the template writes the definitions as they are
        model=checked.model,
        max_tokens=checked.max_tokens if checked.max_completion_tokens is None else checked.max_completion_tokens,
        temperature=checked.temperature,
        top_p=checked.top_p,
        top_k=checked.top_k,
        repetition_penalty=checked.repetition_penalty,
        stop=[s for s in checked.stop if s],
        seed=checked.seed,
        ignore_eos=checked.ignore_eos,
        stream=checked.stream,
        include_usage=checked.include_usage,
    )


# ---------------------------------------------------------------------------- replies


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(request_id: str, model: str, message: dict, finish_reason: str, usage_counts: dict) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_counts,
    }


def chat_chunk(
    request_id: str,
    model: str,
    delta: dict,
    finish_reason: Optional[str] = None,
    usage_counts: Optional[dict] = None,
    created: Optional[int] = None,
) -> dict:
    choices = (
        []
        if usage_counts is not None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_counts is not None:
        chunk["usage"] = usage_counts
    return chunk


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "bumblecore"}


# ---------------------------------------------------------------------------- tool calls in replies


class ToolCallStream:
    """Turns a reply's text, as it streams in, into OpenAI deltas: plain text as `content`, and each
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block (the chat template's convention,
    docs/DATA_FORMAT.md) as a `tool_calls` entry. Text that may be the start of a block is held back until
    the block closes; a block that is not valid JSON stays text."""

    def __init__(self):
        self.pending = ""
        self.calls = 0

    def push(self, text: str) -> list[dict]:
        self.pending += text
        deltas = []
        while True:
            start = self.pending.find(TOOL_CALL_OPEN)
            if start == -1:
                keep = next(
                    (
                        n
                        for n in range(min(len(TOOL_CALL_OPEN) - 1, len(self.pending)), 0, -1)
                        if TOOL_CALL_OPEN.startswith(self.pending[-n:])
                    ),
                    0,
                )
                deltas += self._content(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                return deltas
            deltas += self._content(self.pending[:start])
            self.pending = self.pending[start:]
            end = self.pending.find(TOOL_CALL_CLOSE)
            if end == -1:
                return deltas  # the block is still arriving
            block, self.pending = self.pending[: end + len(TOOL_CALL_CLOSE)], self.pending[end + len(TOOL_CALL_CLOSE) :]
            deltas.append(self._tool_call(block) or {"content": block})

    def finish(self) -> list[dict]:
        text, self.pending = self.pending, ""
        return self._content(text)

    @staticmethod
    def _content(text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def _tool_call(self, block: str) -> Optional[dict]:
        call = parse_tool_call(block[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)])
        if call is None:
            return None
        self.calls += 1
        return {
            "tool_calls": [
                {"index": self.calls - 1, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
            ]
        }


def merge_deltas(deltas: list[dict]) -> dict:
    """A whole reply's message from its deltas: the content joined, the tool calls listed."""
    content = "".join(d.get("content", "") for d in deltas)
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    if not calls:
        return {"role": "assistant", "content": content}
    # The template writes "content\n<tool_call>...": the newline belongs to the template, not the content.
    return {
        "role": "assistant",
        "content": content.strip() or None,
        "tool_calls": [{k: v for k, v in call.items() if k != "index"} for call in calls],
    }
