"""KTO (Ethayarajh et al. 2024) as a stage of the shared engine: unpaired completions labelled
desirable or undesirable.

A batch holds n examples as 2n rows, [completion_1 .. completion_n, KL_1 .. KL_n]: example i's prompt
with its own completion, then the same prompt with the next record's completion (data/formats.py,
kto_examples). With logp the summed log-probability of a row's completion tokens:

    r_i = logp(y_i | x_i) - logp_ref(y_i | x_i)
    z   = max(0, mean over this micro-batch's KL rows of logp(y'_i | x_i) - logp_ref(y'_i | x_i)), no gradient
    desirable:   L_i = kto_desirable_weight   * (1 - sigmoid(beta (r_i - z)))
    undesirable: L_i = kto_undesirable_weight * (1 - sigmoid(beta (z - r_i)))

beta = pref_beta. z belongs to the micro-batch, so a step splits into the same z's however it is spread
over accumulation and devices. The reference is DPO's (train/dpo.py, build_reference).
"""

from __future__ import annotations

import torch

from bumblecore.train.dpo import build_reference, response_token_logps
from bumblecore.train.losses import kto_loss, kto_reference_point


def _rows(batch: dict, rows: slice) -> dict:
    return {key: batch[key][rows] for key in ("input_ids", "labels", "position_ids")}


class KTOStage:
    """count(batch) = examples; loss(model, batch) = the summed per-example losses and summed metrics,
    which the engine divides by the examples of the whole step (across accumulation and devices)."""

    reports_perplexity = False
    headline_metrics = ("rewards/chosen", "rewards/rejected")  # beside the eval loss in the terminal's eval line
    summary = ""

    def __init__(
        self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, reference=None
    ):
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.reference = reference

    def count(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def loss(self, model, batch: dict):
        n = int(batch["num_pairs"])
        with torch.no_grad():  # the KL rows only give z, a constant of the step (their own forward: no graph)
            policy_kl = response_token_logps(model, _rows(batch, slice(n, None)))[0].sum(-1)
        policy = response_token_logps(model, _rows(batch, slice(0, n)))[0].sum(-1)
        if "reference_logps" in batch:
            reference = batch["reference_logps"].to(policy.device, torch.float32)
        else:
            reference = self.reference.logps(batch).float()
        z = kto_reference_point(policy_kl, reference[n:])
        desirable = batch["desirable"].to(policy.device)
        losses = kto_loss(
            policy, reference[:n], desirable, z, self.beta, self.desirable_weight, self.undesirable_weight
        )
        with torch.no_grad():
            rewards = self.beta * (policy - reference[:n])
            undesirable = ~desirable
            # kl and share/desirable: per example (the engine divides by the step's examples); the rewards and
            # log-probs: (sum, count) over the desirable or the undesirable examples, means of their own.
            chosen, rejected = desirable.sum(), undesirable.sum()
            metrics = {
                "kl": z * n,
                "share/desirable": desirable.float().sum(),
                "rewards/chosen": ((rewards * desirable).sum(), chosen),
                "rewards/rejected": ((rewards * undesirable).sum(), rejected),
                "logps/chosen": ((policy.detach() * desirable).sum(), chosen),
                "logps/rejected": ((policy.detach() * undesirable).sum(), rejected),
            }
        return losses.sum(), metrics


def build_kto_stage(fabric, run, model, units, eval_units, pad_id: int, resuming: bool, load_reference_model):
    """The stage and `attach(batches, split)`, as dpo.build_preference_stage gives them."""
    preference = run.preference
    stage = KTOStage(preference.pref_beta, preference.kto_desirable_weight, preference.kto_undesirable_weight)
    stage.reference, attach, kind = build_reference(
        fabric, run, model, units, eval_units, pad_id, resuming, load_reference_model
    )
    stage.summary = (
        f"kto: beta {preference.pref_beta}, desirable weight {preference.kto_desirable_weight}, "
        f"undesirable weight {preference.kto_undesirable_weight}; reference {kind}"
    )
    return stage, attach
