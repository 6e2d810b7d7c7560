"""The reward model (training_stage rm): Bradley-Terry on preference pairs, as a stage of the shared engine.

A batch holds n pairs as 2n rows, [chosen_1 .. chosen_n, rejected_1 .. rejected_n], each the whole
conversation as the chat template renders it, through one forward of the reward model
(model/reward.py); each row's reward r is its score at its last non-pad token. With m a pair's
`margin` (0 when its record has none) and c = center_rewards_coefficient:

    L = -log sigmoid(r_chosen - r_rejected - m) + c (r_chosen + r_rejected)^2

summed over the pairs here; the engine divides by the step's pairs, so the logged `loss` is TRL
RewardTrainer's: the mean over pairs of the first term plus c x the mean of (r_chosen + r_rejected)^2.
Metrics (means over the step's pairs, every rank's): rewards/accuracies (r_chosen > r_rejected),
rewards/margins (r_chosen - r_rejected), rewards/chosen and rewards/rejected, and their standard
deviations over the pairs (rewards/chosen_std, from the summed squares: sqrt(E[r^2] - E[r]^2)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bumblecore.model.reward import pooled

SIDES = ("chosen", "rejected")


def pair_rewards(model, batch: dict, pad_token_id) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), (n,) float32 each: one forward over the batch's 2n rows."""
    n = int(batch["num_pairs"])
    scores = model(batch["input_ids"], position_ids=batch.get("position_ids"))
    rewards = pooled(scores, batch["input_ids"], pad_token_id)
    return rewards[:n], rewards[n:]


def reward_loss(chosen, rejected, margin=None, center_coefficient: float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_c - r_r - margin) + center_coefficient (r_c + r_r)^2."""
    difference = chosen - rejected - (margin if margin is not None else 0.0)
    losses = -F.logsigmoid(difference)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


class RewardStage:
    """count(batch) = pairs; loss(model, batch) = the summed pair losses and summed metrics."""

    reports_perplexity = False
    headline_metrics = ("rewards/accuracies", "rewards/margins")  # beside the eval loss in the terminal

    def __init__(self, pad_token_id, center_rewards_coefficient: float = 0.0):
        self.pad_token_id = pad_token_id
        self.center = center_rewards_coefficient or 0.0
        self.summary = (
            "reward model: -log sigmoid(r_chosen - r_rejected - margin)"
            + (f" + {self.center} (r_chosen + r_rejected)^2" if self.center else "")
            + f"; rewards read at each row's last non-pad token (pad id {pad_token_id})"
        )

    def count(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def loss(self, model, batch: dict):
        chosen, rejected = pair_rewards(model, batch, self.pad_token_id)
        margin = batch.get("margin")
        total = reward_loss(chosen, rejected, margin.to(chosen) if margin is not None else None, self.center).sum()
        with torch.no_grad():  # float64 sums: the std's E[r^2] - E[r]^2 cancels digits
            chosen, rejected = chosen.double(), rejected.double()
            metrics = {
                "rewards/accuracies": (chosen > rejected).float().sum(),
                "rewards/margins": (chosen - rejected).sum(),
            }
            for side, rewards in zip(SIDES, (chosen, rejected)):
                metrics[f"rewards/{side}"] = rewards.sum()
                metrics[f"rewards/{side}_squared"] = (rewards**2).sum()
        return total, metrics

    def finish_record(self, record: dict) -> dict:
        """The standard deviations from the step's (or evaluation's) mean rewards and mean squares."""
        for prefix in ("", "eval/"):
            for side in SIDES:
                squared = record.pop(f"{prefix}rewards/{side}_squared", None)
                if squared is not None:
                    mean = record[f"{prefix}rewards/{side}"]
                    record[f"{prefix}rewards/{side}_std"] = math.sqrt(max(0.0, squared - mean * mean))
        return record
