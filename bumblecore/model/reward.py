"""Reward models: a causal LM's body with a scalar head, as transformers' `*ForSequenceClassification`
with `num_labels: 1` (a `score` linear layer without bias, no LM head), read at the last token whose
id is not `pad_token_id` (transformers' rule: the rightmost non-pad position of each row).

Bumblebee's families run natively (`RewardBumblebee`: Bumblebee's one forward, the `score` head where
the LM head was); any other family runs through AutoModelForSequenceClassification (`TransformersReward`).
Both give `rewards(input_ids, attention_mask) -> (batch,) float32` and `pad_token_id`, and save the
Hugging Face layout (`Qwen2ForSequenceClassification`, ...) that transformers loads with the same scores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from bumblecore.model.bumblebee import Bumblebee
from bumblecore.model.config import BumblebeeConfig
from bumblecore.model.hf_config import (
    ARCHITECTURES,
    DTYPES,
    bumblebee_expresses,
    config_to_hf_dict,
    read_config,
    resolve_dtype,
)
from bumblecore.model.hf_io import expected_tensors, iter_checkpoint, save_pretrained
from bumblecore.model.transformers_family import TransformersWrapper

# transformers' label names for one label (what its configs write with num_labels 1).
ONE_LABEL = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}


def is_reward_model(model_dir) -> bool:
    """Whether config.json's `architectures` names a `*ForSequenceClassification`."""
    file = Path(model_dir) / "config.json"
    if not file.is_file():
        return False
    try:
        architectures = json.loads(file.read_text(encoding="utf-8")).get("architectures") or []
    except json.JSONDecodeError:
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def is_reward_adapter(adapter_dir) -> bool:
    """Whether adapter_config.json names peft's SEQ_CLS task: a LoRA reward model (the score head beside the adapter)."""
    file = Path(adapter_dir) / "adapter_config.json"
    try:
        return file.is_file() and json.loads(file.read_text(encoding="utf-8")).get("task_type") == "SEQ_CLS"
    except json.JSONDecodeError:
        return False


def last_token_index(input_ids: torch.Tensor, pad_token_id: Optional[int]) -> torch.Tensor:
    """(batch,) the index where each row's score is read: its rightmost token that is not padding
    (left or right padding alike), as transformers reads it; the last position when there is no pad id."""
    if pad_token_id is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[-1] - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def pooled(scores: torch.Tensor, input_ids: torch.Tensor, pad_token_id: Optional[int]) -> torch.Tensor:
    """Per-token scores (batch, seq, 1) -> each row's reward (batch,) in float32."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, last_token_index(input_ids, pad_token_id).to(scores.device), 0].float()


class RewardBumblebee(Bumblebee):
    """Bumblebee's body (`model.*`) and a `score` head (1, hidden): its forward is Bumblebee's, and
    gives per-token scores (batch, seq, 1) where Bumblebee gives logits."""

    is_reward_model = True

    def add_head(self, config: BumblebeeConfig) -> None:
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def tie_head(self) -> None:
        """No LM head to tie."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden)

    def get_output_embeddings(self):
        return None

    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        return {}

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.config.pad_token_id

    def rewards(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch,) float32: each row's score at its last non-pad token."""
        return pooled(self(input_ids, attention_mask=attention_mask), input_ids, self.pad_token_id)

    def checkpoint_tensors(self, path, seed: Optional[int] = None) -> Iterator[tuple[str, object]]:
        """(name, load) of every weight from `path`: a reward model's own, or a causal LM's body (its LM
        head skipped) with a new `score`, drawn normal(0, initializer_range) as transformers draws it
        (from `seed` when given, else from the global generator)."""
        expected = expected_tensors(self)
        from_lm = not is_reward_model(path)
        if from_lm:
            expected.pop("score.weight")
            if not self.config.tie_word_embeddings:  # read past, never loaded
                expected["lm_head.weight"] = (self.config.vocab_size, self.config.hidden_size)
        for name, load in iter_checkpoint(path, self.config, expected):
            if name != "lm_head.weight":
                yield name, load
        if from_lm:
            yield "score.weight", lambda: new_score(self.config, seed)

    def save_pretrained(self, path, max_shard_size="5GB", state_dict=None, stream=None) -> None:
        """The Hugging Face layout of a `*ForSequenceClassification` with num_labels 1."""
        save_pretrained(
            self, path, max_shard_size, state_dict, stream, config_dict=lambda dtype: reward_config(self.config, dtype)
        )


def new_score(config: BumblebeeConfig, seed: Optional[int] = None) -> torch.Tensor:
    """A new score head's weight (1, hidden), normal(0, initializer_range)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(1, config.hidden_size, generator=generator) * config.initializer_range


def reward_config(config: BumblebeeConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """config.json of a reward model: the family's causal-LM config as ForSequenceClassification, one label."""
    out = config_to_hf_dict(config, dtype)
    causal = ARCHITECTURES[out["model_type"]]
    out["architectures"] = [causal.replace("ForCausalLM", "ForSequenceClassification")]
    out.update(ONE_LABEL)
    return out


class TransformersReward(TransformersWrapper):
    """A transformers `*ForSequenceClassification` (num_labels 1) with the reward interface; forward
    gives per-token scores (batch, seq, 1) like RewardBumblebee's (packed rows are not supported)."""

    is_reward_model = True

    def __init__(self, model):
        super().__init__(model)
        if getattr(model, "score", None) is None:
            raise ValueError(f"{type(model).__name__}: no `score` head; not a reward model BumbleCore can train")

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.config.pad_token_id

    def forward(self, input_ids, position_ids=None, attention_mask=None, segment_ids=None, return_hidden_states=False):
        if segment_ids is not None:
            raise ValueError("packed rows (segment_ids) are not supported for transformers models; set packing: false")
        body = getattr(self.hf, self.hf.base_model_prefix)
        hidden = body(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return hidden if return_hidden_states else self.hf.score(hidden)

    def rewards(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def load_reward_model(
    model_dir, dtype="auto", device=None, trust_remote_code: bool = False, pad_token_id: Optional[int] = None
):
    """A reward model in eval mode, from a reward model directory or (a new score head) a causal LM's.
    `pad_token_id` sets the id whose positions are padding (default: config.json's)."""
    if bumblebee_expresses(model_dir):
        model = RewardBumblebee.from_pretrained(
            model_dir, dtype=resolve_dtype(dtype, read_config(model_dir)), device=device
        )
    else:
        model = TransformersReward(
            transformers_reward(model_dir, "auto" if dtype in (None, "auto") else DTYPES[dtype], trust_remote_code)
        )
        model = model.to(device) if device is not None else model
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model.eval()


def transformers_reward(model_dir, dtype="auto", trust_remote_code: bool = False):
    """AutoModelForSequenceClassification with one label (a causal LM's directory gets a new score head,
    transformers' own init)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
    )
