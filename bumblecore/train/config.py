"""TrainConfig: every flat key of the original (REFERENCE.md §1) with its meaning and default,
plus the keys the original lacked (resume, evaluation, packing, max_steps, seed, devices ...).

A run is one flat YAML file; the command line overrides it. Unknown keys and wrong types are
errors that name the key and suggest the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

STAGES = ("pretrain", "continue_pretrain", "sft", "dpo")
PREF_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
# Preference losses of the policy alone: no reference model is built, loaded or cached for them.
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
FINETUNING_TYPES = ("full", "lora")
# Spellings of the original's YAML files that mean one of our keys.
ALIASES = {"label_smoothing": "dpo_label_smoothing"}


@dataclass
class TrainConfig:
    # -- what to train
    training_stage: str = "sft"
    """pretrain (random init from a model dir holding config.json + tokenizer), continue_pretrain, sft or dpo."""
    finetuning_type: str = "full"
    """full or lora."""
    model_name_or_path: str = ""
    """Local model directory (Hugging Face layout). Required."""
    output_dir: str = "./output"
    """Where checkpoints, logs, metrics and plots go."""
    overwrite_output_dir: bool = False
    """Replace another run's outputs in output_dir (its model, checkpoints, metrics); without it such a run is refused."""
    trust_remote_code: bool = False
    """Allow custom model code for Hugging Face models that are not Bumblebee/Qwen2/Llama."""
    tokenizer_use_fast: bool = False
    """Accepted for compatibility; the fast (Rust) tokenizer is always used when the dir has tokenizer.json."""

    # -- data
    dataset_path: Union[str, list[str]] = ""
    """.json or .jsonl file(s) or a directory; the format is detected from the records. Required."""
    eval_dataset_path: Optional[Union[str, list[str]]] = None
    """Held-out data evaluated every eval_steps (same formats)."""
    cutoff_len: int = 1024
    """Max tokens per sample (pretraining: per block)."""
    packing: Optional[bool] = None
    """Pack samples into full rows without cross-sample attention; default on for pretrain/sft, off for dpo."""
    group_by_length: bool = False
    """Without packing: batch samples of similar length together (less padding)."""
    skip_bad_records: bool = False
    """Skip invalid records (reported with file and line) instead of stopping at the first."""
    cache_dir: Optional[str] = None
    """Token cache directory (default: ~/.cache/bumblecore/tokens)."""
    num_local_io_workers: Optional[int] = None
    """Accepted for compatibility and ignored (a note says so): tokenisation already uses every core (the
    Rust tokenizer) and batches are read in-process from the memory-mapped cache."""

    # -- optimisation
    num_epochs: float = 3.0
    """Fractional epochs allowed (0.5 = half an epoch)."""
    max_steps: Optional[int] = None
    """Stop after this many optimiser steps (overrides num_epochs)."""
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    """Fraction of total steps used for warmup."""
    lr_scheduler_type: str = "cosine"
    """linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt,
    reduce_on_plateau (needs eval_dataset_path), cosine_with_min_lr, warmup_stable_decay. A function of
    (step, total steps): a resumed run with another max_steps follows its own schedule from the resumed step."""
    lr_scheduler_kwargs: dict = field(default_factory=dict)
    """Extra schedule settings (num_cycles, min_lr_rate, num_decay_steps, power, lr_end ...)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    enable_gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% more compute)."""
    train_micro_batch_size_per_gpu: int = 4
    gradient_accumulation_steps: int = 8
    """Global batch = micro batch x devices x accumulation."""
    train_model_precision: str = "bf16"
    """fp32, fp16 or bf16."""
    average_tokens_across_devices: bool = True
    """Normalise the loss by the target-token count of the whole step across devices (false: the original's
    mean over the step's micro-batches of each micro-batch's own token mean)."""
    seed: int = 42

    # -- scale
    deepspeed_config_path: Optional[str] = None
    """DeepSpeed JSON (ZeRO 0-3); "auto" values are filled from this config."""
    devices: int = 1
    """Processes (GPUs) on this node; a plain run with devices > 1 starts them itself."""
    num_nodes: int = 1
    accelerator: str = "auto"
    """auto, cpu or cuda."""
    local_rank: int = -1
    """Set by launchers; accepted for compatibility."""

    # -- saving, logging, evaluation
    save_steps: int = 500
    """Checkpoint every N optimiser steps."""
    save_total_limit: int = 3
    """Keep only the newest N checkpoints."""
    save_last: bool = False
    """Save a final checkpoint at the end, outside the rotation."""
    resume_from_checkpoint: Optional[str] = None
    """A checkpoint dir, or `latest` (the newest complete one in output_dir)."""
    eval_steps: Optional[int] = None
    """Evaluate every N optimiser steps (default: at save_steps when eval data is given)."""
    logging_steps: int = 1
    save_train_log: bool = False
    """Also write the log to output_dir/logs/train.log (it starts with the resolved configuration)."""
    use_tensorboard: bool = False

    # -- LoRA
    lora_rank: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.1
    lora_target_modules: Optional[list[str]] = None
    """e.g. [q_proj, k_proj, v_proj, o_proj]; default: every linear layer of the decoder."""

    # -- DPO
    pref_beta: float = 0.1
    """DPO beta; ORPO's lambda (weight of the odds-ratio term); SimPO's beta (its papers use ~2.0: set it)."""
    pref_loss: str = "sigmoid"
    """sigmoid (DPO), ipo, orpo or simpo (orpo and simpo use no reference model)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (pref_loss simpo only)."""
    dpo_label_smoothing: float = 0.0
    """Conservative DPO (also spelled label_smoothing)."""
    sft_weight: float = 0.0
    """Weight of an SFT term (mean NLL of the chosen response) added to the DPO loss."""
    ld_alpha: float = 1.0
    """LD-DPO: weight of the longer response's tokens beyond the shorter one's length (1.0 = plain DPO)."""
    ref_model_path: Optional[str] = None
    """DPO reference model (default: the starting model)."""
    precompute_ref_log_probs: Optional[bool] = None
    """Compute reference log-probs once before training and keep them beside the token cache, reused
    across epochs and runs (default: on for full fine-tuning; LoRA uses the base with its adapter disabled)."""

    def __post_init__(self) -> None:
        if self.training_stage not in STAGES:
            raise ValueError(f"training_stage {self.training_stage!r} is not one of {', '.join(STAGES)}")
        if self.finetuning_type not in FINETUNING_TYPES:
            raise ValueError(f"finetuning_type {self.finetuning_type!r} is not one of {', '.join(FINETUNING_TYPES)}")
        if self.pref_loss not in PREF_LOSSES:
            raise ValueError(f"pref_loss {self.pref_loss!r} is not one of {', '.join(PREF_LOSSES)}")
        if self.training_stage == "dpo" and self.pref_loss in REFERENCE_FREE_LOSSES:
            self._check_reference_free()
        if self.packing is None:
            self.packing = self.training_stage != "dpo"


    def _check_reference_free(self) -> None:
        """Keys that mean nothing without a reference (or that these losses define otherwise) are refused,
        not ignored: a run given a reference model should not silently train without it."""
        loss = self.pref_loss
        if self.ref_model_path:
            raise ValueError(f"ref_model_path is set, but pref_loss {loss} uses no reference model; "
                             "drop ref_model_path, or use pref_loss sigmoid or ipo")
        if self.dpo_label_smoothing:
            raise ValueError(f"dpo_label_smoothing (conservative DPO) is for pref_loss sigmoid, not {loss}")
        if self.ld_alpha != 1.0:
            raise ValueError(f"ld_alpha (LD-DPO) weighs summed log-probs; pref_loss {loss} already uses per-token means")
        if loss == "orpo" and self.sft_weight:
            raise ValueError("pref_loss orpo already includes the chosen response's NLL (weight 1); leave sft_weight at 0 "
                             "and weigh the odds-ratio term with pref_beta")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def nearest_key(name: str) -> str:
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a value against the field's type; YAML already gives ints/floats/bools/lists."""
    hint = typing.get_type_hints(TrainConfig)[name]
    allowed = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        base = typing.get_origin(kind) or kind
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 5e-5 as a string
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, dict) and isinstance(value, base):
            return value
        if base is list and isinstance(value, list):
            return value
    wanted = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"{source}: key {name!r} expects {wanted}, got {value!r}")


def build_config(values: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from flat key/values (YAML + overrides), with errors that name the key."""
    checked = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            raise ValueError(f"{source}: unknown key {key!r}{nearest_key(key)}")
        checked[name] = _coerce(name, value, source)
    return TrainConfig(**checked)


def load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of flat keys, got {type(data).__name__}")
    data.pop("yaml_config", None)
    return data


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)
