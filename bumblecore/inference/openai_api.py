"""The OpenAI chat-completions wire format, without any web framework: a request body is checked
field by field into a `ChatRequest` (or an `APIError` naming the field), and replies, stream chunks
and errors are shaped as OpenAI's clients expect them.

Checked by hand rather than with a pydantic model because every mistake must come back as an
OpenAI-style error that names the field (`messages[2].role`), and because the extras our engine
supports (`top_k`, `repetition_penalty`, `ignore_eos`) must be read, not silently dropped.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

ROLES = ("system", "user", "assistant", "tool")


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
    if value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise _invalid(name, f"{value} is outside {interval}")
    return float(value)


def _integer(body: dict, name: str, minimum: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if not _is_integer(value):
        raise _invalid(name, f"expected an integer, got {type(value).__name__}", "invalid_type")
    if value < minimum:
        raise _invalid(name, f"must be at least {minimum}, got {value}")
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
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid(f"{param}[{index}].function.name", "expected a string", "invalid_type")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, (str, dict)):
            raise _invalid(f"{param}[{index}].function.arguments", "expected a JSON string", "invalid_type")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


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
    seed = body.get("seed")
    if seed is not None and not _is_integer(seed):
        raise _invalid("seed", "expected an integer", "invalid_type")
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _invalid("tools", "expected a list of tool definitions", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _invalid("stream_options", "expected an object", "invalid_type")
    return ChatRequest(
        messages=parse_messages(body.get("messages")),
        tools=tools or None,
        model=model,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, low_open=True),
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

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


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
        import json

        try:
            call = json.loads(block[len(TOOL_CALL_OPEN): -len(TOOL_CALL_CLOSE)])
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        self.calls += 1
        return {"tool_calls": [{"index": self.calls - 1, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                "function": {"name": call["name"], "arguments": arguments}}]}


def merge_deltas(deltas: list[dict]) -> dict:
    """A whole reply's message from its deltas: the content joined, the tool calls listed."""
    content = "".join(d.get("content", "") for d in deltas)
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    if not calls:
        return {"role": "assistant", "content": content}
    # The template writes "content\n<tool_call>...": the newline belongs to the template, not the content.
    return {"role": "assistant", "content": content.strip() or None,
            "tool_calls": [{k: v for k, v in call.items() if k != "index"} for call in calls]}
