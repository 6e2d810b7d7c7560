"""The training run's settings: eight typed groups and the run that holds them (TrainArgs); the groups
of the preference and RL stages are in args/stages.py. (The sampling options of generate, chat and serve
are bumblecore/inference/sampling.py's SamplingArgs.)

Each field's attribute docstring is its `--help` line. jsonargparse parses and type-checks them
(bumblecore/cli.py builds the parser from `train`'s signature); every field keeps the flat name and
default of the original's keys, so a flat YAML file (`learning_rate: 1e-4`) or a flat flag
(`--learning_rate 1e-4`) still works beside the grouped spelling (`optimization: {learning_rate: 1e-4}`).
Checks within one group sit in its `__post_init__`; checks across groups sit in `TrainArgs`'s.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

from bumblecore.args.stages import (
    GRPO_ADVANTAGES,
    GRPO_LOSS_TYPES,
    LOSSES_WITH_NLL,
    PREF_LOSSES,
    REFERENCE_FREE_LOSSES,
    GRPOArgs,
    PreferenceArgs,
    one_of,
)
from bumblecore.data.dataset_spec import MIX_STRATEGIES, DataSource, run_sources

__all__ = [  # the stage groups and their names live in args/stages.py; their users import them from here
    "GRPO_ADVANTAGES",
    "GRPO_LOSS_TYPES",
    "LOSSES_WITH_NLL",
    "PREF_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "GRPOArgs",
    "PreferenceArgs",
]

FINETUNING_TYPES = ("full", "lora")
OPTIMIZERS = ("adamw", "muon", "adafactor", "sgd", "adamw_8bit")  # train/optimizers.py builds each
LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora")  # checked in model/lora_options.py


@dataclass
class ModelArgs:
    """What to train: the stage, the model and how it is tuned"""

    training_stage: str = "sft"
    """pretrain (random init from a model dir holding config.json + tokenizer), continue_pretrain, sft, dpo, kto, grpo or rm (a reward model)."""
    finetuning_type: str = "full"
    """full or lora."""
    model_name_or_path: str = ""
    """Local model directory (Hugging Face layout). Required."""
    trust_remote_code: bool = False
    """Allow custom model code for Hugging Face models that are not Bumblebee/Qwen2/Llama."""
    tokenizer_use_fast: bool = False
    """Accepted for compatibility; the fast (Rust) tokenizer is always used when the dir has tokenizer.json."""
    chat_template: Optional[str] = None
    """The chat template: a built-in (chatml, qwen2.5, llama3, mistral, gemma, phi3) or a .jinja file; default:
    the tokenizer's own, else chatml. The trained model's tokenizer carries it (generate, chat, serve use it)."""
    new_special_tokens: Optional[Union[list[str], str]] = None
    """Special tokens to add to the tokenizer: a list, or one comma-separated string ("<a>,<b>")."""
    resize_vocab: bool = False
    """Grow the embedding (and an untied head) for added tokens, new rows = the mean of the old ones; also adds the
    chosen built-in template's markers the tokenizer lacks. Under LoRA the new rows train too."""
    rope_scaling: Optional[Union[str, dict]] = None
    """Extend the context (continued pretraining at a longer cutoff_len): {rope_type: linear, dynamic, yarn or
    llama3, factor: F, ...}, or a bare type (factor = ceil(cutoff_len / max_position_embeddings)); positions
    grow to max_position_embeddings x F, saved in config.json's rope_parameters. Full fine-tuning, Bumblebee families."""

    def __post_init__(self) -> None:
        one_of("training_stage", self.training_stage, STAGES)
        one_of("finetuning_type", self.finetuning_type, FINETUNING_TYPES)


@dataclass
class DataArgs:
    """Data: files, sample length, packing and the token cache"""

    dataset_path: Union[str, list[str], dict[str, Union[str, dict]]] = ""
    """.json or .jsonl file(s), globs or directories; the format is detected from the records. Several entries
    are a mixture, one source each (named by its file stem), or a mapping {name: {path, weight, loss_weight}}.
    Required."""
    dataset_weights: Optional[list[float]] = None
    """Sampling weight of each dataset_path entry (mix_strategy interleave_under / interleave_over)."""
    dataset_loss_weights: Optional[list[float]] = None
    """Loss weight of each dataset_path entry: its target tokens count w times in the step's loss (default 1)."""
    mix_strategy: str = "concat"
    """How sources are mixed: concat (every record once, as one dataset), interleave_under (draw by
    dataset_weights until the first source is used up) or interleave_over (until the last is)."""
    eval_dataset_path: Optional[Union[str, list[str], dict[str, Union[str, dict]]]] = None
    """Held-out data evaluated every eval_steps (same formats); several entries are logged per source too."""
    cutoff_len: int = 1024
    """Max tokens per sample (pretraining: per block)."""
    packing: Optional[bool] = None
    """Pack samples into full rows without cross-sample attention; default on for pretrain/sft, off for dpo/kto/grpo."""
    group_by_length: bool = False
    """Without packing: batch samples of similar length together (less padding)."""
    skip_bad_records: bool = False
    """Skip invalid records (reported with file and line) instead of stopping at the first."""
    cache_dir: Optional[str] = None
    """Token cache directory (default: ~/.cache/bumblecore/tokens)."""
    num_local_io_workers: Optional[int] = None
    """Accepted for compatibility and ignored (a note says so): tokenisation already uses every core (the
    Rust tokenizer) and batches are read in-process from the memory-mapped cache."""

    def __post_init__(self) -> None:
        one_of("mix_strategy", self.mix_strategy, MIX_STRATEGIES)
        if self.dataset_path:
            self.sources()  # the mixture's errors at parse time, naming the key
        if self.eval_dataset_path:
            self.sources(eval=True)

    def sources(self, eval: bool = False) -> list[DataSource]:
        """dataset_path (or eval_dataset_path) as named sources with their weights (checked)."""
        key = "eval_dataset_path" if eval else "dataset_path"
        return run_sources(self, getattr(self, key), key)


@dataclass
class OptimizationArgs:
    """Optimisation: steps, learning rate and its schedule, batch, precision, seed"""

    num_epochs: float = 3.0
    """Fractional epochs allowed (0.5 = half an epoch)."""
    max_steps: Optional[int] = None
    """Stop after this many optimiser steps (overrides num_epochs)."""
    learning_rate: float = 5e-5
    """Peak learning rate (after warmup), of whichever optim."""
    weight_decay: float = 0.01
    """Weight decay (biases and norm weights get none)."""
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
    enable_liger_kernel: bool = False
    """liger-kernel's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) for a Bumblebee
    model on CUDA; needs `pip install 'bumblecore[gpu]'`."""
    activation_offload: bool = False
    """With gradient checkpointing on CUDA: the checkpointed layers' inputs wait in host memory until backward."""
    tiled_mlp: int = 0
    """Long samples: the MLP over the tokens in this many chunks, one chunk's intermediates alive at a time (0: off)."""
    compile: bool = False
    """torch.compile each decoder layer for training (regional: compiled once, reused by every layer) and the
    loss chunks; equal to eager. pretrain, continue_pretrain, sft; DDP and ZeRO-0..3 (LoRA not under ZeRO-3)."""
    train_micro_batch_size_per_gpu: int = 4
    """Samples (or packed rows) per forward on each device."""
    gradient_accumulation_steps: int = 8
    """Global batch = micro batch x devices x accumulation."""
    train_model_precision: str = "bf16"
    """fp32, fp16 or bf16."""
    average_tokens_across_devices: bool = True
    """Normalise the loss by the target-token count of the whole step across devices (false: the original's
    mean over the step's micro-batches of each micro-batch's own token mean)."""
    seed: int = 42
    """Seeds the random init, the data order and dropout."""
    optim: str = "adamw"
    """adamw, muon (torch's Muon for 2-D hidden matrices, AdamW for the rest), adafactor, sgd or adamw_8bit (CUDA)."""
    optim_kwargs: dict = field(default_factory=dict)
    """Extra settings of the optimizer (sgd: momentum, nesterov; adamw: betas, eps; muon: momentum, ns_steps ...)."""

    def __post_init__(self) -> None:
        one_of("optim", self.optim, OPTIMIZERS)


@dataclass
class LoraArgs:
    """LoRA (finetuning_type lora)"""

    lora_rank: int = 64
    """Rank r of each adapter."""
    lora_alpha: int = 128
    """Adapter scale numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.1
    """Dropout on the adapter's input."""
    lora_target_modules: Optional[list[str]] = None
    """e.g. [q_proj, k_proj, v_proj, o_proj]; default: every linear layer of the decoder."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output row beside the low-rank direction update."""
    use_rslora: bool = False
    """rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r."""
    lora_init: str = "default"
    """default, gaussian, pissa, pissa_niter_N (fast SVD, N iterations) or olora (saved relative to the original base)."""
    loraplus_lr_ratio: Optional[float] = None
    """LoRA+: the B matrices learn at this many times learning_rate (e.g. 16)."""
    lora_modules_to_save: Optional[list[str]] = None
    """Modules trained in full beside the adapter and saved in it (e.g. [lm_head, embed_tokens])."""


@dataclass
class RuntimeArgs:
    """Scale: processes, nodes, accelerator, DeepSpeed"""

    deepspeed_config_path: Optional[str] = None
    """DeepSpeed JSON (ZeRO 0-3); "auto" values are filled from this config."""
    devices: int = 1
    """Processes (GPUs) on this node; a plain run with devices > 1 starts them itself."""
    num_nodes: int = 1
    """Nodes of the job (a launcher's own count wins)."""
    accelerator: str = "auto"
    """auto, cpu or cuda."""
    sequence_parallel_size: int = 1
    """Split each sample's sequence over this many ranks (DeepSpeed's Ulysses; needs deepspeed_config_path,
    heads divisible by it; sft and pretraining): longer samples per rank; data-parallel size = processes / N."""
    local_rank: int = -1
    """Set by launchers; accepted for compatibility."""
    release_freed_memory: Optional[bool] = None
    """Hand freed blocks of 128 KiB or more straight back to the OS (fixed glibc malloc thresholds on
    Linux): a lower host RSS, a few page faults more per step. Default (null): on under DeepSpeed
    ZeRO-3, whose ranks gather and free every weight each step, and under sequence_parallel_size > 1,
    whose ranks' smaller tensors glibc would otherwise keep; off otherwise."""


@dataclass
class OutputArgs:
    """Outputs: where the run writes, checkpoints, resume, evaluation and logging"""

    output_dir: str = "./output"
    """Where checkpoints, logs, metrics and plots go."""
    overwrite_output_dir: bool = False
    """Replace another run's outputs in output_dir (its model, checkpoints, metrics); without it such a run is refused."""
    save_steps: int = 500
    """Checkpoint every N optimiser steps."""
    save_total_limit: int = 3
    """Keep only the newest N checkpoints."""
    save_last: bool = False
    """Save a final checkpoint at the end, outside the rotation."""
    resume_from_checkpoint: Optional[str] = None
    """A checkpoint dir, or `latest` (the newest complete one in output_dir)."""
    eval_steps: Optional[int] = None
    """Evaluate every N optimiser steps (default: at save_steps when eval data or eval_tasks are given)."""
    eval_at_end: bool = True
    """With eval data, evaluate after the last step too (once: not again if that step evaluated already)."""
    eval_tasks: Optional[list[str]] = None
    """lm-evaluation-harness tasks run on the model being trained at each evaluation, logged as eval/<task>/<metric> (the local tasks of `bumblecore eval`: demo_qa_choice, demo_qa_exact); rank 0 runs them while the others wait."""
    eval_tasks_limit: Optional[float] = None
    """Evaluate only the first N documents of each eval_tasks task (below 1: that fraction); null: all."""
    logging_steps: int = 1
    """Log (and write metrics.jsonl) every N optimiser steps."""
    save_train_log: bool = False
    """Also write the log to output_dir/logs/train.log (it starts with the resolved configuration)."""
    report_to: Optional[Union[list[str], str]] = field(default_factory=lambda: ["tensorboard"])
    """Trackers of the resolved configuration and every logged metric: tensorboard (output_dir/runs), wandb, mlflow,
    swanlab, csv (output_dir/csv): a list, names joined by commas, or none. wandb, mlflow, swanlab: pip install
    'bumblecore[wandb]' (and so on)."""
    use_tensorboard: Optional[bool] = None
    """The original's switch: true adds tensorboard to report_to, false removes it; unset leaves report_to as is."""
    run_name: Optional[str] = None
    """The run's name in the trackers (W&B run, MLflow run); default: output_dir's folder name."""
    tracker_project: str = "bumblecore"
    """The W&B project / MLflow experiment / SwanLab project the run is logged under."""

    def __post_init__(self) -> None:  # report_to resolved: training_args.yaml shows the run's trackers
        entries = [self.report_to] if isinstance(self.report_to, str) else self.report_to or []  # `wandb,mlflow` too
        names = [
            n for n in dict.fromkeys(n.strip().lower() for e in entries for n in e.split(",")) if n != "none" and n
        ]
        for name in names:  # train/trackers.py opens them
            one_of("report_to", name, ("tensorboard", "wandb", "mlflow", "swanlab", "csv"))
        if self.use_tensorboard is not None:  # the original's switch
            names = (["tensorboard"] if self.use_tensorboard else []) + [n for n in names if n != "tensorboard"]
        self.report_to = names


@dataclass
class TrainArgs:
    """A training run: every group of settings"""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optimization: OptimizationArgs = field(default_factory=OptimizationArgs)
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)
    output: OutputArgs = field(default_factory=OutputArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    preference: PreferenceArgs = field(default_factory=PreferenceArgs)
    grpo: GRPOArgs = field(default_factory=GRPOArgs)

    def __post_init__(self) -> None:
        settings = STAGE_SETTINGS[self.model.training_stage]
        if settings.check is not None:
            settings.check(self)
        if self.data.packing is None:  # a copy: the caller's DataArgs stays as given
            self.data = dataclasses.replace(self.data, packing=settings.packed)

    def _check_preference(self) -> None:
        preference = self.preference
        if preference.pref_beta <= 0:
            raise ValueError(f"pref_beta must be > 0, got {preference.pref_beta}")
        if not 0.0 <= preference.dpo_label_smoothing < 0.5:
            raise ValueError(f"dpo_label_smoothing must be in [0, 0.5), got {preference.dpo_label_smoothing}")

    def _check_dpo(self) -> None:
        self._check_preference()
        preference = self.preference
        if not preference.reference_free:
            return
        # Keys that mean nothing without a reference (or that these losses define otherwise) are refused,
        # not ignored: a run given a reference model should not silently train without it.
        loss = preference.pref_loss
        if preference.ref_model_path:
            raise ValueError(
                f"ref_model_path is set, but pref_loss {loss} uses no reference model; "
                "drop ref_model_path, or use pref_loss sigmoid or ipo"
            )
        if preference.dpo_label_smoothing:
            raise ValueError(f"dpo_label_smoothing (conservative DPO) is for pref_loss sigmoid, not {loss}")
        if preference.ld_alpha != 1.0:
            raise ValueError(
                f"ld_alpha (LD-DPO) weighs summed log-probs; pref_loss {loss} already uses per-token means"
            )
        if loss in LOSSES_WITH_NLL and preference.sft_weight:
            raise ValueError(
                "pref_loss orpo already includes the chosen response's NLL (weight 1); leave sft_weight at 0 "
                "and weigh the odds-ratio term with pref_beta"
            )

    def _check_kto(self) -> None:
        """KTO has its own loss: the DPO family's variants are refused, not ignored."""
        self._check_preference()
        preference = self.preference
        if preference.pref_loss != "sigmoid":
            raise ValueError(
                f"pref_loss {preference.pref_loss} is a DPO-family loss; training_stage kto has its own loss "
                "(leave pref_loss at sigmoid)"
            )
        for key, value, neutral in (
            ("dpo_label_smoothing", preference.dpo_label_smoothing, 0.0),
            ("sft_weight", preference.sft_weight, 0.0),
            ("ld_alpha", preference.ld_alpha, 1.0),
        ):
            if value != neutral:
                raise ValueError(
                    f"{key} {value} is for training_stage dpo; kto does not use it (leave it at {neutral})"
                )
        for key in ("kto_desirable_weight", "kto_undesirable_weight"):
            if not getattr(preference, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(preference, key)}")

    @classmethod
    def from_flat(cls, **values) -> TrainArgs:
        """A run from the original's flat keys (Python values, as a YAML file would give them)."""
        groups = {}
        for name, group in group_types(cls).items():
            names = {f.name for f in dataclasses.fields(group)}
            renamed = {old: new for old, new in getattr(group, "aliases", {}).items() if old in values}
            groups[name] = group(
                **{key: values[key] for key in names if key in values},
                **{new: values[old] for old, new in renamed.items()},
            )
            values = {k: v for k, v in values.items() if k not in names and k not in renamed}
        if values:
            raise TypeError(f"unknown keys: {', '.join(sorted(values))}")
        return cls(**groups)

    def flat(self) -> dict:
        """Every key with its value, flat, in group order: what training_args.yaml and --print_config write."""
        return {key: value for group in vars(self).values() for key, value in dataclasses.asdict(group).items()}


@dataclass(frozen=True)
class StageSettings:
    """What the settings know of a training stage (its recipe, bumblecore/recipes/, owns the rest):
    packing's default, and its checks across config groups, run when a TrainArgs is made."""

    packed: bool = False
    check: Optional[typing.Callable[[TrainArgs], None]] = None


STAGE_SETTINGS = {
    "pretrain": StageSettings(packed=True),
    "continue_pretrain": StageSettings(packed=True),
    "sft": StageSettings(packed=True),
    "dpo": StageSettings(check=TrainArgs._check_dpo),
    "kto": StageSettings(check=TrainArgs._check_kto),
    "grpo": StageSettings(),
    "rm": StageSettings(),
}
STAGES = tuple(STAGE_SETTINGS)  # the registry's stages (bumblecore/recipes/), in the same order


def group_types(cls) -> dict[str, type]:
    """TrainArgs's group name -> its dataclass (annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def flat_defaults() -> dict:
    """Every flat key's declared default (packing: None, resolved only by a run's stage)."""
    defaults = {}
    for group in group_types(TrainArgs).values():
        for f in dataclasses.fields(group):
            defaults[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return defaults
