"""Score conversations with a reward model (`training_stage: rm`), and `bumblecore score`.

A reward model reads a conversation as its own chat template renders it whole (every message, no
generation prompt: ChatML keeps the newline after the last `<|im_end|>`), after its tokenizer's BOS as
training saw it, and gives one number: its score head at the last token that is not `pad_token_id`
(transformers' rule, model/reward.py). GRPO (train/rewards.py) scores its completions with the same
scorer, so a policy is judged exactly as `bumblecore score` would judge it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch


class RewardScorer:
    """A reward model with its own tokenizer and chat template: conversations in, float scores out,
    in batches (right-padded with the model's pad id, similar lengths together), without gradients."""

    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        device: Optional[str] = None,
        batch_size: int = 16,
        trust_remote_code: bool = False,
    ):
        from bumblecore.inference.serve_settings import model_dirs
        from bumblecore.model.reward import is_reward_adapter, is_reward_model
        from bumblecore.tokenizer import load_tokenizer

        adapter = is_reward_adapter(model_path)
        if not (adapter or is_reward_model(model_path)):
            raise ValueError(
                f"{model_path} is not a reward model (a directory saved by training_stage rm: config.json names a "
                "*ForSequenceClassification, or a LoRA reward model's adapter_config.json says task_type SEQ_CLS)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.batch_size = str(model_path), batch_size
        base, tokenizer_dir = model_dirs(model_path)  # an adapter: its base, and its own tokenizer if it saved one
        self.tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
        self.model = reward_model(model_path, base, adapter, self.tokenizer, dtype, device, trust_remote_code)
        self.pad_id = self.model.pad_token_id
        self.device = next(self.model.parameters()).device

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def encode(self, conversation: list[dict], tools: Optional[list] = None) -> list[int]:
        """The whole conversation's ids as the reward model's template renders it (as rm training does)."""
        from bumblecore.chat.format import chat_format

        return chat_format(self.tokenizer).encode(conversation, tools, train="last")[0]

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """The reward of each id sequence, in the order given."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # little padding per batch
        scores = [0.0] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(sequences[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, i in enumerate(rows):
                input_ids[b, : len(sequences[i])] = torch.tensor(sequences[i])
                attention_mask[b, : len(sequences[i])] = 1
            rewards = self.model.rewards(input_ids.to(self.device), attention_mask.to(self.device))
            for i, value in zip(rows, rewards.float().cpu().tolist()):
                scores[i] = value
        return scores

    def __call__(self, conversations: list[list[dict]], tools: Optional[list] = None) -> list[float]:
        tools = tools or [None] * len(conversations)
        return self.score_ids([self.encode(c, t) for c, t in zip(conversations, tools)])


def reward_model(model_path, base, adapter: bool, tokenizer, dtype, device, trust_remote_code: bool):
    """A full reward model, or a LoRA reward model: its base's body with the adapter and the score head
    the adapter holds (peft's SEQ_CLS), padded with the tokenizer's pad id as in training."""
    from bumblecore.model.adapter_base import adapter_base_dir
    from bumblecore.model.lora import attach_adapter
    from bumblecore.model.reward import TransformersReward, load_reward_model

    if not adapter:
        return load_reward_model(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    adapter_base_dir(model_path)  # refuses an adapter whose base changed since it was trained
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = load_reward_model(base, dtype, device, trust_remote_code, pad)
    if isinstance(model, TransformersReward):  # the adapter's names are transformers' own class's
        return TransformersReward(attach_adapter(model.hf, model_path)).eval()
    return attach_adapter(model, model_path).eval()


def reward_model_parameters(model_path: str) -> int:
    """A reward model's parameters, from its safetensors headers (nothing loaded): a memory plan's count;
    a LoRA adapter's include its base's."""
    from safetensors import safe_open

    path = Path(model_path)
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():
                total += math.prod(tensors.get_slice(name).get_shape())
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            total += reward_model_parameters(base)
    return total


# ---------------------------------------------------------------------------- records


def as_messages(value, role: str, where: str, field: str) -> list[dict]:
    """A text (one message of `role`) or a list of {"role", "content"} messages, checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f'{where}: field "{field}" must be a text or a non-empty list of messages')
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f'{where}: field "{field}" message {index} must be an object with a "role"')
        if not isinstance(message.get("content"), str) and not message.get("tool_calls"):
            raise ValueError(f'{where}: field "{field}" message {index} has no text "content"')
    return value


def record_conversation(record, where: str) -> list[dict]:
    """`messages`, or `prompt` (user text or messages) + `completion` (assistant text or messages)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return as_messages(record["messages"], "user", where, "messages")
    missing = [key for key in ("prompt", "completion") if key not in record]
    if missing:
        raise ValueError(
            f'{where}: missing field "{missing[0]}" (a record has "messages", or "prompt" and "completion")'
        )
    return as_messages(record["prompt"], "user", where, "prompt") + as_messages(
        record["completion"], "assistant", where, "completion"
    )


def read_scoring_records(path: str) -> list[tuple[str, dict, list[dict]]]:
    """(where, record, conversation) of every non-empty line; the first bad one is an error naming it."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"input_file {path} does not exist")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        conversation = record_conversation(record, where)
        if record.get("tools") is not None and not isinstance(record["tools"], list):
            raise ValueError(f'{where}: field "tools" must be a list of tool definitions')
        records.append((where, record, conversation))
    if not records:
        raise ValueError(f"input_file {path} holds no record")
    return records


def write_atomically(path: str, text: str) -> None:
    """The whole file or nothing: a temporary file beside it, renamed over it once written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def score(
    model_path: str,
    input_file: str,
    output_file: str,
    batch_size: int = 16,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> list[float]:
    """Score conversations with a reward model: each output line is the input record plus its "score".

    Args:
        model_path: a reward model directory (training_stage rm: full, merged, or its LoRA adapter).
        input_file: JSONL; each record has "messages" (a chat), or "prompt" (text or messages) and
            "completion" (text or messages: the assistant's reply), and optionally "tools".
        output_file: JSONL written whole or not at all (a temporary file renamed over it).
        batch_size: conversations per forward pass.
        dtype: auto (the saved dtype), float32, bfloat16 or float16.
        device: auto (cuda when available), cpu, cuda, cuda:1, ...
        trust_remote_code: run model/tokenizer code shipped in the directory.
    """
    from bumblecore.inference.loading import resolve_device

    records = read_scoring_records(input_file)  # every record checked before the model is read
    scorer = RewardScorer(model_path, dtype, str(resolve_device(device)), batch_size, trust_remote_code)
    sequences = []
    for where, record, conversation in records:
        try:
            sequences.append(scorer.encode(conversation, record.get("tools")))
        except ValueError as err:  # the reward model's template cannot render this conversation
            raise ValueError(f"{where}: {err}") from err
    scores = scorer.score_ids(sequences)
    lines = [
        json.dumps({**record, "score": value}, ensure_ascii=False) for (_, record, _), value in zip(records, scores)
    ]
    write_atomically(output_file, "".join(line + "\n" for line in lines))
    print(f"scored {len(scores)} conversations with {model_path} -> {output_file}", flush=True)
    return scores
