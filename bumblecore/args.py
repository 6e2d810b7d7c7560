"""The training run's settings: eight typed groups and the run that holds them (TrainArgs). (The
sampling options of generate, chat and serve are bumblecore/inference/sampling.py's SamplingArgs.)

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
from typing import ClassVar, Optional, Union

from bumblecore.data.dataset_spec import MIX_STRATEGIES, DataSource, run_sources

FINETUNING_TYPES = ("full", "lora")
OPTIMIZERS = ("adamw", "muon", "adafactor", "sgd", "adamw_8bit")  # train/optimizers.py builds each
LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora")  # checked in model/lora_options.py
PREF_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
# Preference losses of the policy alone: no reference model is built, loaded or cached for them.
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
# Preference losses that hold the chosen response's NLL already (an sft_weight would count it twice).
LOSSES_WITH_NLL = ("orpo",)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} {value!r} is not one of {', '.join(allowed)}")


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

    def __post_init__(self) -> None:
        _one_of("training_stage", self.training_stage, STAGES)
        _one_of("finetuning_type", self.finetuning_type, FINETUNING_TYPES)


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
        _one_of("mix_strategy", self.mix_strategy, MIX_STRATEGIES)
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
        _one_of("optim", self.optim, OPTIMIZERS)


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
class PreferenceArgs:
    """Preference training (training_stage dpo, kto or rm): the loss and its reference"""

    # The original's spellings of our keys (its YAML files say label_smoothing).
    aliases: ClassVar[dict[str, str]] = {"label_smoothing": "dpo_label_smoothing"}

    pref_beta: float = 0.1
    """DPO's and KTO's beta; ORPO's lambda (weight of the odds-ratio term); SimPO's beta (its papers use ~2.0: set it)."""
    pref_loss: str = "sigmoid"
    """sigmoid (DPO), ipo, orpo or simpo (orpo and simpo use no reference model); kto takes sigmoid only."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (pref_loss simpo only)."""
    dpo_label_smoothing: float = 0.0
    """Conservative DPO (also spelled label_smoothing)."""
    sft_weight: float = 0.0
    """Weight of an SFT term (mean NLL of the chosen response) added to the DPO loss."""
    ld_alpha: float = 1.0
    """LD-DPO: weight of the longer response's tokens beyond the shorter one's length (1.0 = plain DPO)."""
    kto_desirable_weight: float = 1.0
    """KTO: weight of a desirable example's loss, lambda_D in lambda_D (1 - sigmoid(beta (r - z)))."""
    kto_undesirable_weight: float = 1.0
    """KTO: weight of an undesirable example's loss, lambda_U in lambda_U (1 - sigmoid(beta (z - r)))."""
    ref_model_path: Optional[str] = None
    """DPO's and KTO's reference model (default: the starting model)."""
    center_rewards_coefficient: Optional[float] = None
    """Reward model (rm): adds coefficient x mean over pairs of (r_chosen + r_rejected)^2, centring the rewards on 0 (TRL's)."""
    precompute_ref_log_probs: Optional[bool] = None
    """Compute reference log-probs once before training and keep them beside the token cache, reused
    across epochs and runs (default: on for full fine-tuning; LoRA uses the base with its adapter disabled)."""

    def __post_init__(self) -> None:
        _one_of("pref_loss", self.pref_loss, PREF_LOSSES)

    @property
    def reference_free(self) -> bool:
        return self.pref_loss in REFERENCE_FREE_LOSSES


GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
GRPO_ADVANTAGES = ("grpo", "rloo")


@dataclass
class GRPOArgs:
    """Reinforcement learning (training_stage grpo): rollouts, rewards and the clipped objective"""

    aliases: ClassVar[dict[str, str]] = {"max_new_tokens": "max_completion_length"}

    num_generations: int = 8
    """Completions sampled per prompt (the group whose rewards are compared)."""
    max_completion_length: int = 64
    """Most tokens a completion may have (also spelled max_new_tokens); dr_grpo divides by it."""
    temperature: float = 1.0
    """Rollout sampling temperature; the policy's log-probs use the same temperature."""
    top_p: float = 1.0
    """Rollout nucleus sampling (1: off)."""
    top_k: int = 0
    """Rollout top-k sampling (0: off)."""
    reward_functions: Optional[list[str]] = None
    """Built-ins (exact_match, single_line) or module:function / file.py:function (unset: [exact_match] without reward_models)."""
    reward_models: list[str] = field(default_factory=list)
    """Reward model directories (training_stage rm); each scores the chat-rendered prompt + completion."""
    reward_weights: Optional[list[float]] = None
    """One weight per reward function, then one per reward model (default: 1 each); the reward is their weighted sum."""
    advantage: str = "grpo"
    """grpo: the group-normalised reward (scale_rewards); rloo: r minus the mean of the group's other rewards."""
    scale_rewards: bool = True
    """Advantages (r - mean) / (std + 1e-4) within each group; false: r - mean (Dr. GRPO). advantage grpo only."""
    epsilon: float = 0.2
    """Clip range of the importance ratio: [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: Optional[float] = None
    """Upper clip (DAPO's clip-higher; default: epsilon)."""
    beta: float = 0.0
    """Weight of the k3 KL term against the reference (the starting model; the LoRA base with its adapter
    disabled); 0: no reference is built."""
    loss_type: str = "grpo"
    """grpo (mean per sequence, then over sequences), dapo (mean over the step's tokens) or dr_grpo
    (sum / (sequences x max_completion_length))."""
    num_iterations: int = 1
    """Optimiser steps per generation round, each over the same rollouts (ratios against their old log-probs)."""

    def __post_init__(self) -> None:
        _one_of("loss_type", self.loss_type, GRPO_LOSS_TYPES)
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (a group of one has no advantage), got {self.num_generations}"
            )
        for key in ("max_completion_length", "num_iterations"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not (0 < self.temperature <= 100 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError("expected 0 < temperature <= 100, 0 < top_p <= 1 and top_k >= 0 for the rollouts")
        if not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and not self.epsilon_high >= 0):
            raise ValueError(
                f"expected 0 <= epsilon < 1 and epsilon_high >= 0, got {self.epsilon}, {self.epsilon_high}"
            )
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        _one_of("advantage", self.advantage, GRPO_ADVANTAGES)
        functions = self.reward_function_specs
        if not functions and not self.reward_models:
            raise ValueError("training_stage grpo needs reward_functions or reward_models; both are empty")
        if self.reward_weights is not None and len(self.reward_weights) != len(functions) + len(self.reward_models):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(functions)} "
                f"reward_functions and {len(self.reward_models)} reward_models (one per function, then one per model)"
            )

    @property
    def reward_function_specs(self) -> list[str]:
        """The functions in use; unset: none beside reward models, else exact match (not set in __post_init__:
        the parser takes its defaults from an instance)."""
        if self.reward_functions is not None:
            return self.reward_functions
        return [] if self.reward_models else ["exact_match"]


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
    local_rank: int = -1
    """Set by launchers; accepted for compatibility."""
    release_freed_memory: Optional[bool] = None
    """Hand freed blocks of 128 KiB or more straight back to the OS (fixed glibc malloc thresholds on
    Linux): a lower host RSS, a few page faults more per step. Default (null): on under DeepSpeed
    ZeRO-3, whose ranks gather and free every weight each step; off otherwise."""


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
    csv (output_dir/csv): a list, names joined by commas, or none. wandb, mlflow: pip install 'bumblecore[wandb]'."""
    use_tensorboard: Optional[bool] = None
    """The original's switch: true adds tensorboard to report_to, false removes it; unset leaves report_to as is."""
    run_name: Optional[str] = None
    """The run's name in the trackers (W&B run, MLflow run); default: output_dir's folder name."""
    tracker_project: str = "bumblecore"
    """The W&B project / MLflow experiment the run is logged under."""

    def __post_init__(self) -> None:  # report_to resolved: training_args.yaml shows the run's trackers
        entries = [self.report_to] if isinstance(self.report_to, str) else self.report_to or []  # `wandb,mlflow` too
        names = [
            n for n in dict.fromkeys(n.strip().lower() for e in entries for n in e.split(",")) if n != "none" and n
        ]
        if "swanlab" in names:  # swanlab 0.10 pins protobuf < 7 (ours is 7): untested here, so not offered
            raise ValueError("report_to swanlab is not supported yet; use tensorboard, wandb, mlflow or csv")
        for name in names:
            _one_of("report_to", name, ("tensorboard", "wandb", "mlflow", "csv"))  # train/trackers.py opens them
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
