"""The settings groups of the preference stages (dpo, kto, rm: PreferenceArgs) and of reinforcement
learning (grpo: GRPOArgs), with the names their keys take. bumblecore/args/__init__.py holds the other
groups and the run (TrainArgs) and re-exports these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

PREF_LOSSES = ("sigmoid", "ipo", "orpo", "simpo")
# Preference losses of the policy alone: no reference model is built, loaded or cached for them.
REFERENCE_FREE_LOSSES = ("orpo", "simpo")
# Preference losses that hold the chosen response's NLL already (an sft_weight would count it twice).
LOSSES_WITH_NLL = ("orpo",)


def one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} {value!r} is not one of {', '.join(allowed)}")


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
        one_of("pref_loss", self.pref_loss, PREF_LOSSES)

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
        one_of("loss_type", self.loss_type, GRPO_LOSS_TYPES)
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
        one_of("advantage", self.advantage, GRPO_ADVANTAGES)
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
