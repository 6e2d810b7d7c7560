"""Where a chat template writes an assistant's tool calls, found from the template itself: a probe
call is rendered (one call, then two) and the text around its JSON is the markup. For ChatML /
Qwen2.5 that is `<tool_call>\\n` before `{"name": ..., "arguments": {...}}`, `\\n</tool_call>` after,
and `\\n` between two calls; the JSON's separators are the template's own (`, ` and `: `). A server
that forces a tool call (tool_choice required or a named function) makes the reply exactly this
text, what a model trained on the template writes; nothing here names one model's markers.

A template that renders no tools, or whose calls are not `{"name", "arguments"}` JSON between two
non-blank markers, has no markup (None): forcing a call is then refused, never guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

PROBE_NAME = "probe_function"
PROBE_ARGUMENTS = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
PROBE_TOOLS = [{"type": "function", "function": {"name": PROBE_NAME, "parameters": {"type": "object"}}}]
SEPARATORS = ((", ", ": "), (",", ":"))  # the JSON layouts a template's call may have: json.dumps' or compact


@dataclass(frozen=True)
class ToolCallMarkup:
    before: str
    """The text before a call's JSON ("<tool_call>\\n"), right after the prompt for a reply."""
    after: str
    """The text after it ("\\n</tool_call>"), up to the end of the turn or the next call."""
    between: Optional[str]
    """The text between two calls ("\\n"); None: the template writes one call per reply."""
    separators: tuple[str, str]
    """The call JSON's item and key separators, as json.dumps takes them."""

    @property
    def open(self) -> str:
        """The marker that opens a call (what a reply parser looks for)."""
        return self.before.strip()

    @property
    def close(self) -> str:
        return self.after.strip()


def tool_call_markup(tokenizer) -> Optional[ToolCallMarkup]:
    """The tokenizer's chat template's tool-call markup (found once per template), or None."""
    from bumblecore.chat.format import ChatFormatError, chat_format

    try:
        fmt = chat_format(tokenizer)
    except ChatFormatError:
        return None
    cached = getattr(tokenizer, "_bumblecore_tool_markup", None)
    if cached is None or cached[0] != fmt.template:
        cached = (fmt.template, _find_markup(tokenizer, fmt.end_of_turn) if fmt.supports_tools else None)
        tokenizer._bumblecore_tool_markup = cached
    return cached[1]


def _reply(tokenizer, calls: int, end_of_turn: list[str]) -> Optional[str]:
    """The text the template adds after the prompt for a reply of `calls` probe calls, less its end of turn."""
    asking = [{"role": "user", "content": "ping"}]
    reply = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": PROBE_NAME, "arguments": arguments}}
            for arguments in PROBE_ARGUMENTS[:calls]
        ],
    }
    try:
        prompt = tokenizer.apply_chat_template(asking, tools=PROBE_TOOLS, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(asking + [reply], tools=PROBE_TOOLS, tokenize=False)
    except Exception:  # the template's raise_exception, or a Jinja error: no markup to follow
        return None
    if not full.startswith(prompt):
        return None
    text = full[len(prompt) :]
    end = text.rfind(end_of_turn[0]) if end_of_turn else -1
    return text[:end] if end >= 0 else None


def _call_json(text: str, arguments: dict) -> Optional[tuple[int, int, tuple[str, str]]]:
    """(start, end, separators) of the probe call's JSON in `text`: `{"name": ..., "arguments": ...}`
    in that order, in one of the layouts json.dumps writes."""
    decoder = json.JSONDecoder()
    for start in (i for i, char in enumerate(text) if char == "{"):
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if value == {"name": PROBE_NAME, "arguments": arguments} and list(value) == ["name", "arguments"]:
            for separators in SEPARATORS:
                if text[start:end] == json.dumps(value, separators=separators, ensure_ascii=False):
                    return start, end, separators
            return None
    return None


def _find_markup(tokenizer, end_of_turn: list[str]) -> Optional[ToolCallMarkup]:
    one = _reply(tokenizer, 1, end_of_turn)
    found = _call_json(one, PROBE_ARGUMENTS[0]) if one is not None else None
    if found is None:
        return None
    start, end, separators = found
    before, after = one[:start], one[end:]
    if not (before.strip() and after.strip()):
        return None  # no markers: a reply's calls could not be told from its text

    def block(arguments: dict) -> str:
        return before + json.dumps({"name": PROBE_NAME, "arguments": arguments}, separators=separators) + after

    two, first, second = _reply(tokenizer, 2, end_of_turn), block(PROBE_ARGUMENTS[0]), block(PROBE_ARGUMENTS[1])
    between = None
    if two is not None and two.startswith(first) and two.endswith(second) and len(two) >= len(first + second):
        between = two[len(first) : len(two) - len(second)]
    return ToolCallMarkup(before, after, between, separators)
