"""Which format a record is in, told from its fields (docs/DATA_FORMAT.md); a file's format is its
first record's, and data/adapters.py holds one adapter per format."""

from __future__ import annotations

from bumblecore.data.sources import DataError


def detect_format(record: object, where: str) -> str:
    """The format of one record, told by its fields (the first rule that matches)."""
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
        return "text"
    raise DataError(
        f"{where}: cannot tell the format from fields {sorted(keys)}; expected 'text' (pretraining), "
        "'instruction'/'output' (Alpaca), 'conversations' (ShareGPT), 'messages' (OpenAI-style), with 'chosen'/'rejected' "
        "for preference data ('prompt'/'chosen'/'rejected' message lists as TRL writes them), 'prompt'/'completion'/"
        "'label' for KTO"
    )
