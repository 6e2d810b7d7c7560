"""OpenAI's `tool_choice` in chat completions: "none" (no tool call: the tools stay out of the prompt
and the reply is text), "auto" (the default with tools: the model may call, its calls are parsed),
"required" (at least one call of any tool) and `{"type": "function", "function": {"name": N}}`
(exactly one call of N).

A forced call is grammar-constrained decoding (inference/constrained.py, xgrammar, batched with
other requests): the reply is the chat template's own tool-call markup (chat/tool_markup.py, found
from the template) around `{"name": N, "arguments": {...}}`, the arguments following the function's
`parameters` JSON Schema, every JSON separator the template's (no other whitespace), so even a weak
model ends a small call within a few dozen tokens. "required" allows up to MAX_CALLS calls in one
reply (one with `parallel_tool_calls: false`); a named function is one call either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from pydantic import BeforeValidator

from bumblecore.chat.tool_markup import ToolCallMarkup, tool_call_markup
from bumblecore.inference.constrained import check_schema, xgrammar
from bumblecore.inference.openai_fields import invalid

MODES = ("none", "auto", "required")
NAMED = "function"  # the mode of {"type": "function", "function": {"name": N}}
# Parallel calls in one forced reply, at most: a weak model that never stops calling ends here.
MAX_CALLS = 8


@dataclass(frozen=True)
class ToolChoice:
    mode: str
    """none, auto, required, or function (a named one)."""
    name: Optional[str] = None

    @property
    def forces_a_call(self) -> bool:
        return self.mode in ("required", NAMED)


class ToolChoiceError(ValueError):
    """A tool_choice this server cannot follow for this request; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------------------- the field


def _tool_choice(value) -> Optional[ToolChoice]:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in MODES:
            raise invalid(
                f'expected one of {", ".join(MODES)} or {{"type": "function", "function": {{"name": ...}}}}, got {value!r}'
            )
        return ToolChoice(value)
    function = value.get("function") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and value.get("type") == NAMED and isinstance(function, dict)):
        raise invalid(
            'expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}', "invalid_type"
        )
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise invalid("function.name: expected a non-empty string", "invalid_type")
    return ToolChoice(NAMED, function["name"])


ToolChoiceField = BeforeValidator(_tool_choice)


def check_against_tools(choice: Optional[ToolChoice], tools: Optional[list]) -> ToolChoice:
    """The choice in effect (OpenAI's default: auto with tools, none without), refused where it
    names what the request's tools do not hold."""
    names = [tool.function.name for tool in tools or []]
    if choice is None:
        return ToolChoice("auto" if names else "none")
    if choice.forces_a_call and not names:
        raise invalid(f"{choice.mode if choice.mode != NAMED else 'a named function'} needs tools in the request")
    if choice.mode == NAMED and choice.name not in names:
        raise invalid(f"function {choice.name!r} is not one of the request's tools ({', '.join(names)})")
    return choice


# ---------------------------------------------------------------------------- the grammar


def call_schema(tool: dict) -> dict:
    """One call of `tool` as a JSON Schema: its name, then arguments that follow its parameters
    (none given: an empty object, as OpenAI reads a function without parameters)."""
    function = tool["function"]
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object", "properties": {}},
        },
        "required": ["name", "arguments"],
    }


def structural_tag(tools: list[tuple[int, dict]], markup: ToolCallMarkup, one_call: bool) -> str:
    """The xgrammar structural tag (JSON text) of a reply that is one or more calls of `tools` ((index
    in the request, definition) pairs), each in the template's markup, the calls separated as the
    template separates them; raises ToolChoiceError naming a tool whose parameters xgrammar cannot follow."""
    grammars = []
    for index, tool in tools:
        try:
            grammars.append(check_schema(json.dumps(call_schema(tool)), strict=True, separators=markup.separators))
        except ValueError as err:
            param = f"tools[{index}].function.parameters"
            raise ToolChoiceError(f"{param}: not a schema this server can follow: {err}", param) from None
    calls = grammars[0] if len(grammars) == 1 else xgrammar().Grammar.union(*grammars)
    tag = {
        "type": "tag",
        "begin": markup.before,
        "content": {"type": "grammar", "grammar": str(calls)},
        "end": markup.after,
    }
    if not one_call and markup.between is not None:
        more = {"type": "sequence", "elements": [{"type": "const_string", "value": markup.between}, tag]}
        tag = {
            "type": "sequence",
            "elements": [tag, {"type": "repeat", "min": 0, "max": MAX_CALLS - 1, "content": more}],
        }
    return json.dumps({"type": "structural_tag", "format": tag})


def constrain_tool_calls(chat, tokenizer) -> None:
    """Fill a chat request's tool-call fields from the model's template: the markers its reply is
    parsed with and, for a forced call, `tool_calls` (the structural tag the engine follows).
    Raises ToolChoiceError where the template has no markup this server can find."""
    markup = tool_call_markup(tokenizer)
    if markup is not None:
        chat.tool_call_markers = (markup.open, markup.close)
    choice = chat.tool_choice
    if choice is None or not choice.forces_a_call:
        return
    if markup is None:
        raise ToolChoiceError(
            f"tool_choice {choice.mode if choice.mode != NAMED else choice.name!r} forces a tool call, but this "
            "model's chat template writes no tool-call markup this server can find (a call rendered by the "
            'template must be {"name": ..., "arguments": ...} JSON between two markers); use tool_choice auto '
            "or a template with tools (chat_template: chatml or qwen2.5)",
            "tool_choice",
        )
    chosen = [
        (i, tool)
        for i, tool in enumerate(chat.tools)
        if choice.mode == "required" or tool["function"]["name"] == choice.name
    ]
    if choice.mode == NAMED:
        chosen = chosen[:1]  # the first definition of that name
    chat.tool_calls = structural_tag(chosen, markup, one_call=choice.mode == NAMED or not chat.parallel_tool_calls)
