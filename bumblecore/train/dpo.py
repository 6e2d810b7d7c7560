"""DPO (and IPO): preference training as a stage of the shared engine.

A batch holds n pairs as 2n rows, [chosen_1 .. chosen_n, rejected_1 .. rejected_n], through one
forward. With logp(y) the summed log-probability of a response's target tokens (its content and
`<|im_end|>`), h = (logp(y_w) - logp_ref(y_w)) - (logp(y_l) - logp_ref(y_l)):

    sigmoid   L = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)     e = dpo_label_smoothing
    ipo       L = (h' - 1 / (2 beta))^2, h' built from per-token means
    sft       L += sft_weight * (-logp(y_w) / |y_w|)
    LD-DPO    the policy's logp weighs tokens past the shorter response's length by ld_alpha

The reference is the LoRA base with its adapter disabled (no second copy), a frozen model, or
log-probs computed once before training and kept on disk beside the token cache.

Reference-free, from the per-token means m(y) = logp(y) / |y| (no reference is built, loaded or cached;
beta = pref_beta, ORPO's lambda):

    orpo      L = -m(y_w) + beta * -log sigmoid(log odds(y_w) - log odds(y_l)),  odds = p / (1 - p), p = exp(m)
    simpo     L = -log sigmoid(beta (m(y_w) - m(y_l)) - simpo_gamma)
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import torch

from bumblecore.args import LOSSES_WITH_NLL, REFERENCE_FREE_LOSSES
from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.train.losses import (
    chunked_token_logps,
    length_desensitized_weights,
    preference_loss,
    reference_free_loss,
    shift_targets,
)
from bumblecore.train.runtime import evaluating

REFERENCE_FORMAT_VERSION = 1


def response_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probs of the next token (0 where not a target) and the shifted targets."""
    targets = shift_targets(batch["labels"])
    hidden = model(batch["input_ids"], position_ids=batch.get("position_ids"), return_hidden_states=True)
    return chunked_token_logps(hidden, model.lm_head, targets), targets


# ---------------------------------------------------------------------------- references


def _bare(model):
    """The module under Fabric's and DDP's wrappers (a reference forward needs neither: no gradients)."""
    return getattr(model, "module", model)


class AdapterDisabledReference:
    """LoRA: the reference is the policy with its adapter switched off, so no second model exists."""

    def __init__(self, policy):
        self.policy = policy

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        peft_model = _bare(self.policy)
        with evaluating(peft_model), peft_model.disable_adapter():
            token_logps, _ = response_token_logps(peft_model, batch)
        return token_logps.sum(-1)


class ModelReference:
    """A model evaluated without gradients: a frozen copy (the starting weights, or ref_model_path),
    or, before the first optimiser step, the policy itself (it equals the reference then)."""

    def __init__(self, model, freeze: bool = True):
        self.model = model.requires_grad_(False) if freeze else model

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        with evaluating(self.model):
            token_logps, _ = response_token_logps(self.model, batch)
        return token_logps.sum(-1)


def model_fingerprint(model_dir) -> str:
    """A content hash of a model directory's config and weights (what reference log-probs depend on)."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for file in sorted(root.iterdir()):
        if file.is_file() and (file.name == "config.json" or file.suffix in (".safetensors", ".bin")):
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:24]


def reference_cache_file(units, reference_dir, precision: str) -> Path:
    """Where the reference log-probs of these pairs live: inside their token cache entry, keyed by
    the reference model's content and the precision they were computed in."""
    key = hashlib.sha256(
        f"v{REFERENCE_FORMAT_VERSION}|{model_fingerprint(reference_dir)}|{precision}".encode()
    ).hexdigest()[:16]
    return Path(units.cache.directory) / f"reference_logps-{key}.npy"


@torch.no_grad()
def compute_reference_logps(
    fabric, reference, units, batch_size: int, pad_id: int, progress: bool = False
) -> np.ndarray:
    """(pairs, 2) summed reference log-probs [chosen, rejected] for every pair; each rank computes a
    strided share, then one all-reduce gives every rank the whole table."""
    from bumblecore.data.loader import eval_batches
    from bumblecore.train.engine import in_lockstep

    table = torch.zeros(len(units), 2, dtype=torch.float64, device=fabric.device)
    batches = eval_batches(
        units, batch_size, pad_id, packing=False, world_size=fabric.world_size, rank=fabric.global_rank
    )
    if progress and fabric.is_global_zero:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="reference log-probs", dynamic_ncols=True)
    for batch, counted in in_lockstep(fabric, batches):  # ZeRO-3: every rank runs as many forwards
        batch = fabric.to_device(batch)
        with fabric.autocast():
            sums = reference.logps(batch).double()
        n = batch["num_pairs"]
        if counted:
            table[batch["unit_indices"]] = torch.stack([sums[:n], sums[n:]], dim=-1)
    if fabric.world_size > 1:
        table = fabric.all_reduce(table, reduce_op="sum")
    return table.cpu().numpy()


def cached_reference_logps(
    fabric, reference_factory, units, cache_file: Path, batch_size: int, pad_id: int
) -> np.ndarray:
    """The table from cache_file, or computed (reference_factory() builds the reference) and saved atomically.

    Rank 0 decides and broadcasts the table it found, so every rank computes or none does (a node
    without a shared filesystem has no copy of its own); each node's first rank saves it."""
    table = None
    if fabric.is_global_zero and cache_file.is_file():
        found = np.load(cache_file)
        table = found if found.shape == (len(units), 2) else None
    if fabric.world_size > 1:
        table = fabric.broadcast(table)
    if table is not None:
        fabric.print(f"reference log-probs: reusing {cache_file}")
        return table
    table = compute_reference_logps(fabric, reference_factory(), units, batch_size, pad_id, progress=True)
    if fabric.local_rank == 0:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, table)
        os.replace(tmp, cache_file)  # a half-written table is never found under the real name
        fabric.print(f"reference log-probs: computed for {len(units)} pairs, saved to {cache_file}")
    fabric.barrier()
    return table


class StepsWithReference:
    """Wraps a step loader (or a list of eval batches) so each batch carries its pairs' cached
    reference log-probs as `reference_logps` (2n,), [chosen..., rejected...]."""

    def __init__(self, batches, table: np.ndarray):
        self.batches, self.table = batches, torch.from_numpy(table)

    def __getattr__(self, name):  # steps_per_epoch, global_size ... of the wrapped loader
        return getattr(self.__dict__["batches"], name)

    def attach(self, batch: dict) -> dict:
        rows = self.table[batch["unit_indices"]]
        return {**batch, "reference_logps": torch.cat([rows[:, 0], rows[:, 1]])}

    def micro_batches(self, step: int) -> list[dict]:
        return [self.attach(b) for b in self.batches.micro_batches(step)]

    def __iter__(self):
        return (self.attach(b) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ---------------------------------------------------------------------------- the stage


class PreferenceStage:
    """count(batch) = pairs; loss(model, batch) = summed per-pair loss and summed metrics, which the
    engine divides by the pairs of the whole step (across accumulation and devices)."""

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        ld_alpha: float = 1.0,
        reference=None,
        simpo_gamma: float = 0.5,
    ):
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.sft_weight, self.ld_alpha, self.reference = sft_weight, ld_alpha, reference
        self.simpo_gamma = simpo_gamma

    reports_perplexity = False  # exp(DPO loss) means nothing
    headline_metrics = ("rewards/accuracies", "rewards/margins")  # beside the eval loss in the terminal's eval line
    summary = ""

    def count(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def loss(self, model, batch: dict):
        n = int(batch["num_pairs"])
        token_logps, targets = response_token_logps(model, batch)
        lengths = (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
        plain = token_logps.sum(-1)
        if self.loss_type in REFERENCE_FREE_LOSSES:
            return self._reference_free_loss(n, plain, lengths)
        if self.ld_alpha != 1.0:
            policy = (token_logps * length_desensitized_weights(targets, n, self.ld_alpha)).sum(-1)
        else:
            policy = plain
        if "reference_logps" in batch:
            reference = batch["reference_logps"].to(policy.device, torch.float32)
        else:
            reference = self.reference.logps(batch).float()

        if self.loss_type == "ipo":  # IPO compares per-token means
            pair_losses = preference_loss(
                policy[:n] / lengths[:n],
                policy[n:] / lengths[n:],
                reference[:n] / lengths[:n],
                reference[n:] / lengths[n:],
                self.beta,
                "ipo",
            )
        else:
            pair_losses = preference_loss(
                policy[:n], policy[n:], reference[:n], reference[n:], self.beta, "sigmoid", self.label_smoothing
            )
        total = pair_losses.sum()
        metrics = {f"loss/{'ipo' if self.loss_type == 'ipo' else 'dpo'}": total.detach()}
        if self.sft_weight:
            chosen_nll = (-plain[:n] / lengths[:n]).sum()
            total = total + self.sft_weight * chosen_nll
            metrics["loss/sft"] = chosen_nll.detach()

        with torch.no_grad():
            metrics.update(
                reward_metrics(
                    self.beta * (policy[:n] - reference[:n]), self.beta * (policy[n:] - reference[n:]), policy, n
                )
            )
        return total, metrics

    def _reference_free_loss(self, n: int, logps: torch.Tensor, lengths: torch.Tensor):
        """ORPO / SimPO from per-token means; the rewards are what each loss compares inside its sigmoid."""
        means = logps / lengths
        pair_losses, chosen_rewards, rejected_rewards = reference_free_loss(
            means[:n], means[n:], self.beta, self.loss_type, self.simpo_gamma
        )
        total = pair_losses.sum()
        chosen_nll = (-means[:n]).sum()
        if self.loss_type in LOSSES_WITH_NLL:  # orpo's two terms apart: the NLL, and the odds-ratio term before lambda
            metrics = {
                "loss/nll": chosen_nll.detach(),
                "loss/orpo": -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).detach().sum(),
            }
        else:
            metrics = {"loss/simpo": total.detach()}
        if self.sft_weight:  # simpo only: orpo's NLL term is already there
            total = total + self.sft_weight * chosen_nll
            metrics["loss/sft"] = chosen_nll.detach()
        with torch.no_grad():
            metrics.update(reward_metrics(chosen_rewards, rejected_rewards, logps, n))
        return total, metrics


def reward_metrics(chosen_rewards, rejected_rewards, logps, n: int) -> dict:
    """The preference metrics every loss logs, as sums over the pairs (the engine divides by pairs)."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "logps/chosen": logps[:n].detach().sum(),
        "logps/rejected": logps[n:].detach().sum(),
    }


def build_preference_stage(fabric, run, model, units, eval_units, pad_id: int, resuming: bool, load_reference_model):
    """The stage, and `attach(batches, split)` that gives a loader (split "train") or eval batches
    ("eval") their cached reference log-probs when those are precomputed (identity otherwise).

    load_reference_model(path) builds a model on the host; it is used for ref_model_path, and for
    full fine-tuning when the policy no longer equals its starting weights (a resumed run)."""
    preference = run.preference
    if preference.reference_free:
        stage = PreferenceStage(
            preference.pref_beta,
            preference.pref_loss,
            sft_weight=preference.sft_weight,
            simpo_gamma=preference.simpo_gamma,
        )
        terms = (
            f"lambda (pref_beta) {preference.pref_beta}"
            if preference.pref_loss in LOSSES_WITH_NLL
            else f"beta {preference.pref_beta}, gamma {preference.simpo_gamma}, sft_weight {preference.sft_weight}"
        )
        stage.summary = f"preference: {preference.pref_loss} loss, {terms}; no reference model (reference-free)"
        return stage, lambda batches, split="train": batches

    stage = PreferenceStage(
        preference.pref_beta,
        preference.pref_loss,
        preference.dpo_label_smoothing,
        preference.sft_weight,
        preference.ld_alpha,
    )
    stage.reference, attach, kind = build_reference(
        fabric, run, model, units, eval_units, pad_id, resuming, load_reference_model
    )
    stage.summary = (
        f"preference: {preference.pref_loss} loss, beta {preference.pref_beta}, "
        f"label smoothing {preference.dpo_label_smoothing}, "
        f"sft_weight {preference.sft_weight}, ld_alpha {preference.ld_alpha}; reference {kind}"
    )
    return stage, attach


def build_reference(fabric, run, model, units, eval_units, pad_id: int, resuming: bool, load_reference_model):
    """The reference of a stage whose units are two rows (DPO's pairs, KTO's example and KL row):
    (live reference or None, attach(batches, split), what it is in words). With precomputed log-probs
    the live reference is None and attach gives the batches their cached table's rows."""
    preference = run.preference
    lora = run.model.finetuning_type == "lora"
    precompute = preference.precompute_ref_log_probs if preference.precompute_ref_log_probs is not None else not lora
    reference_dir = preference.ref_model_path or run.model.model_name_or_path

    def separate_reference():
        return ModelReference(fabric.to_device(load_reference_model(reference_dir)))

    # The reference that needs no second model, where there is one: the LoRA base, or (only for the
    # precompute, before any step) the policy itself.
    reference_for_table = None
    if lora and not preference.ref_model_path:
        reference_for_table = AdapterDisabledReference(model)
    elif precompute and not preference.ref_model_path and not resuming:
        reference_for_table = ModelReference(model, freeze=False)

    kind = (
        "the base with the LoRA adapter disabled"
        if lora and not preference.ref_model_path
        else f"{'frozen ' if not precompute else ''}{reference_dir}"
    ) + (", log-probs precomputed and cached" if precompute else ", computed live")
    if not precompute:
        return reference_for_table or separate_reference(), lambda batches, split="train": batches, kind

    built = []

    def table_reference():  # a separate reference is loaded at most once, and dropped after the tables
        if reference_for_table is not None:
            return reference_for_table
        if not built:
            built.append(separate_reference())
        return built[0]

    tables = {}
    for split, pairs in (("train", units), ("eval", eval_units)):
        if pairs is not None:
            tables[split] = cached_reference_logps(
                fabric,
                table_reference,
                pairs,
                reference_cache_file(pairs, reference_dir, run.optimization.train_model_precision),
                run.optimization.train_micro_batch_size_per_gpu,
                pad_id,
            )
    return None, lambda batches, split="train": StepsWithReference(batches, tables[split]), kind
