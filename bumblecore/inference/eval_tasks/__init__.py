"""The lm-evaluation-harness tasks BumbleCore ships, local (no hub, no network): the demo data's
counting questions (demo_data/sft_eval.jsonl; few-shot examples from the head of sft_train.jsonl).

- `demo_qa_choice`: multiple choice scored by log-likelihood (acc, acc_norm): the answer among the
  question's possible ones (zero to six for "How many", yes / no for "Is there").
- `demo_qa_exact`: the answer generated greedily until a newline, scored by exact match.

Each YAML names its documents through lm-eval's `custom_dataset` (the function below)."""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).parent
DEMO_DATA = TASKS_DIR.parent.parent / "demo_data"
COUNTS = ["zero", "one", "two", "three", "four", "five", "six"]
FEWSHOT_POOL = 64  # the head of sft_train.jsonl that few-shot examples are drawn from


def demo_qa(**metadata):
    """The demo counting questions as a datasets.DatasetDict: `test` (sft_eval.jsonl) and `train`
    (few-shot examples); each document has question, choices, answer (an index into choices) and
    answer_text. lm-eval calls it with the task's metadata, which it does not need."""
    from datasets import Dataset, DatasetDict

    def documents(file: str, limit=None) -> list[dict]:
        out = []
        path = DEMO_DATA / file
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if limit is not None and len(out) == limit:
                break
            record = json.loads(line)
            choices = COUNTS if record["instruction"].startswith("How many") else ["yes", "no"]
            if record["output"] not in choices:
                raise ValueError(f"{path} line {number}: answer {record['output']!r} is not one of {choices}")
            out.append(
                {
                    "question": record["instruction"],
                    "choices": choices,
                    "answer": choices.index(record["output"]),
                    "answer_text": record["output"],
                }
            )
        return out

    return DatasetDict(
        {
            "test": Dataset.from_list(documents("sft_eval.jsonl")),
            "train": Dataset.from_list(documents("sft_train.jsonl", FEWSHOT_POOL)),
        }
    )
