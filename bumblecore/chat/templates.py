"""Chat templates by name (`chat_template: llama3`) or from a `.jinja` file, and the special tokens a
base tokenizer needs for one (`new_special_tokens`, `resize_vocab`).

Each built-in is written here from its family's published format, in the shape our mask rule needs
(chat/format.py): the render of a conversation through an assistant turn extends the prompt for that
turn, and the turn ends with a special token. None rewrites earlier turns (no "last turn only" system
text, no stripped reasoning), so every one passes ChatFormat's prefix check.

| name    | a turn                                                                  | ends a reply     |
|---------|-------------------------------------------------------------------------|------------------|
| chatml  | `<|im_start|>role\\n content<|im_end|>\\n`, tools as Qwen2.5 (our default) | `<|im_end|>`     |
| qwen2.5 | chatml with Qwen2.5's default system message                            | `<|im_end|>`     |
| llama3  | `<|start_header_id|>role<|end_header_id|>\\n\\n content<|eot_id|>`        | `<|eot_id|>`     |
| mistral | `[INST] user [/INST] reply</s>`, system merged into the first user turn | the eos token    |
| gemma   | `<start_of_turn>user|model\\n content<end_of_turn>\\n`, system folded in  | `<end_of_turn>`  |
| phi3    | `<|user|>\\n content<|end|>\\n`                                          | `<|end|>`        |

llama3, mistral and gemma start with the tokenizer's `bos_token`. Only chatml and qwen2.5 render
tools; the others refuse tool messages (raise_exception), as do mistral and gemma a role order other
than user/assistant alternating.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from bumblecore.chat.chatml import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, IM_END, IM_START

QWEN_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_BOS = "{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}"
_NO_TOOL_MESSAGES = (
    "{%- if message['role'] not in ['system', 'user', 'assistant'] or message.get('tool_calls') -%}"
    "{{- raise_exception('this template renders system, user and assistant messages only (no tool calls)') -}}"
    "{%- endif -%}"
)
# The system message (if first) apart from the turns that alternate user, assistant, user ...
_SPLIT_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] -%}{%- set body = messages[1:] -%}"
    "{%- else -%}{%- set system_text = '' -%}{%- set body = messages -%}{%- endif -%}"
)
_ALTERNATE = (
    "{%- if message['role'] not in ['user', 'assistant'] or (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... after an optional system message') -}}"
    "{%- endif -%}"
)

LLAMA3 = (
    _BOS + "{%- for message in messages -%}" + _NO_TOOL_MESSAGES + "{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

MISTRAL = (
    _SPLIT_SYSTEM + _BOS + "{%- for message in body -%}" + _ALTERNATE + "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_text -%}{{- '[INST] ' + system_text + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

GEMMA = (
    _SPLIT_SYSTEM + _BOS + "{%- for message in body -%}" + _ALTERNATE + "{%- set role = 'model' if "
    "message['role'] == 'assistant' else 'user' -%}"
    "{%- set prefix = system_text + '\\n\\n' if loop.first and system_text else '' -%}"
    "{{- '<start_of_turn>' + role + '\\n' + prefix + message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

PHI3 = (
    "{%- for message in messages -%}" + _NO_TOOL_MESSAGES + "{{- '<|' + message['role'] + '|>\\n' + "
    "message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_DEFAULT_SYSTEM_LINE = "{%- set default_system = '" + DEFAULT_SYSTEM_PROMPT + "' -%}"
assert _DEFAULT_SYSTEM_LINE in CHAT_TEMPLATE
QWEN25 = CHAT_TEMPLATE.replace(_DEFAULT_SYSTEM_LINE, "{%- set default_system = '" + QWEN_SYSTEM_PROMPT + "' -%}")

BUILT_IN = {
    "chatml": CHAT_TEMPLATE,
    "qwen2.5": QWEN25,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "phi3": PHI3,
}
# The special tokens each built-in writes itself (beside the tokenizer's own bos/eos tokens).
MARKERS = {
    "chatml": [IM_START, IM_END],
    "qwen2.5": [IM_START, IM_END],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": [],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}


def read_chat_template(value: str) -> tuple[Optional[str], str]:
    """(built-in name or None, Jinja text) for the `chat_template` key: a built-in name or a .jinja file."""
    if value in BUILT_IN:
        return value, BUILT_IN[value]
    path = Path(value)
    if path.suffix == ".jinja" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"chat_template {value}: no such file")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"chat_template {value}: the file is empty")
        return None, text
    raise ValueError(f"chat_template {value!r} is not one of {', '.join(BUILT_IN)} nor a .jinja file")


def parse_special_tokens(value: Union[None, str, list[str]]) -> list[str]:
    """`new_special_tokens` as a list: a YAML list, or LLaMA-Factory's comma-separated string."""
    if not value:
        return []
    # a flag's "<a>,<b>" may arrive as a one-item list: every item is split on commas
    items = [value] if isinstance(value, str) else list(value)
    tokens = [t.strip() for item in items for t in str(item).split(",")]
    if any(not t for t in tokens):
        raise ValueError(f"new_special_tokens {value!r} has an empty token")
    return list(dict.fromkeys(tokens))


def _special_strings(tokenizer) -> set[str]:
    return {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}


def set_chat_template(tokenizer, value: Optional[str]) -> Optional[str]:
    """Give the tokenizer the chosen template (None: keep its own, ChatML where it had none); returns the
    built-in's name."""
    if not value:
        return None
    name, text = read_chat_template(value)
    tokenizer.chat_template = text
    return name


def use_chat_template(tokenizer, value: Optional[str], source: str = "the model") -> None:
    """Inference (generate, chat, serve): the chosen template for prompts, refused where the tokenizer
    lacks its markers (the model never learned them as tokens; train with resize_vocab to add them)."""
    missing = missing_markers(tokenizer, set_chat_template(tokenizer, value))
    if missing:
        raise ValueError(
            f"chat_template {value}: {source}'s tokenizer has no {', '.join(missing)} special tokens; use its own "
            "template (leave chat_template out), or fine-tune with this one and resize_vocab: true"
        )


def missing_markers(tokenizer, name: Optional[str]) -> list[str]:
    """The built-in's special tokens the tokenizer does not have as special tokens."""
    if name is None:
        return []
    have = _special_strings(tokenizer)
    needed = list(MARKERS[name])
    if name == "mistral" and tokenizer.eos_token is None:
        needed.append("</s>")  # mistral closes a reply with the eos token
    return [m for m in needed if m not in have]


def prepare_tokenizer(
    tokenizer,
    chat_template: Optional[str] = None,
    new_special_tokens: Union[None, str, list[str]] = None,
    resize_vocab: bool = False,
    source: str = "model_name_or_path",
    chat: bool = True,
) -> list[str]:
    """Apply the run's `chat_template`, `new_special_tokens` and `resize_vocab` to its tokenizer, in
    place, before anything is tokenized. Returns the tokens added to the vocabulary (their ids are the
    embedding rows to grow and train).

    With resize_vocab, a built-in template's markers that the tokenizer lacks are added too. For a
    chat run (`chat`), the template's end-of-turn token becomes the tokenizer's eos token (what ends
    a reply is what generation stops on), the old eos staying an end in generation_config.json."""
    name = set_chat_template(tokenizer, chat_template)
    if name is None and resize_vocab and tokenizer.chat_template == CHAT_TEMPLATE:
        name = "chatml"  # a tokenizer without a template of its own trains ChatML: add its markers too
    wanted = parse_special_tokens(new_special_tokens)
    missing = missing_markers(tokenizer, name)
    if missing and chat and not resize_vocab and not set(missing) <= set(wanted):
        raise ValueError(
            f"{source}: chat_template {chat_template} writes {', '.join(missing)}, which the tokenizer lacks as "
            "special tokens (they would be trained as plain text pieces). Set resize_vocab: true to add them "
            "(with new embedding rows), or choose a template of this tokenizer's own tokens"
        )
    if resize_vocab and chat:
        wanted += [m for m in missing if m not in wanted]
    added = []
    if wanted:
        from tokenizers import AddedToken

        before = len(tokenizer)
        vocab = tokenizer.get_vocab()
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in wanted], special_tokens=True)
        added = [t for t in wanted if t not in vocab]
        assert len(tokenizer) == before + len(added), "the tokenizer did not add every new token"
        if name == "mistral" and tokenizer.eos_token is None:
            tokenizer.eos_token = "</s>"
    if chat and name:
        from bumblecore.chat.format import chat_format

        end = chat_format(tokenizer).end_of_turn
        if end and tokenizer.eos_token != end[0]:
            # the old eos stays a stop token in generation_config.json (write_end_of_turn)
            tokenizer.bumblecore_previous_eos_id = tokenizer.eos_token_id
            tokenizer.eos_token = end[0]
    return added


def added_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def write_end_of_turn(directory, tokenizer, base_dir) -> None:
    """generation_config.json in `directory` (a saved model or adapter) lists the tokenizer's eos and the
    template's end-of-turn token among its eos_token_id, so every generator stops where a reply ends.
    Starts from the file already there, else the base model's; written only where that changes it."""
    import json
    import os

    from bumblecore.chat.format import ChatFormatError, chat_format

    try:
        end_of_turn = chat_format(tokenizer).end_of_turn_ids
    except ChatFormatError:
        return
    file = Path(directory) / "generation_config.json"
    source = file if file.is_file() else Path(base_dir) / "generation_config.json"
    existing = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    eos = existing.get("eos_token_id")
    before = [eos] if isinstance(eos, int) else list(eos or [])
    stops = [getattr(tokenizer, "bumblecore_previous_eos_id", None), tokenizer.eos_token_id, *end_of_turn]
    ids = before + [i for i in dict.fromkeys(stops) if i is not None and i not in before]
    if ids == before:
        return
    existing["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(existing, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, file)
