"""GRPO's prompts: conversation records without the answer, every other field kept for the rewards.

Accepted records (the format is told from the first record of each file, as for the other stages):
    Alpaca     {"instruction", "input"?, "system"?, "tools"?, ...}      an `output` is not part of the prompt
    ShareGPT   {"conversations": [... ending on a human turn], ...}
    messages   {"messages": [... ending on a user message], ...}
    TRL        {"prompt": "text" or [messages ending on a user message], ...}
Whatever else a record holds (`answer`, `output`, test cases, ...) reaches the reward functions as
keyword arguments, one list entry per completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from bumblecore.data.conversations import alpaca_conversation, message_list, parse_tools, sharegpt_conversation
from bumblecore.data.formats import ReadReport
from bumblecore.data.sources import DataError, data_files, iter_json_records

# The fields each format renders into the prompt; the rest of a record is handed to the rewards.
PROMPT_FIELDS = {
    "alpaca": ("instruction", "input", "system", "tools"),
    "sharegpt": ("conversations", "tools"),
    "messages": ("messages", "tools"),
    "prompt": ("prompt", "tools"),
}


@dataclass
class PromptRecord:
    messages: list[dict]
    tools: Optional[list]
    fields: dict = field(default_factory=dict)
    """The record's other fields, for the reward functions."""
    where: str = ""
    ids: list[int] = field(default_factory=list)
    """The rendered prompt's token ids (filled by tokenize_prompts)."""


def prompt_format(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for fmt, key in (("sharegpt", "conversations"), ("alpaca", "instruction"), ("messages", "messages")):
        if key in record:
            return fmt
    if "prompt" in record:
        return "prompt"
    raise DataError(
        f"{where}: a GRPO prompt needs 'instruction' (Alpaca), 'conversations' (ShareGPT), 'messages' or "
        f"'prompt'; the record has {sorted(record)}"
    )


def prompt_record(record: dict, fmt: str, where: str) -> PromptRecord:
    tools = parse_tools(record.get("tools"), where)
    if fmt == "alpaca":
        messages = alpaca_conversation(record, where, with_answer=False).messages
    elif fmt == "sharegpt":
        messages = sharegpt_conversation(record, where, end_on_assistant=False).messages
    elif fmt == "messages":
        messages = message_list(record.get("messages"), where, "messages", end="prompt")
    elif isinstance(record["prompt"], str):
        if not record["prompt"].strip():
            raise DataError(f'{where}: field "prompt" is empty')
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        messages = message_list(record["prompt"], where, "prompt", end="prompt")
    fields = {key: value for key, value in record.items() if key not in PROMPT_FIELDS[fmt]}
    return PromptRecord(messages, tools, fields, where)


def read_prompts(paths, skip_bad_records: bool = False, report: Optional[ReadReport] = None) -> list[PromptRecord]:
    """Every prompt record of the files; a bad record raises (naming file, line and field) unless
    skip_bad_records, which reports it in `report.skipped`."""
    report = report if report is not None else ReadReport()
    prompts = []
    for file in data_files(paths):
        fmt = None
        for where, record in iter_json_records(file):
            try:
                if isinstance(record, DataError):
                    raise record
                record_fmt = prompt_format(record, where)
                fmt = fmt or record_fmt
                if record_fmt != fmt:
                    raise DataError(f"{where}: a {record_fmt} record in a file of {fmt} records")
                prompts.append(prompt_record(record, fmt, where))
            except DataError as err:
                if not skip_bad_records:
                    raise
                report.skipped.append(str(err))
                continue
            report.records += 1
    return prompts


def prompt_paths(data, paths, label: str = "dataset_path") -> list[str]:
    """The files of `paths` (any form dataset_path takes: files, globs, a list or a named mapping); GRPO
    reads its sources as one set of prompts, so sampling and loss weights are refused."""
    from bumblecore.data.dataset_spec import run_sources
    from bumblecore.data.mixture import all_paths

    sources = run_sources(data, paths, label)
    if data.mix_strategy != "concat" or any(s.weight != 1.0 or s.loss_weight != 1.0 for s in sources):
        raise ValueError(
            f"{label}: training_stage grpo reads its files as one set of prompts (mix_strategy concat, "
            "no dataset_weights or loss weights)"
        )
    return all_paths(sources)


def tokenize_prompts(prompts: list[PromptRecord], tokenizer, cutoff_len: int) -> tuple[list[PromptRecord], int]:
    """The prompts with their chat-template ids, and how many were dropped for being longer than
    cutoff_len (a cut prompt would ask another question)."""
    from bumblecore.chat.format import render_prompt

    kept, dropped = [], 0
    for prompt in prompts:
        prompt.ids = render_prompt(tokenizer, prompt.messages, prompt.tools)
        if len(prompt.ids) > cutoff_len:
            dropped += 1
            continue
        kept.append(prompt)
    return kept, dropped
