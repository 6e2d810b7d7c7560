"""The chat template as token ids plus a target mask (DESIGN.md §4).

The conversation is rendered to text piece by piece, exactly as `tokenizer.CHAT_TEMPLATE` renders
it, remembering which characters are trained: each assistant turn's content (or tool calls) and
its `<|im_end|>`; never the `<|im_start|>assistant\\n` header, the newline after `<|im_end|>`, or any
system/user/tool text. The whole text is then tokenized once and a token is a target when its
characters overlap a trained span, so BPE merges are exactly those of tokenizing the full text.
"""

from __future__ import annotations

import json
from typing import Optional

from bumblecore.tokenizer import DEFAULT_SYSTEM_PROMPT, ENDOFTEXT

TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _json(value) -> str:
    # Same text as the template's `tojson` filter in transformers.
    return json.dumps(value, ensure_ascii=False)


def _tool_call_text(call: dict) -> str:
    call = call.get("function", call)
    arguments = call.get("arguments", {})
    arguments = arguments if isinstance(arguments, str) else _json(arguments)
    return f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments}}}\n</tool_call>'


def render_pieces(messages: list[dict], tools: Optional[list] = None, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the chat template's output."""
    if messages and messages[0]["role"] == "system":
        system, body = messages[0]["content"], messages[1:]
    else:
        system, body = DEFAULT_SYSTEM_PROMPT, messages
    if tools:
        tool_lines = "".join("\n" + _json(t) for t in tools)
        pieces = [(f"<|im_start|>system\n{system}{TOOLS_HEADER}{tool_lines}{TOOLS_FOOTER}<|im_end|>\n", False)]
    else:
        pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
    for index, message in enumerate(body):
        role = message["role"]
        if role == "tool":
            opens = index == 0 or body[index - 1]["role"] != "tool"
            closes = index == len(body) - 1 or body[index + 1]["role"] != "tool"
            text = ("<|im_start|>user" if opens else "") + f"\n<tool_response>\n{message['content']}\n</tool_response>"
            pieces.append((text + ("<|im_end|>\n" if closes else ""), False))
        elif role == "assistant":
            pieces.append(("<|im_start|>assistant\n", False))
            if message.get("tool_calls"):
                content = message.get("content") or ""
                reply = (content + "\n" if content else "") + "\n".join(_tool_call_text(c) for c in message["tool_calls"])
            else:
                reply = message["content"]
            pieces.append((reply + "<|im_end|>", True))
            pieces.append(("\n", False))
        else:
            pieces.append((f"<|im_start|>{role}\n{message['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def render_text(messages: list[dict], tools: Optional[list] = None, add_generation_prompt: bool = False) -> str:
    return "".join(text for text, _ in render_pieces(messages, tools, add_generation_prompt))


def join_pieces(pieces: list[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its trained pieces."""
    text, spans, position = "", [], 0
    for piece, trained in pieces:
        if trained:
            spans.append((position, position + len(piece)))
        text += piece
        position += len(piece)
    return text, spans


def target_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (by its character offsets), whether it overlaps a trained span."""
    mask, span_index = [], 0
    for start, end in offsets:
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        mask.append(span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0])
    return mask


def tokenize_pieces(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids of the joined text, and for each token whether it overlaps a trained piece."""
    text, spans = join_pieces(pieces)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], target_mask(encoded["offset_mapping"], spans)


def encode_conversation(tokenizer, messages: list[dict], tools: Optional[list] = None) -> tuple[list[int], list[bool]]:
    """A whole training conversation: ids and target mask (every assistant turn trained)."""
    return tokenize_pieces(tokenizer, render_pieces(messages, tools))


def encode_preference(tokenizer, messages: list[dict], reply: dict, tools: Optional[list] = None) -> tuple[list[int], list[bool]]:
    """Prompt history plus one candidate reply; only the reply is trained (earlier assistant turns are context)."""
    pieces = render_pieces(messages + [reply], tools)
    last = max(i for i, (_, trained) in enumerate(pieces) if trained)
    pieces = [(text, trained and i == last) for i, (text, trained) in enumerate(pieces)]
    return tokenize_pieces(tokenizer, pieces)


def render_prompt(tokenizer, messages: list[dict], tools: Optional[list] = None) -> list[int]:
    """Ids of a prompt for generation, ending with `<|im_start|>assistant\\n` (shared with inference)."""
    return tokenizer(render_text(messages, tools, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def encode_document(tokenizer, text: str) -> list[int]:
    """A pretraining document followed by the end-of-text token; every token is a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [end_of_text_id(tokenizer)]


def end_of_text_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    if token_id is None or token_id == tokenizer.unk_token_id:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither <|endoftext|> nor an eos token to end documents with")
        return tokenizer.eos_token_id
    return token_id
