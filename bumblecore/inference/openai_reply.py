"""OpenAI's chat-completions replies: whole replies, stream chunks, the model list, and the tool calls
a reply's text holds (the chat template's `<tool_call>` blocks) as OpenAI's `tool_calls`."""

import time
import uuid
from typing import Any, Optional

# The <tool_call> convention and its parser live with the chat template (one chat-format module).
from bumblecore.chat.format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_call

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
