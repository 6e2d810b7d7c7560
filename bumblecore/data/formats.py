"""Read the original's data formats (REFERENCE.md §3) and turn each record into a normalised sample.

Files are JSON arrays or JSONL, told apart by their first character, streamed record by record.
The format is detected from the first record's fields. Every error names the file, the record's
place (`line N` for JSONL, `record N` for a JSON array, 1-based) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

FORMATS = ("pretrain", "alpaca", "sharegpt", "preference_alpaca", "preference_sharegpt")
USER_SIDE = ("human", "observation")
ASSISTANT_SIDE = ("gpt", "function_call")
SHAREGPT_ROLES = ("system",) + USER_SIDE + ASSISTANT_SIDE


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
    kind: str  # "text", "conversation" or "preference"
    text: str = ""
    conversation: Optional[Conversation] = None
    chosen: Optional[dict] = None  # the preferred final assistant message
    rejected: Optional[dict] = None
    where: str = ""


@dataclass
class ReadReport:
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)  # "<file>: why it holds no record"


# ---------------------------------------------------------------------------- files


def data_files(paths: Union[str, list[str]]) -> list[Path]:
    """Expand files and directories (their .json/.jsonl files, sorted) into a list of files."""
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
                raw = raw[len(UTF8_BOM):] if raw.startswith(UTF8_BOM) else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                # Handed on, not raised: like a broken line, one bad record that skip_bad_records may skip.
                yield f"{file} line {number}", DataError(
                    f"{file} line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "save the file as UTF-8")
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
            data, self.first = (data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data), False
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            pending = len(err.object) - len(data)  # bytes the decoder held back from the previous read
            position = err.start - pending
            line = self.lines_before + data[: max(0, position)].count(b"\n") + 1
            bad = err.object[err.start] if err.start < len(err.object) else 0
            raise DataError(f"{self.file} line {line}: not UTF-8 text (byte 0x{bad:02x} at byte "
                            f"{self.offset + position} of the file); save the file as UTF-8") from None
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
    if "text" in keys:
        return "pretrain"
    raise DataError(
        f"{where}: cannot tell the format from fields {sorted(keys)}; expected 'text' (pretraining), "
        "'instruction'/'output' (Alpaca), 'conversations' (ShareGPT), with 'chosen'/'rejected' for preference data"
    )


STAGE_FORMATS = {
    "pretrain": ("pretrain",),
    "continue_pretrain": ("pretrain",),
    "sft": ("alpaca", "sharegpt"),
    "dpo": ("preference_alpaca", "preference_sharegpt"),
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


def parse_function_call(value: str, where: str, turn: int) -> dict:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f'{where}: field "conversations" turn {turn} (function_call) is not valid JSON ({err.msg})') from None
    if not isinstance(call, dict) or "name" not in call:
        raise DataError(f'{where}: field "conversations" turn {turn} (function_call) needs a JSON object with "name" and "arguments"')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # keep a non-JSON string as the model should produce it
    return {"name": call["name"], "arguments": arguments}


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
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: field "conversations" must be a non-empty list of turns')
    messages: list[dict] = []
    expect_user = True
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f'{where}: field "conversations" turn {number} must be an object with "from" and "value"')
        role, value = turn["from"], turn["value"]
        if role not in SHAREGPT_ROLES:
            raise DataError(f'{where}: field "conversations" turn {number} has role "{role}"; expected {", ".join(SHAREGPT_ROLES)}')
        if not isinstance(value, str):
            raise DataError(f'{where}: field "conversations" turn {number} value must be a string')
        if role == "system":
            if number != 1:
                raise DataError(f'{where}: field "conversations" turn {number}: a system turn may only come first')
            messages.append({"role": "system", "content": value})
            continue
        if (role in USER_SIDE) != expect_user:
            side = "user side (human, observation)" if expect_user else "assistant side (gpt, function_call)"
            raise DataError(f'{where}: field "conversations" turn {number} has role "{role}" out of order; expected the {side}')
        if role in ASSISTANT_SIDE and not value.strip():
            raise DataError(f'{where}: field "conversations" turn {number} ({role}) is an empty assistant turn')
        if role == "human":
            messages.append({"role": "user", "content": value})
        elif role == "observation":
            messages.append({"role": "tool", "content": value})
        elif role == "gpt":
            messages.append({"role": "assistant", "content": value})
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [parse_function_call(value, where, number)]})
        expect_user = not expect_user
    if expect_user != end_on_assistant:
        wanted = "an assistant turn (gpt or function_call)" if end_on_assistant else "a user turn (human or observation)"
        raise DataError(f'{where}: field "conversations" must end on {wanted}')
    return Conversation(messages, parse_tools(record.get("tools"), where))


def _preference_reply(record: dict, key: str, where: str) -> dict:
    value = record.get(key)
    if isinstance(value, dict):
        if value.get("from", "gpt") not in ASSISTANT_SIDE or not isinstance(value.get("value"), str):
            raise DataError(f'{where}: field "{key}" must be {{"from": "gpt", "value": "..."}}')
        text = value["value"]
        if value.get("from") == "function_call":
            call = parse_function_call(text, where, 0)
            return {"role": "assistant", "content": "", "tool_calls": [call]}
    elif isinstance(value, str):
        text = value
    else:
        raise DataError(f'{where}: missing field "{key}"' if value is None else f'{where}: field "{key}" must be a string')
    if not text.strip():
        raise DataError(f'{where}: field "{key}" is empty')
    return {"role": "assistant", "content": text}


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
    if fmt == "preference_alpaca":
        prompt = alpaca_conversation(record, where, with_answer=False)
    elif fmt == "preference_sharegpt":
        prompt = sharegpt_conversation(record, where, end_on_assistant=False)
    else:
        raise DataError(f"unknown format {fmt!r}")
    return Sample("preference", conversation=prompt, chosen=_preference_reply(record, "chosen", where),
                  rejected=_preference_reply(record, "rejected", where), where=where)


def read_samples(paths, stage: Optional[str] = None, skip_bad_records: bool = False,
                 report: Optional[ReadReport] = None) -> Iterator[Sample]:
    """Validated samples of every file, streamed. The format of each file is detected from its first
    record and must suit `stage`; later records must be in the same format. By default the first bad
    record raises; with skip_bad_records it is reported in `report.skipped` and skipped."""
    report = report if report is not None else ReadReport()
    for file in data_files(paths):
        fmt = None
        seen = 0
        for where, record in iter_json_records(file):
            seen += 1
            try:
                if isinstance(record, DataError):
                    raise record
                if fmt is None:
                    fmt = detect_format(record, where)
                    if stage and fmt not in STAGE_FORMATS[stage]:
                        raise DataError(f"{where}: {fmt} records do not suit training_stage {stage} "
                                        f"(expects {' or '.join(STAGE_FORMATS[stage])})")
                sample = record_to_sample(record, fmt, where)
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
