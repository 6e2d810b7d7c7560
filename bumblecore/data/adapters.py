"""One adapter per data format (docs/DATA_FORMAT.md), in the table ADAPTERS: a record of that format,
validated, as a normalised Sample. Every error names the record's place and the field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Optional

from bumblecore.data.conversations import (
    ASSISTANT_SIDE,
    Conversation,
    alpaca_conversation,
    assistant_reply,
    message_list,
    messages_conversation,
    parse_function_call,
    parse_tools,
    sharegpt_conversation,
    string_field,
    trl_preference,
)
from bumblecore.data.sources import DataError


@dataclass
class Sample:
    """One record (or one of KTO's examples), validated and normalised: what chat/format.py renders."""

    kind: str  # "text", "conversation", "preference" or "labelled" (a completion labelled desirable or not)
    text: str = ""
    conversation: Optional[Conversation] = None
    chosen: Optional[dict] = None  # the preferred final assistant message
    rejected: Optional[dict] = None
    where: str = ""
    # kto: the prompt (conversation) with its completion, labelled desirable or not, and the completion
    # of the next record (the KL row: a mismatched prompt/completion pair, see kto_examples)
    completion: Optional[dict] = None
    desirable: Optional[bool] = None
    kl_completion: Optional[dict] = None
    margin: object = None  # a preference record's `margin` field as written (the rm stage reads it)
    file_index: int = 0  # which of the dataset's files (data_files order) it comes from


Adapter = Callable[[dict, str], Sample]  # (record, where) -> its sample


def text_sample(record: dict, where: str) -> Sample:
    """Pretraining text: the `text` field, all of it trained."""
    return Sample("text", text=string_field(record, "text", where), where=where)


def conversation_adapter(read: Callable[[dict, str], Conversation]) -> Adapter:
    """A conversation format's adapter: `read` validates the record into one conversation."""

    def adapter(record: dict, where: str) -> Sample:
        return Sample("conversation", conversation=read(record, where), where=where)

    return adapter


# ---------------------------------------------------------------------------- preference pairs


def preference_adapter(read_prompt: Callable[[dict, str], Conversation]) -> Adapter:
    """Alpaca's and ShareGPT's preference records: the prompt (`read_prompt`), then the `chosen` and the
    `rejected` reply."""

    def adapter(record: dict, where: str) -> Sample:
        prompt = read_prompt(record, where)
        return Sample(
            "preference",
            conversation=prompt,
            chosen=_preference_reply(record, "chosen", where),
            rejected=_preference_reply(record, "rejected", where),
            where=where,
            margin=record.get("margin"),
        )

    return adapter


def trl_preference_sample(record: dict, where: str) -> Sample:
    """TRL's preference records: `prompt` with `chosen` / `rejected` messages, or two whole conversations."""
    prompt, chosen, rejected = trl_preference(record, where)
    return Sample(
        "preference", conversation=prompt, chosen=chosen, rejected=rejected, where=where, margin=record.get("margin")
    )


def _preference_reply(record: dict, key: str, where: str) -> dict:
    value = record.get(key)
    if isinstance(value, dict):
        if value.get("from", "gpt") not in ASSISTANT_SIDE or not isinstance(value.get("value"), str):
            raise DataError(f'{where}: field "{key}" must be {{"from": "gpt", "value": "..."}}')
        text = value["value"]
        if value.get("from") == "function_call":
            return {"role": "assistant", "content": "", "tool_calls": parse_function_call(text, where, 0, key)}
    elif isinstance(value, str):
        text = value
    else:
        raise DataError(
            f'{where}: missing field "{key}"' if value is None else f'{where}: field "{key}" must be a string'
        )
    if not text.strip():
        raise DataError(f'{where}: field "{key}" is empty')
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------- labelled completions
# KTO reads every conversation format with a boolean `label` (its own name for it) as one labelled
# completion: its prompt (a conversation), the completion (an assistant message) and whether it is
# desirable. The stage reads a detected format as its labelled variant (data/formats.py).
LABELLED_FORMATS = {"alpaca": "kto_alpaca", "sharegpt": "kto_sharegpt", "messages": "kto_messages"}


def labelled_adapter(prompt_and_completion: Callable[[dict, str], tuple[Conversation, dict]]) -> Adapter:
    """A labelled format's adapter: the label first, then the prompt and the completion it labels."""

    def adapter(record: dict, where: str) -> Sample:
        desirable = _label(record, where)
        prompt, completion = prompt_and_completion(record, where)
        return Sample("labelled", conversation=prompt, completion=completion, desirable=desirable, where=where)

    return adapter


def _label(record: dict, where: str) -> bool:
    if record.get("label") is None:
        raise DataError(f'{where}: missing field "label" (true: a desirable completion, false: an undesirable one)')
    if not isinstance(record["label"], bool):
        raise DataError(f'{where}: field "label" must be true or false, got {type(record["label"]).__name__}')
    return record["label"]


def alpaca_completion(record: dict, where: str) -> tuple[Conversation, dict]:
    """Alpaca's prompt, and `output` (or `completion`) as its completion."""
    key = "output" if "output" in record or "completion" not in record else "completion"
    if key not in record:
        raise DataError(f'{where}: missing field "output" (or "completion")')
    prompt = alpaca_conversation(record, where, with_answer=False)
    return prompt, {"role": "assistant", "content": string_field(record, key, where)}


def last_message_completion(read: Callable[[dict, str], Conversation]) -> Callable[[dict, str], tuple]:
    """ShareGPT's and `messages`' prompt and completion: the conversation up to its last message, and that."""

    def split(record: dict, where: str) -> tuple[Conversation, dict]:
        whole = read(record, where)
        return Conversation(whole.messages[:-1], whole.tools), whole.messages[-1]

    return split


def prompt_completion(record: dict, where: str) -> tuple[Conversation, dict]:
    """TRL's unpaired records: `prompt` and `completion`, each a string or a list of messages."""
    if isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": string_field(record, "prompt", where)}]
    else:
        messages = message_list(record.get("prompt"), where, "prompt", end="prompt")
    prompt = Conversation(messages, parse_tools(record.get("tools"), where))
    if isinstance(record.get("completion"), str):
        completion = {"role": "assistant", "content": string_field(record, "completion", where)}
    else:
        completion = assistant_reply(record.get("completion"), where, "completion")
    return prompt, completion


# ---------------------------------------------------------------------------- the table

# format -> its adapter; the format names are detect_format's (data/detect.py) and LABELLED_FORMATS'
ADAPTERS: dict[str, Adapter] = {
    "text": text_sample,
    "alpaca": conversation_adapter(alpaca_conversation),
    "sharegpt": conversation_adapter(sharegpt_conversation),
    "messages": conversation_adapter(messages_conversation),
    "preference_alpaca": preference_adapter(partial(alpaca_conversation, with_answer=False)),
    "preference_sharegpt": preference_adapter(partial(sharegpt_conversation, end_on_assistant=False)),
    "preference_messages": trl_preference_sample,
    "kto_alpaca": labelled_adapter(alpaca_completion),
    "kto_sharegpt": labelled_adapter(last_message_completion(sharegpt_conversation)),
    "kto_messages": labelled_adapter(last_message_completion(messages_conversation)),
    "unpaired_prompt": labelled_adapter(prompt_completion),
}


def record_to_sample(record: object, fmt: str, where: str) -> Sample:
    """Validate one record of a known format; raises DataError naming where and which field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt not in ADAPTERS:
        raise DataError(f"unknown format {fmt!r}")
    return ADAPTERS[fmt](record, where)
