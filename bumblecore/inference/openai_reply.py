"""OpenAI's chat-completions replies: whole replies, stream chunks, the model list, and the tool calls
a reply's text holds (the chat template's `<tool_call>` blocks) as OpenAI's `tool_calls`."""

import time
import uuid
from typing import Any, Optional

# The <tool_call> convention and its parser live with the chat template (one chat-format module).
from bumblecore.chat.format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_call

# ---------------------------------------------------------------------------- replies


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_choice(index: int, message: dict, finish_reason: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def reply_object(
    kind: str, request_id: str, model: str, choices: list[dict], usage_counts: Optional[dict], created: Optional[int]
) -> dict:
    """What every reply and chunk of OpenAI's API shares; `usage` only when given (a stream's last chunk)."""
    reply: dict[str, Any] = {
        "id": request_id,
        "object": kind,
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_counts is not None:
        reply["usage"] = usage_counts
    return reply


def chat_completion(request_id: str, model: str, choices: list[dict], usage_counts: dict) -> dict:
    return reply_object("chat.completion", request_id, model, choices, usage_counts, None)


def chat_chunk(
    request_id: str,
    model: str,
    delta: dict,
    finish_reason: Optional[str] = None,
    usage_counts: Optional[dict] = None,
    created: Optional[int] = None,
    index: int = 0,
) -> dict:
    choices = (
        []
        if usage_counts is not None
        else [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    return reply_object("chat.completion.chunk", request_id, model, choices, usage_counts, created)


def text_completion(
    request_id: str, model: str, choices: list[dict], usage_counts: Optional[dict], created: Optional[int] = None
) -> dict:
    """A text completion, or (one choice, no usage) a chunk of its stream: OpenAI's completions
    stream sends the same object."""
    return reply_object("text_completion", request_id, model, choices, usage_counts, created)


def text_choice(index: int, text: str, logprobs: Optional[dict], finish_reason: Optional[str]) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


# ---------------------------------------------------------------------------- logprobs


class TokenTexts:
    """Each token id's text (as the tokenizer decodes it alone), and the logprob shapes of OpenAI's
    chat and text completions built from the engine's `(token_id, logprob, top)` entries."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def __getitem__(self, token: int) -> str:
        # A model's vocabulary may be padded past its tokenizer's (to a multiple of 64): such ids have no text.
        return self.texts[token] if token < len(self.texts) else ""

    def chat_entry(self, entry) -> dict:
        """`{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}`."""
        token, logprob, top = entry
        return {
            **self._named(token, logprob),
            "top_logprobs": [self._named(other, value) for other, value in top],
        }

    def _named(self, token: int, logprob: float) -> dict:
        text = self[token]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def completion_logprobs(self) -> "CompletionLogprobs":
        return CompletionLogprobs(self)


class CompletionLogprobs:
    """A text completion's `logprobs`: `tokens`, `token_logprobs`, `top_logprobs` (`{token: logprob}`
    dicts) and `text_offset` (each token's start in the choice's text, the token texts joined), built
    token by token; `take()` hands over what was added since the last take (a stream chunk's part)."""

    def __init__(self, texts: TokenTexts):
        self.texts, self.offset = texts, 0
        self.part = self._empty()

    @staticmethod
    def _empty() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token: int, logprob: Optional[float], top: Optional[list]) -> None:
        text = self.texts[token]
        self.part["tokens"].append(text)
        self.part["token_logprobs"].append(logprob)
        self.part["top_logprobs"].append(None if top is None else self._by_text(top))
        self.part["text_offset"].append(self.offset)
        self.offset += len(text)

    def _by_text(self, top: list) -> dict:
        """{text: logprob}, most likely first; of tokens with the same text, the likelier one stays."""
        named: dict[str, float] = {}
        for token, logprob in top:
            named.setdefault(self.texts[token], logprob)
        return named

    def add_prompt(self, prompt: list[int], entries: list) -> None:
        """The prompt's tokens: the first has no logprob (nothing before it), the others the engine's."""
        self.add(prompt[0], None, None)
        for token, logprob, top in entries:
            self.add(token, logprob, top)

    def take(self) -> dict:
        part, self.part = self.part, self._empty()
        return part


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

    def __init__(self, open_marker: str = TOOL_CALL_OPEN, close_marker: str = TOOL_CALL_CLOSE):
        self.open, self.close = open_marker, close_marker  # the template's own (chat/tool_markup.py)
        self.pending = ""
        self.calls = 0

    def push(self, text: str) -> list[dict]:
        self.pending += text
        deltas = []
        while True:
            start = self.pending.find(self.open)
            if start == -1:
                keep = next(
                    (
                        n
                        for n in range(min(len(self.open) - 1, len(self.pending)), 0, -1)
                        if self.open.startswith(self.pending[-n:])
                    ),
                    0,
                )
                deltas += self._content(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep :]
                return deltas
            deltas += self._content(self.pending[:start])
            self.pending = self.pending[start:]
            end = self.pending.find(self.close)
            if end == -1:
                return deltas  # the block is still arriving
            block, self.pending = self.pending[: end + len(self.close)], self.pending[end + len(self.close) :]
            deltas.append(self._tool_call(block) or {"content": block})

    def finish(self) -> list[dict]:
        text, self.pending = self.pending, ""
        return self._content(text)

    @staticmethod
    def _content(text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def _tool_call(self, block: str) -> Optional[dict]:
        call = parse_tool_call(block[len(self.open) : -len(self.close)])
        if call is None:
            return None
        self.calls += 1
        return {
            "tool_calls": [
                {"index": self.calls - 1, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
            ]
        }


class ReplyDeltas:
    """A reply's text deltas as OpenAI message deltas: plain `content`, or, when the request offered
    tools, `tool_calls` for the template's `<tool_call>` blocks (finish_reason "tool_calls")."""

    def __init__(self, chat):
        self.tool_calls = ToolCallStream(*chat.tool_call_markers) if chat.tools else None

    def push(self, text: str) -> list[dict]:
        if self.tool_calls is None:
            return [{"content": text}] if text else []
        return self.tool_calls.push(text)

    def finish(self) -> list[dict]:
        return self.tool_calls.finish() if self.tool_calls is not None else []

    def finish_reason(self, engine_reason: str) -> str:
        return (
            "tool_calls"
            if self.tool_calls is not None and self.tool_calls.calls and engine_reason == "stop"
            else engine_reason
        )


class ChatChoice:
    """One choice of a whole (not streamed) chat reply, from its pieces."""

    def __init__(self, chat):
        self.replies, self.asks_logprobs = ReplyDeltas(chat), chat.logprobs
        self.deltas, self.logprobs, self.finish_reason, self.tokens = [], [], None, 0

    def push(self, piece: dict) -> None:
        self.deltas += self.replies.push(piece["text"])
        if "logprobs" in piece:
            self.logprobs.append(piece["logprobs"])
        if piece["finish_reason"]:
            self.deltas += self.replies.finish()
            self.finish_reason = self.replies.finish_reason(piece["finish_reason"])
        self.tokens = piece["completion_tokens"]

    def reply(self, index: int, texts: Optional[TokenTexts]) -> dict:
        logprobs = {"content": [texts.chat_entry(e) for e in self.logprobs]} if self.asks_logprobs else None
        return chat_choice(index, merge_deltas(self.deltas), self.finish_reason, logprobs)


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
