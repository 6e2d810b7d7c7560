"""The chat format, one module from training to serving (docs/DATA_FORMAT.md, "The chat template and
the mask rule"): the template, the renderer that yields token ids plus the trained-token mask, the
end-of-turn tokens, the tool-call parser.

There is one copy of each template: the Jinja text the tokenizer carries (`tokenizer.chat_template`:
the model's own, or our ChatML below for a tokenizer without one), rendered by transformers exactly
as every other tool renders it. The trained tokens are found from the template itself, by rendering
prefixes: an assistant turn's targets are the characters the template adds between the prompt for
that turn (`add_generation_prompt=True`) and the conversation through that turn, less trailing
whitespace. For ChatML that is the turn's content (or tool calls) and its `<|im_end|>`; for
Llama-3 the content and `<|eot_id|>`. A template whose renders are not prefixes of one another
(its assistant spans cannot be found) is refused, never trained on a guessed mask.

Message text can never become a special token: special-token strings inside any message, tool
definition or tool-call argument are tokenized as plain text; only the template's own markers are
special.

The tokenizer's own special tokens (what transformers' `tokenizer(text)` puts around a text: a BOS for
Llama-3, Gemma and Mistral, nothing for ours) are kept, exactly once: raw text (pretraining documents,
raw prompts) carries them, and a chat render starts with the tokenizer's BOS (the template's own when
it writes one, else the tokenizer's).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

from bumblecore.chat.chatml import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START

# Stand-ins for special-token strings found in message text while it is rendered: private-use
# code points of plane 15, which no tokenizer maps to a special token.
_PLACEHOLDER_BASE = 0xF0000
_SOURCE_FINGERPRINT = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


class ChatFormatError(ValueError):
    """A conversation the chat template cannot render, or render with findable assistant turns."""


class ChatFormat:
    """Render and tokenize conversations with one tokenizer's chat template."""

    def __init__(self, tokenizer):
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one is the chat format
            template = template.get("default")
        if not template:
            raise ChatFormatError(f"tokenizer {tokenizer.name_or_path or ''} has no chat template")
        self.tokenizer = tokenizer
        self.template = template
        self.supports_tools = "tools" in template
        self.markers = sorted(
            {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True
        )
        self._marker_ids = {m: tokenizer.convert_tokens_to_ids(m) for m in self.markers}
        self._to_placeholder = {m: chr(_PLACEHOLDER_BASE + i) for i, m in enumerate(self.markers)}
        self._from_placeholder = {p: m for m, p in self._to_placeholder.items()}
        self._marker_pattern = re.compile("|".join(re.escape(m) for m in self.markers)) if self.markers else None
        self._placeholder_pattern = re.compile("[" + "".join(self._from_placeholder) + "]") if self.markers else None
        self.bos_ids = special_tokens_added(tokenizer)[0]  # what a render starts with, unless the template writes a BOS
        self.end_of_turn = self._find_end_of_turn()

    # ------------------------------------------------------------------ identity

    @property
    def fingerprint(self) -> str:
        """Changes whenever the tokens could: the template text, the BOS the tokenizer adds and this
        module's own code."""
        return hashlib.sha256(f"{_SOURCE_FINGERPRINT}|{self.bos_ids}|{self.template}".encode()).hexdigest()

    @property
    def is_chatml(self) -> bool:
        return self.template == CHAT_TEMPLATE

    # ------------------------------------------------------------------ rendering

    def _escape(self, value):
        """`value` with every special-token string in its text replaced by a placeholder."""
        if isinstance(value, str):
            return (
                self._marker_pattern.sub(lambda m: self._to_placeholder[m.group(0)], value)
                if self._marker_pattern
                else value
            )
        if isinstance(value, dict):
            return {k: self._escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._escape(v) for v in value]
        return value

    @staticmethod
    def _standard(messages: list[dict]) -> list[dict]:
        """Tool calls in the shape transformers' templates read ({"type": "function", "function":
        {"name", "arguments"}}); our records may hold the bare {"name", "arguments"}."""
        if not any(m.get("tool_calls") for m in messages):
            return messages
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [c if "function" in c else {"type": "function", "function": c} for c in m["tool_calls"]]
                m = {**m, "tool_calls": calls}
            out.append(m)
        return out

    def _unescape(self, text: str) -> str:
        return (
            self._placeholder_pattern.sub(lambda m: self._from_placeholder[m.group(0)], text)
            if self._placeholder_pattern
            else text
        )

    def _render(self, messages: list[dict], tools, add_generation_prompt: bool) -> str:
        if tools and not self.supports_tools:
            raise ChatFormatError(
                "this model's chat template does not render tools; drop `tools` or choose a template that has them "
                "(chat_template: chatml or qwen2.5)"
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as err:  # the template's own raise_exception, or a Jinja error
            raise ChatFormatError(f"the chat template cannot render this conversation: {err}") from err

    def _trained_spans(self, messages: list[dict], tools, full: str, train: str) -> list[tuple[int, int]]:
        """Character spans of `full` (the escaped conversation's render) that are trained: every
        assistant turn ("all") or only the last ("last"), each from its prompt to its end-of-turn."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        turns = turns[-1:] if train == "last" else turns
        spans = []
        for i in turns:
            prompt = self._render(messages[:i], tools, add_generation_prompt=True)
            through = (
                full if i == len(messages) - 1 else self._render(messages[: i + 1], tools, add_generation_prompt=False)
            )
            if not (through.startswith(prompt) and full.startswith(through)):
                raise ChatFormatError(
                    f"the chat template's assistant turn {i} cannot be found: rendering the conversation up to it does not "
                    "extend the prompt for it (the template rewrites earlier turns); train with a template whose turns "
                    "render as prefixes, e.g. tokenizer_config.json's chat_template replaced by ChatML"
                )
            end = len(through.rstrip())
            content = messages[i].get("content") or ""
            if content.strip() and content.strip() not in through[len(prompt) : end]:
                raise ChatFormatError(
                    f"the chat template rewrites assistant turn {i}'s content; its trained tokens cannot be found"
                )
            if end > len(prompt):
                spans.append((len(prompt), end))
        return spans

    # ------------------------------------------------------------------ tokenizing

    def _split(self, text: str) -> list[tuple[str, bool]]:
        """(piece, is_marker): the template's special tokens apart from the text between them."""
        if not self._marker_pattern:
            return [(text, False)]
        pieces, position = [], 0
        for match in self._marker_pattern.finditer(text):
            if match.start() > position:
                pieces.append((text[position : match.start()], False))
            pieces.append((match.group(0), True))
            position = match.end()
        if position < len(text):
            pieces.append((text[position:], False))
        return pieces

    def tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) for rendered, escaped texts, in one batched tokenizer call.
        A text without placeholders is tokenized whole (exactly what apply_chat_template(tokenize=True)
        gives); one with placeholders is tokenized between the template's markers with special
        tokens off, so a special-token string typed in a message stays text. Either starts with the
        tokenizer's BOS (see _with_bos)."""
        results: list = [None] * len(texts)
        plain = [
            i for i, t in enumerate(texts) if not (self._placeholder_pattern and self._placeholder_pattern.search(t))
        ]
        if plain:
            batch = self.tokenizer([texts[i] for i in plain], add_special_tokens=False, return_offsets_mapping=True)
            for i, ids, offsets in zip(plain, batch["input_ids"], batch["offset_mapping"]):
                results[i] = (ids, [tuple(o) for o in offsets])
        for i in set(range(len(texts))) - set(plain):
            results[i] = self._tokenize_escaped(texts[i])
        return [self._with_bos(text, *result) for text, result in zip(texts, results)]

    def _with_bos(self, text: str, ids: list[int], offsets: list) -> tuple[list[int], list]:
        """A render starts with the tokenizer's BOS exactly once: the template's own when it writes one
        (Llama-3's `{{ bos_token }}`), else the one the tokenizer adds to any text (ChatML on a tokenizer
        that adds a BOS); a model reads every sequence after it. It covers no character, so it is never
        a target."""
        bos = self.tokenizer.bos_token
        if not self.bos_ids or ids[: len(self.bos_ids)] == self.bos_ids or (bos and text.startswith(bos)):
            return ids, offsets
        return self.bos_ids + ids, [(0, 0)] * len(self.bos_ids) + offsets

    def _tokenize_escaped(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets, position = [], [], 0
        for piece, is_marker in self._split(text):
            if is_marker:
                ids.append(self._marker_ids[piece])
                offsets.append((position, position + len(piece)))
            else:
                # restored text, and for each of its characters the position it has in `text`
                restored, where = [], []
                for j, char in enumerate(piece):
                    original = self._from_placeholder.get(char, char)
                    restored.append(original)
                    where.extend([position + j] * len(original))
                encoded = self.tokenizer(
                    "".join(restored), add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
                )
                ids.extend(encoded["input_ids"])
                for a, b in encoded["offset_mapping"]:
                    if b > a:
                        offsets.append((where[a], where[b - 1] + 1))
                    else:  # a token that covers no character (e.g. a prefix-space marker)
                        at = where[a] if a < len(where) else position + len(piece)
                        offsets.append((at, at))
            position += len(piece)
        return ids, offsets

    def prepare(
        self, messages: list[dict], tools: Optional[list] = None, train: str = "all"
    ) -> tuple[str, list[tuple[int, int]]]:
        """A conversation's rendered (escaped) text and its trained character spans: every assistant
        turn (train="all", SFT) or only the final reply (train="last", preference pairs)."""
        messages, tools = self._escape(self._standard(messages)), self._escape(tools)
        full = self._render(messages, tools, add_generation_prompt=False)
        return full, self._trained_spans(messages, tools, full, train)

    def encode_prepared(self, prepared: list[tuple[str, list[tuple[int, int]]]]) -> list[tuple[list[int], list[bool]]]:
        """(ids, target mask) for prepared conversations, tokenized in one batched call."""
        encoded = self.tokenize([text for text, _ in prepared])
        return [(ids, target_mask(offsets, spans)) for (ids, offsets), (_, spans) in zip(encoded, prepared)]

    def encode(
        self, messages: list[dict], tools: Optional[list] = None, train: str = "all"
    ) -> tuple[list[int], list[bool]]:
        return self.encode_prepared([self.prepare(messages, tools, train)])[0]

    def prompt_ids(
        self, messages: list[dict], tools: Optional[list] = None, add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of the prompt for the next assistant reply (what inference feeds the model); without the
        generation prompt, the conversation alone (the server's /tokenize may ask)."""
        text = self._render(self._escape(self._standard(messages)), self._escape(tools), add_generation_prompt)
        return self.tokenize([text])[0][0]

    # ------------------------------------------------------------------ end of turn

    def _find_end_of_turn(self) -> list[str]:
        """The special tokens the template closes an assistant turn with (ChatML: <|im_end|>,
        Llama-3: <|eot_id|>, Gemma: <end_of_turn>): the first marker after a probe reply."""
        probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        try:
            text = self._render(probe, None, add_generation_prompt=False)
        except ChatFormatError:
            return []
        after = text[text.rfind("pong") + len("pong") :] if "pong" in text else ""
        match = self._marker_pattern.search(after) if self._marker_pattern else None
        return [match.group(0)] if match else []

    def check_trainable(self, source) -> None:
        """Refuse, before anything is written, a format a model could not learn to end replies in."""
        if self.is_chatml and not {IM_START, IM_END} <= set(self.markers):
            raise ChatFormatError(
                f"{source}: the tokenizer has no chat template of its own and no {IM_START}/{IM_END} special tokens, so "
                "ChatML turns would be trained as plain text pieces and the model could not learn where a reply ends. "
                "Choose a template of its own tokens (chat_template: llama3, gemma ...), or add the ChatML tokens: "
                "chat_template: chatml with resize_vocab: true (or new_special_tokens, with resize_vocab: true where "
                "the model has no rows for them)"
            )
        if not self.end_of_turn:
            raise ChatFormatError(
                f"{source}: the chat template closes an assistant turn with no special token (after a reply it renders "
                "only text), so the model could not learn where a reply ends; use a template that ends turns with one"
            )

    @property
    def end_of_turn_ids(self) -> list[int]:
        return [self._marker_ids[m] for m in self.end_of_turn]


def chat_format(tokenizer) -> ChatFormat:
    """The tokenizer's ChatFormat, built once per tokenizer and template."""
    cached = getattr(tokenizer, "_bumblecore_chat_format", None)
    template = getattr(tokenizer, "chat_template", None)
    if cached is None or cached.template != (template.get("default") if isinstance(template, dict) else template):
        cached = ChatFormat(tokenizer)
        tokenizer._bumblecore_chat_format = cached
    return cached


def target_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token (by its character offsets), whether it overlaps a trained span."""
    mask, span_index = [], 0
    for start, end in offsets:
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        mask.append(span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0])
    return mask


# ---------------------------------------------------------------------- the functions the stages use


def encode_conversation(tokenizer, messages: list[dict], tools: Optional[list] = None) -> tuple[list[int], list[bool]]:
    """A whole training conversation: ids and target mask (every assistant turn trained)."""
    return chat_format(tokenizer).encode(messages, tools, train="all")


def encode_preference(
    tokenizer, messages: list[dict], reply: dict, tools: Optional[list] = None
) -> tuple[list[int], list[bool]]:
    """Prompt history plus one candidate reply; only the reply is trained (earlier assistant turns are context)."""
    return chat_format(tokenizer).encode(messages + [reply], tools, train="last")


def render_prompt(
    tokenizer, messages: list[dict], tools: Optional[list] = None, add_generation_prompt: bool = True
) -> list[int]:
    """Ids of a prompt for generation (ChatML: ending with `<|im_start|>assistant\\n`), shared with inference."""
    return chat_format(tokenizer).prompt_ids(messages, tools, add_generation_prompt)


def special_tokens_added(tokenizer) -> tuple[list[int], list[int]]:
    """(before, after): the ids the tokenizer itself puts around any text, as transformers'
    `tokenizer(text)` does (a BOS for Llama-3, Gemma, Mistral; BOS and EOS for some; nothing for
    ours). Found by tokenizing a probe with and without them, so a post-processor and `add_bos_token`
    are both seen as they are."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(
        f"tokenizer {tokenizer.name_or_path or ''}: cannot tell which special tokens it adds to a text "
        f"({plain} without them, {full} with them)"
    )


def encode_texts(tokenizer, texts: list[str], split_special_tokens: Optional[bool] = None) -> list[list[int]]:
    """Raw texts, each after the special tokens the tokenizer puts before any text (its BOS where it adds
    one), exactly once: a text that already starts with that token's string gets no second one.
    `split_special_tokens=True`: special-token strings elsewhere in the text stay text (None: the
    tokenizer's own setting)."""
    before, _ = special_tokens_added(tokenizer)
    lead = "".join(tokenizer.convert_ids_to_tokens(before))
    if lead:
        texts = [text[len(lead) :] if text.startswith(lead) else text for text in texts]
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
    return [before + ids for ids in encoded]


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Pretraining documents, each with the special tokens the tokenizer puts around a text and then the
    end-of-text token, never twice (the tokenizer's own EOS, or one the text ends with, ends it
    already); every token is a target."""
    _, after = special_tokens_added(tokenizer)
    tail = "".join(tokenizer.convert_ids_to_tokens(after))
    if tail:  # a text that ends with the string of what the tokenizer appends has it once
        texts = [text[: -len(tail)] if text.endswith(tail) else text for text in texts]
    eot = end_of_text_id(tokenizer)
    documents = []
    for ids in encode_texts(tokenizer, texts):
        ids = ids + after
        ended = (bool(after) and after[-1] == tokenizer.eos_token_id) or (bool(ids) and ids[-1] == eot)
        documents.append(ids if ended else ids + [eot])
    return documents


def encode_document(tokenizer, text: str) -> list[int]:
    return encode_documents(tokenizer, [text])[0]


def encode_raw_prompt(tokenizer, text: str) -> list[int]:
    """A raw-text prompt for a base model to continue: it starts as a document does (the tokenizer's BOS)
    but never ends with the tokenizer's EOS (the model would start a new document); special-token
    strings typed in it stay text."""
    return encode_texts(tokenizer, [text], split_special_tokens=True)[0]


def end_of_text_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    if token_id is None or token_id == tokenizer.unk_token_id:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither <|endoftext|> nor an eos token to end documents with")
        return tokenizer.eos_token_id
    return token_id


# ---------------------------------------------------------------------- tool calls in replies

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def parse_tool_call(block: str) -> Optional[dict]:
    """One `<tool_call>` block's JSON ({"name", "arguments"}) as an OpenAI function call, or None
    when it is not a well-formed call (then the text is kept as content)."""
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return {
        "name": call["name"],
        "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
    }
