"""Read the original's data formats (docs/DATA_FORMAT.md) and turn each record into a normalised sample.

Files are JSON arrays or JSONL, told apart by their first character, streamed record by record.
The format is detected from the first record's fields. Every error names the file, the record's
place (`line N` for JSONL, `record N` for a JSON array, 1-based) and the field.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

FORMATS = (
    "pretrain",
    "alpaca",
    "sharegpt",
    "messages",
    "preference_alpaca",
    "preference_sharegpt",
    "preference_messages",
    "unpaired_prompt",
)
# KTO reads every conversation format with a boolean `label` (its own name for it), and splits each
# preference pair into a desirable and an undesirable example.
KTO_FORMATS = {"alpaca": "kto_alpaca", "sharegpt": "kto_sharegpt", "messages": "kto_messages"}
USER_SIDE = ("human", "observation")
ASSISTANT_SIDE = ("gpt", "function_call")
SHAREGPT_ROLES = ("system",) + USER_SIDE + ASSISTANT_SIDE
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A record that cannot be used; the message says where and why."""


@dataclass
class Conversation:
    """Messages in the OpenAI/transformers shape: role system|user|assistant|tool, content,
    and for an assistant calling tools `tool_calls` [{"name", "arguments"}]."""

    messages: list[dict]
    tools: Optional[list] = None


@dataclass
class Sample:
    kind: str  # "text", "conversation", "preference" or "kto"
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
    file_index: int = 0  # which of the dataset's files (data_files order) it comes from


@dataclass
class ReadReport:
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)  # "<file>: why it holds no record"


# ---------------------------------------------------------------------------- files


def data_files(paths: Union[str, list[str]]) -> list[Path]:
    """Expand files, globs and directories (their .json/.jsonl files, sorted) into a list of files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
            if not found:
                raise DataError(f"{path}: directory holds no .json or .jsonl files")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in str(entry) for c in "*?["):  # a glob: its files, sorted (** reaches into folders)
            found = sorted(Path(p) for p in glob.glob(str(entry), recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"dataset glob {entry} matches no file")
            files += found
        else:
            raise FileNotFoundError(f"dataset file {path} does not exist")
    if not files:
        raise DataError("no dataset files given (dataset_path is empty)")
    return files


UTF8_BOM = b"\xef\xbb\xbf"


def iter_json_records(file: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a JSON array or JSONL file, without loading the file whole.
    A JSONL line that is not JSON (or not UTF-8) comes as a DataError in place of the record."""
    with open(file, "rb") as handle:
        head = handle.read(1 << 16).lstrip(UTF8_BOM).lstrip()
        while not head and handle.read(1):  # a long run of leading whitespace
            handle.seek(handle.tell() - 1)
            head = handle.read(1 << 16).lstrip()
        handle.seek(0)
        if head[:1] == b"[":
            yield from _iter_json_array(file, _Utf8Reader(file, handle))
            return
        for number, raw in enumerate(handle, 1):
            if number == 1:
                raw = raw[len(UTF8_BOM) :] if raw.startswith(UTF8_BOM) else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                # Handed on, not raised: like a broken line, one bad record that skip_bad_records may skip.
                yield (
                    f"{file} line {number}",
                    DataError(
                        f"{file} line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                        "save the file as UTF-8"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                # Handed on, not raised: a broken line is one bad record, which skip_bad_records may skip.
                record = DataError(f"{file} line {number}: not valid JSON ({err.msg} at column {err.colno})")
            yield f"{file} line {number}", record


class _Utf8Reader:
    """read(n) -> str over a binary file, decoding UTF-8 as it goes; bytes that are not UTF-8 raise a
    DataError naming the file, the line and the byte (a JSON array cannot skip past them)."""

    def __init__(self, file: Path, handle):
        import codecs

        self.file, self.handle = file, handle
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.lines_before = 0  # newlines in the bytes decoded so far
        self.offset = 0  # bytes read so far
        self.first = True

    def read(self, size: int) -> str:
        data = self.handle.read(size)
        if self.first:
            data, self.first = (data[len(UTF8_BOM) :] if data.startswith(UTF8_BOM) else data), False
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            pending = len(err.object) - len(data)  # bytes the decoder held back from the previous read
            position = err.start - pending
            line = self.lines_before + data[: max(0, position)].count(b"\n") + 1
            bad = err.object[err.start] if err.start < len(err.object) else 0
            raise DataError(
                f"{self.file} line {line}: not UTF-8 text (byte 0x{bad:02x} at byte "
                f"{self.offset + position} of the file); save the file as UTF-8"
            ) from None
        self.lines_before += data.count(b"\n")
        self.offset += len(data)
        return text


def _iter_json_array(file: Path, handle, chunk_size: int = 1 << 20) -> Iterator[tuple[str, object]]:
    """Stream the elements of a top-level JSON array with raw_decode over a sliding buffer."""
    decoder = json.JSONDecoder()
    buffer, position, number, finished = handle.read(chunk_size), 0, 0, False
    position = buffer.index("[") + 1
    while True:
        while True:  # skip whitespace and commas between elements
            while position < len(buffer) and (buffer[position].isspace() or buffer[position] == ","):
                position += 1
            if position < len(buffer) or finished:
                break
            more = handle.read(chunk_size)
            finished = not more
            buffer, position = buffer[position:] + more, 0
        if position >= len(buffer):
            raise DataError(f"{file}: JSON array is not closed (file truncated?) after record {number}")
        if buffer[position] == "]":
            return
        try:
            record, end = decoder.raw_decode(buffer, position)
        except json.JSONDecodeError as err:
            if not finished:  # maybe the element continues in the next chunk
                more = handle.read(chunk_size)
                finished = not more
                buffer, position = buffer[position:] + more, 0
                continue
            raise DataError(f"{file} record {number + 1}: not valid JSON ({err.msg})") from None
        number += 1
        yield f"{file} record {number}", record
        buffer, position = buffer[end:], 0
        if len(buffer) < chunk_size // 2 and not finished:
            more = handle.read(chunk_size)
            finished = not more
            buffer += more


# ---------------------------------------------------------------------------- detection


def detect_format(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "conversations" in keys:
        return "preference_sharegpt" if {"chosen", "rejected"} <= keys else "sharegpt"
    if "instruction" in keys:
        return "preference_alpaca" if {"chosen", "rejected"} <= keys else "alpaca"
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys:
        return "preference_messages"  # TRL's: `prompt` + replies, or two whole conversations
    if {"prompt", "completion"} <= keys:
        return "unpaired_prompt"  # TRL's unpaired (KTO) records: `prompt`, `completion`, `label`
    if "text" in keys:
        return "pretrain"
    raise DataError(
        f"{where}: cannot tell the format from fields {sorted(keys)}; expected 'text' (pretraining), "
        "'instruction'/'output' (Alpaca), 'conversations' (ShareGPT), 'messages' (OpenAI-style), with 'chosen'/'rejected' "
        "for preference data ('prompt'/'chosen'/'rejected' message lists as TRL writes them), 'prompt'/'completion'/"
        "'label' for KTO"
    )


STAGE_FORMATS = {
    "pretrain": ("pretrain",),
    "continue_pretrain": ("pretrain",),
    "sft": ("alpaca", "sharegpt", "messages", "pretrain"),  # text: all trained, e.g. replay in a mixture
    "dpo": ("preference_alpaca", "preference_sharegpt", "preference_messages"),
    "kto": (
        *KTO_FORMATS.values(),
        "unpaired_prompt",
        "preference_alpaca",
        "preference_sharegpt",
        "preference_messages",
    ),
}


# ---------------------------------------------------------------------------- validation


def _string(record: dict, key: str, where: str, required: bool = True, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        if required:
            raise DataError(f'{where}: missing field "{key}"')
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" must be a string, got {type(value).__name__}')
    if required and not allow_empty and not value.strip():
        raise DataError(f'{where}: field "{key}" is empty')
    return value


def parse_tools(value, where: str) -> Optional[list]:
    """`tools` as a JSON string or a list; "", "[]" or [] mean none. Bare function definitions
    ({"name", "description", "parameters"}) are wrapped as {"type": "function", "function": ...}."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f'{where}: field "tools" is not valid JSON ({err.msg})') from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f'{where}: field "tools" must be a list of tool definitions (objects)')
    if not value:
        return None
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


CALL_KEYS = {"name", "arguments", "id", "type"}  # an id or "type": "function" says nothing the template renders


def tool_call(call: object, place: str) -> dict:
    """One call, {"name", "arguments"} or OpenAI's {"type": "function", "function": {...}}, as
    {"name", "arguments"} with JSON-string arguments decoded (the template writes them as JSON)."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = {**call["function"], **{k: v for k, v in call.items() if k not in ("function", "type", "id")}}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"].strip():
        raise DataError(f'{place} needs a JSON object with "name" (a non-empty string) and "arguments"')
    extra = sorted(set(call) - CALL_KEYS)
    if extra:  # refused, not dropped: text beside a call is the assistant's content, a turn of its own
        raise DataError(f"{place} has fields {extra} besides name and arguments, which a tool call cannot hold")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # keep a non-JSON string as the model should produce it
    return {"name": call["name"], "arguments": arguments}


def parse_function_call(value: str, where: str, turn: int, key: str = "conversations") -> list[dict]:
    """A function_call turn's value: one call's JSON object, or a JSON list of calls made at once."""
    place = f'{where}: field "{key}" turn {turn} (function_call)' if turn else f'{where}: field "{key}" (function_call)'
    try:
        calls = json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{place} is not valid JSON ({err.msg})") from None
    if isinstance(calls, list):
        if not calls:
            raise DataError(f"{place} is an empty list of calls")
        return [tool_call(call, f"{place} call {i}") for i, call in enumerate(calls, 1)]
    return [tool_call(calls, place)]


def _system_message(text: str) -> list[dict]:
    return [{"role": "system", "content": text}] if text else []


def alpaca_conversation(record: dict, where: str, with_answer: bool = True) -> Conversation:
    instruction = _string(record, "instruction", where)
    extra = _string(record, "input", where, required=False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages = _system_message(_string(record, "system", where, required=False)) + [{"role": "user", "content": prompt}]
    if with_answer:
        messages.append({"role": "assistant", "content": _string(record, "output", where)})
    return Conversation(messages, parse_tools(record.get("tools"), where))


def sharegpt_conversation(record: dict, where: str, end_on_assistant: bool = True) -> Conversation:
    """Turns alternate between the user side and the assistant side, each side one turn or a run:
    consecutive `observation`s are the results of parallel calls (tool messages, which the template
    renders in one user turn); `function_call`s after a `gpt` turn, or after each other, join it as
    one assistant message with content and tool_calls, the way the template renders an assistant
    turn (its text, then its <tool_call> blocks)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: field "conversations" must be a non-empty list of turns')
    messages: list[dict] = []
    previous = None  # role of the previous non-system turn
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f'{where}: field "conversations" turn {number} must be an object with "from" and "value"')
        role, value = turn["from"], turn["value"]
        if role not in SHAREGPT_ROLES:
            raise DataError(
                f'{where}: field "conversations" turn {number} has role "{role}"; expected {", ".join(SHAREGPT_ROLES)}'
            )
        if not isinstance(value, str):
            raise DataError(f'{where}: field "conversations" turn {number} value must be a string')
        if role == "system":
            if number != 1:
                raise DataError(f'{where}: field "conversations" turn {number}: a system turn may only come first')
            messages.append({"role": "system", "content": value})
            continue
        user_turn = role in USER_SIDE
        same_side = previous is not None and (previous in USER_SIDE) == user_turn
        if (previous is None and not user_turn) or (same_side and user_turn and not previous == role == "observation"):
            side = (
                "user side (human, observation)"
                if previous is None or not user_turn
                else "assistant side (gpt, function_call)"
            )
            raise DataError(
                f'{where}: field "conversations" turn {number} has role "{role}" out of order; expected the {side}'
            )
        if same_side and not user_turn and role == "gpt":
            what = (
                "a function_call turn: text after a call needs the call's observation first (an assistant turn "
                "renders its text before its calls)"
                if previous == "function_call"
                else "another gpt turn"
            )
            raise DataError(f'{where}: field "conversations" turn {number} (gpt) follows {what}')
        if role in ASSISTANT_SIDE and not value.strip():
            raise DataError(f'{where}: field "conversations" turn {number} ({role}) is an empty assistant turn')
        if role == "human":
            messages.append({"role": "user", "content": value})
        elif role == "observation":
            messages.append({"role": "tool", "content": value})
        elif role == "gpt":
            messages.append({"role": "assistant", "content": value})
        elif same_side:  # calls joining the assistant message before them
            messages[-1].setdefault("tool_calls", []).extend(parse_function_call(value, where, number))
        else:
            messages.append(
                {"role": "assistant", "content": "", "tool_calls": parse_function_call(value, where, number)}
            )
        previous = role
    if previous is None or (previous in ASSISTANT_SIDE) != end_on_assistant:
        wanted = (
            "an assistant turn (gpt or function_call)" if end_on_assistant else "a user turn (human or observation)"
        )
        raise DataError(f'{where}: field "conversations" must end on {wanted}')
    return Conversation(messages, parse_tools(record.get("tools"), where))


def _message_text(content, place: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's), joined as the server joins them."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise DataError(f'{place} content must be a string or a list of text parts ({{"type": "text", "text": ...}})')


def _message(message: object, place: str) -> dict:
    """One OpenAI-style message as the template reads it: role, content, and tool_calls for an assistant."""
    if not isinstance(message, dict) or "role" not in message:
        raise DataError(f'{place} must be an object with "role" and "content"')
    role = message["role"]
    if role not in MESSAGE_ROLES:
        raise DataError(f'{place} has role "{role}"; expected {", ".join(MESSAGE_ROLES)}')
    if message.get("weight", 1) != 1:  # OpenAI's weight 0 asks for an untrained turn, which we cannot honour
        raise DataError(
            f'{place} has "weight": {message["weight"]!r}; every assistant message is trained (drop the '
            "message, or the field)"
        )
    content = _message_text(message.get("content"), place)
    parsed = {"role": role, "content": content}
    calls = message.get("tool_calls")
    if calls:
        if role != "assistant":
            raise DataError(f"{place} ({role}) has tool_calls; only an assistant message calls tools")
        if not isinstance(calls, list):
            raise DataError(f"{place} tool_calls must be a list of calls")
        parsed["tool_calls"] = [tool_call(c, f"{place} tool_calls {i}") for i, c in enumerate(calls, 1)]
    elif role == "assistant" and not content.strip():
        raise DataError(f"{place} is an empty assistant message")
    elif message.get("content") is None:
        raise DataError(f'{place} ({role}) is missing "content"')
    return parsed


def message_list(value, where: str, key: str, end: str = "assistant") -> list[dict]:
    """OpenAI-style messages of field `key`: a leading system message at most, then a user message;
    a tool message answers an assistant's tool_calls (several in a row for parallel calls); the list
    ends on an assistant message (end="assistant") or on a user or tool message (end="prompt")."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{where}: missing field "{key}"'
            if value is None
            else f'{where}: field "{key}" must be a non-empty list of messages'
        )
    messages: list[dict] = []
    for number, raw in enumerate(value, 1):
        place = f'{where}: field "{key}" message {number}'
        message = _message(raw, place)
        role, previous = message["role"], (messages[-1] if messages else None)
        if role == "system" and previous is not None:
            raise DataError(f"{place}: a system message may only come first")
        if role == "tool" and not (previous and (previous.get("tool_calls") or previous["role"] == "tool")):
            raise DataError(f"{place} (tool) must follow an assistant message with tool_calls, or another tool message")
        if role == "assistant" and not (previous and previous["role"] in ("user", "tool")):
            raise DataError(f"{place} (assistant) must follow a user or tool message")
        if role == "user" and previous and previous["role"] == "user":
            raise DataError(f"{place} (user) follows another user message; expected an assistant message between them")
        messages.append(message)
    last = messages[-1]["role"]
    if end == "assistant" and last != "assistant":
        raise DataError(f'{where}: field "{key}" must end on an assistant message')
    if end == "prompt" and last not in ("user", "tool"):
        raise DataError(f'{where}: field "{key}" must end on a user or tool message (the prompt for the replies)')
    return messages


def messages_conversation(record: dict, where: str) -> Conversation:
    return Conversation(
        message_list(record.get("messages"), where, "messages"), parse_tools(record.get("tools"), where)
    )


def trl_preference(record: dict, where: str) -> tuple[Conversation, dict, dict]:
    """TRL's conversational preference records: `prompt` (messages) with `chosen` / `rejected`
    each one assistant message, or, without `prompt`, two whole conversations that share all but
    their last (assistant) message."""
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(record.get(key), str):
            raise DataError(
                f'{where}: field "{key}" is a string; records of "prompt"/"chosen"/"rejected" take lists of '
                "messages (TRL's conversational form); for plain strings use "
                '{"instruction", "chosen", "rejected"}'
            )
    tools = parse_tools(record.get("tools"), where)
    if "prompt" in record:
        prompt = message_list(record["prompt"], where, "prompt", end="prompt")
        return (
            Conversation(prompt, tools),
            _reply(record.get("chosen"), where, "chosen"),
            _reply(record.get("rejected"), where, "rejected"),
        )
    chosen = message_list(record.get("chosen"), where, "chosen")
    rejected = message_list(record.get("rejected"), where, "rejected")
    if chosen[:-1] != rejected[:-1]:
        differ = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b) + 1
        raise DataError(
            f'{where}: fields "chosen" and "rejected" differ at message {differ}, before their last; without '
            '"prompt" they must be one conversation up to their last (assistant) message'
        )
    return Conversation(chosen[:-1], tools), chosen[-1], rejected[-1]


def _reply(value, where: str, key: str) -> dict:
    """`chosen` / `rejected` beside a `prompt`: a list of one assistant message (or that message)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{where}: missing field "{key}"'
            if value is None
            else f'{where}: field "{key}" must be a list holding one assistant message'
        )
    if len(value) != 1:
        raise DataError(
            f'{where}: field "{key}" holds {len(value)} messages; '
            + (
                "a completion is one assistant reply"
                if key == "completion"
                else "a preference pair compares one assistant reply"
            )
        )
    message = _message(value[0], f'{where}: field "{key}" message 1')
    if message["role"] != "assistant":
        raise DataError(f'{where}: field "{key}" message 1 has role "{message["role"]}"; expected assistant')
    return message


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


def _label(record: dict, where: str) -> bool:
    if record.get("label") is None:
        raise DataError(f'{where}: missing field "label" (true: a desirable completion, false: an undesirable one)')
    if not isinstance(record["label"], bool):
        raise DataError(f'{where}: field "label" must be true or false, got {type(record["label"]).__name__}')
    return record["label"]


def kto_record(record: dict, fmt: str, where: str) -> Sample:
    """One labelled completion: its prompt (a conversation), the completion (an assistant message) and
    whether it is desirable. Alpaca takes `output` or `completion`; ShareGPT and `messages` end on the
    completion; TRL's unpaired records give `prompt` and `completion` as strings or message lists."""
    desirable = _label(record, where)
    if fmt == "kto_alpaca":
        key = "output" if "output" in record or "completion" not in record else "completion"
        if key not in record:
            raise DataError(f'{where}: missing field "output" (or "completion")')
        prompt = alpaca_conversation(record, where, with_answer=False)
        completion = {"role": "assistant", "content": _string(record, key, where)}
    elif fmt in ("kto_sharegpt", "kto_messages"):
        whole = sharegpt_conversation(record, where) if fmt == "kto_sharegpt" else messages_conversation(record, where)
        prompt, completion = Conversation(whole.messages[:-1], whole.tools), whole.messages[-1]
    else:  # unpaired_prompt
        if isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": _string(record, "prompt", where)}]
        else:
            messages = message_list(record.get("prompt"), where, "prompt", end="prompt")
        prompt = Conversation(messages, parse_tools(record.get("tools"), where))
        if isinstance(record.get("completion"), str):
            completion = {"role": "assistant", "content": _string(record, "completion", where)}
        else:
            completion = _reply(record.get("completion"), where, "completion")
    return Sample("kto", conversation=prompt, completion=completion, desirable=desirable, where=where)


def kto_examples(samples: Iterator[Sample]) -> Iterator[Sample]:
    """KTO's examples in the data's order: a preference pair becomes a desirable (chosen) and an
    undesirable (rejected) example. Each carries its KL completion, the first completion of the next
    record (the last record's: the first record's), so a KL row pairs a prompt with a completion written
    for another prompt, fixed by the data alone (deterministic, cacheable). Streams, one record ahead."""
    first, pending = None, []
    for sample in samples:
        if sample.kind == "preference":
            examples = [
                Sample(
                    "kto",
                    conversation=sample.conversation,
                    completion=reply,
                    desirable=good,
                    where=sample.where,
                    file_index=sample.file_index,
                )
                for reply, good in ((sample.chosen, True), (sample.rejected, False))
            ]
        else:
            examples = [sample]
        first = first or examples[0].completion
        for example in pending:
            example.kl_completion = examples[0].completion
            yield example
        pending = examples
    for example in pending:
        example.kl_completion = first
        yield example


def record_to_sample(record: object, fmt: str, where: str) -> Sample:
    """Validate one record of a known format; raises DataError naming where and which field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "pretrain":
        return Sample("text", text=_string(record, "text", where), where=where)
    if fmt == "alpaca":
        return Sample("conversation", conversation=alpaca_conversation(record, where), where=where)
    if fmt == "sharegpt":
        return Sample("conversation", conversation=sharegpt_conversation(record, where), where=where)
    if fmt == "messages":
        return Sample("conversation", conversation=messages_conversation(record, where), where=where)
    if fmt.startswith("kto_") or fmt == "unpaired_prompt":
        return kto_record(record, fmt, where)
    if fmt == "preference_messages":
        prompt, chosen, rejected = trl_preference(record, where)
        return Sample("preference", conversation=prompt, chosen=chosen, rejected=rejected, where=where)
    if fmt == "preference_alpaca":
        prompt = alpaca_conversation(record, where, with_answer=False)
    elif fmt == "preference_sharegpt":
        prompt = sharegpt_conversation(record, where, end_on_assistant=False)
    else:
        raise DataError(f"unknown format {fmt!r}")
    return Sample(
        "preference",
        conversation=prompt,
        chosen=_preference_reply(record, "chosen", where),
        rejected=_preference_reply(record, "rejected", where),
        where=where,
    )


def read_samples(
    paths, stage: Optional[str] = None, skip_bad_records: bool = False, report: Optional[ReadReport] = None
) -> Iterator[Sample]:
    """Validated samples of every file, streamed. The format of each file is detected from its first
    record and must suit `stage`; later records must be in the same format. By default the first bad
    record raises; with skip_bad_records it is reported in `report.skipped` and skipped. Stage kto gives
    its examples (kto_examples)."""
    samples = _read_records(paths, stage, skip_bad_records, report if report is not None else ReadReport())
    return kto_examples(samples) if stage == "kto" else samples


def _read_records(paths, stage: Optional[str], skip_bad_records: bool, report: ReadReport) -> Iterator[Sample]:
    for file_index, file in enumerate(data_files(paths)):
        fmt = None
        seen = 0
        for where, record in iter_json_records(file):
            seen += 1
            try:
                if isinstance(record, DataError):
                    raise record
                if fmt is None:
                    fmt = detect_format(record, where)
                    if stage == "kto":
                        fmt = KTO_FORMATS.get(fmt, fmt)
                    if stage and fmt not in STAGE_FORMATS[stage]:
                        raise DataError(
                            f"{where}: {fmt} records do not suit training_stage {stage} "
                            f"(expects {' or '.join(STAGE_FORMATS[stage])})"
                        )
                sample = record_to_sample(record, fmt, where)
                sample.file_index = file_index
            except DataError as err:
                if not skip_bad_records or (fmt is None and not isinstance(record, DataError)):
                    raise  # (a first record whose format cannot be told stops the run even when skipping)
                report.skipped.append(str(err))
                continue
            report.records += 1
            yield sample
        if not seen:
            report.empty_files.append(f"{file}: {_why_empty(file)}")


def _why_empty(file: Path) -> str:
    with open(file, "rb") as handle:
        head = handle.read(1 << 16).lstrip(UTF8_BOM).lstrip()
    if file.stat().st_size == 0:
        return "the file is empty"
    if head[:1] == b"[":
        return "the JSON array holds no records"
    return "the file holds only blank lines"
