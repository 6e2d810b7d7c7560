"""The OpenAI chat-completions wire format, without any web framework: a request body is checked
field by field into a `ChatRequest` (or an `APIError` naming the field), and replies, stream chunks
and errors are shaped as OpenAI's clients expect them.

Checked by hand rather than with a pydantic model because every mistake must come back as an
OpenAI-style error that names the field (`messages[2].role`), and because the extras our engine
supports (`top_k`, `repetition_penalty`, `ignore_eos`) must be read, not silently dropped.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

# The <tool_call> convention and its parser live with the chat template (one chat-format module).
from bumblecore.data.template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_call

ROLES = ("system", "user", "assistant", "tool")
INT64 = 2**63
MIN_REPETITION_PENALTY = 0.01
MAX_NESTING = 64  # deeper than any real request; a 100k-deep body must not exhaust the stack
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error the client caused; becomes `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 error_type: str = "invalid_request_error"):
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


def _invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise _invalid(name, f"expected a number, got {type(value).__name__}", "invalid_type")
    # Python's JSON reads NaN and Infinity, and NaN fails every comparison: test finiteness first.
    if not math.isfinite(value):
        raise _invalid(name, f"{value} is not a finite number")
    if value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise _invalid(name, f"{value} is outside {interval}")
    return float(value)


def _integer(body: dict, name: str, minimum: int, maximum: int = INT64 - 1) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if not _is_integer(value):
        raise _invalid(name, f"expected an integer, got {type(value).__name__}", "invalid_type")
    if not minimum <= value <= maximum:  # the engine keeps them in 64-bit tensors and generators
        raise _invalid(name, f"{value} is outside [{minimum}, {maximum}]")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, f"expected true or false, got {type(value).__name__}", "invalid_type")
    return value


def _content_text(content, param: str, required: bool) -> str:
    """A string, or OpenAI's list of parts of which we read the text ones."""
    if content is None:
        if required:
            raise _invalid(param, "missing content", "missing_field")
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            where = f"{param}[{index}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _invalid(where, 'only text parts are supported ({"type": "text", "text": ...})')
            if not isinstance(part.get("text"), str):
                raise _invalid(f"{where}.text", "expected a string", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(param, f"expected a string or a list of text parts, got {type(content).__name__}", "invalid_type")


def _tool_calls(calls, param: str) -> list[dict]:
    if not isinstance(calls, list):
        raise _invalid(param, "expected a list", "invalid_type")
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise _invalid(f"{param}[{index}].function.name", "expected a non-empty string", "invalid_type")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise _invalid(f"{param}[{index}].function.arguments", "expected a JSON string", "invalid_type")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(tools) -> Optional[list]:
    """OpenAI's tool definitions, `{"type": "function", "function": {"name", "description"?, "parameters"?}}`,
    checked because the template writes them into the system message as they are."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _invalid("tools", "expected a list of tool definitions", "invalid_type")
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise _invalid(where, 'expected {"type": "function", "function": {...}}', "invalid_type")
        if tool.get("type", "function") != "function":
            raise _invalid(f"{where}.type", f"only function tools are supported, got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _invalid(f"{where}.function", "expected an object with name, description and parameters", "invalid_type")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise _invalid(f"{where}.function.name", "expected a non-empty string", "invalid_type")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise _invalid(f"{where}.function.description", "expected a string", "invalid_type")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise _invalid(f"{where}.function.parameters", "expected a JSON Schema object", "invalid_type")
    return tools or None


def check_json_values(body, limit: int = MAX_NESTING) -> None:
    """Refuse what JSON can carry but no field may hold: nesting deeper than `limit` and lone UTF-16
    surrogates ("\\ud800"), which no tokenizer (and no UTF-8 reply) can encode. Iterative, so a deep
    body cannot overflow the stack here either."""
    stack = [(body, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > limit:
            raise APIError(400, f"The request body is nested more than {limit} levels deep.", param=where or None,
                           code="invalid_json")
        if isinstance(value, str):
            if LONE_SURROGATE.search(value):
                raise _invalid(where or "body", "contains a lone UTF-16 surrogate, which is not text")
        elif isinstance(value, dict):
            for key, item in value.items():
                if LONE_SURROGATE.search(key):
                    raise _invalid(where or "body", "a key contains a lone UTF-16 surrogate, which is not text")
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise _invalid("messages", "expected a list of messages", "invalid_type" if messages is not None else "missing_field")
    if not messages:
        raise _invalid("messages", "must contain at least one message")
    out = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid(where, "expected an object with role and content", "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _invalid(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        parsed = {"role": role}
        if role == "assistant" and message.get("tool_calls"):
            parsed["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
            parsed["content"] = _content_text(message.get("content"), f"{where}.content", required=False)
        else:
            parsed["content"] = _content_text(message.get("content"), f"{where}.content", required=True)
        out.append(parsed)
    return out


def parse_chat_request(body) -> ChatRequest:
    """Check a decoded JSON body; raise APIError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    check_json_values(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model", "expected a string", "invalid_type")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise _invalid("n", "only n = 1 is supported")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _invalid("stop", "expected a string or a list of strings", "invalid_type")
    # OpenAI's seed is an int64, as torch.Generator.manual_seed takes it.
    seed = _integer(body, "seed", -INT64)
    for ignored in ("presence_penalty", "frequency_penalty"):  # not applied, but still a number or refused
        _number(body, ignored, -2.0, 2.0)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options", "expected an object", "invalid_type")
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        tools=_tools(body.get("tools")),
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 2**31 - 1),
        # Below ~0.01 the penalty turns seen tokens' logits into infinities (1e-300 did).
        repetition_penalty=_number(body, "repetition_penalty", MIN_REPETITION_PENALTY, 10.0),
        stop=[s for s in stop if s],
        seed=seed,
        ignore_eos=_boolean(body, "ignore_eos"),
        stream=_boolean(body, "stream"),
        include_usage=_boolean(options or {}, "include_usage"),
    )


# ---------------------------------------------------------------------------- replies


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(request_id: str, model: str, message: dict, finish_reason: str, usage_counts: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_counts}


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: Optional[str] = None,
               usage_counts: Optional[dict] = None, created: Optional[int] = None) -> dict:
    choices = [] if usage_counts is not None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    chunk: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created or int(time.time()),
                             "model": model, "choices": choices}
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
    DESIGN.md §4) as a `tool_calls` entry. Text that may be the start of a block is held back until
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
                keep = next((n for n in range(min(len(TOOL_CALL_OPEN) - 1, len(self.pending)), 0, -1)
                             if TOOL_CALL_OPEN.startswith(self.pending[-n:])), 0)
                deltas += self._content(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                return deltas
            deltas += self._content(self.pending[:start])
            self.pending = self.pending[start:]
            end = self.pending.find(TOOL_CALL_CLOSE)
            if end == -1:
                return deltas  # the block is still arriving
            block, self.pending = self.pending[: end + len(TOOL_CALL_CLOSE)], self.pending[end + len(TOOL_CALL_CLOSE):]
            deltas.append(self._tool_call(block) or {"content": block})

    def finish(self) -> list[dict]:
        text, self.pending = self.pending, ""
        return self._content(text)

    @staticmethod
    def _content(text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def _tool_call(self, block: str) -> Optional[dict]:
        call = parse_tool_call(block[len(TOOL_CALL_OPEN): -len(TOOL_CALL_CLOSE)])
        if call is None:
            return None
        self.calls += 1
        return {"tool_calls": [{"index": self.calls - 1, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                "function": call}]}


def merge_deltas(deltas: list[dict]) -> dict:
    """A whole reply's message from its deltas: the content joined, the tool calls listed."""
    content = "".join(d.get("content", "") for d in deltas)
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    if not calls:
        return {"role": "assistant", "content": content}
    # The template writes "content\n<tool_call>...": the newline belongs to the template, not the content.
    return {"role": "assistant", "content": content.strip() or None,
            "tool_calls": [{k: v for k, v in call.items() if k != "index"} for call in calls]}
