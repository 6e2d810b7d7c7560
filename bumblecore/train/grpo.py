"""GRPO (Shao et al. 2024) as a stage of the shared engine: the policy samples, the rewards judge, the
clipped objective of train/grpo_loss.py learns from the difference within each group.

A generation round serves `num_iterations` optimiser steps. At a round's first step each rank takes
its share of the round's prompts, samples `num_generations` completions of each with the generation
engine (inference/generate.py: the batched KV-cache decoder that serves requests, on the current
policy), scores them with the reward functions (train/rewards.py) and turns the rewards into group
advantages. Every step of the round trains on those rollouts: the first against log-probs equal to
its own (ratio 1), later ones against the log-probs the rollouts had when sampled ("old").

Rows are laid out as a step of the other stages: micro x accumulation completions per rank, whole
groups per rank (each rank generates for its own prompts, so advantages need no communication).
Which prompts a round takes and each completion's sampling seed depend only on (seed, round,
position), never on how the step is spread over processes: DDP equals accumulation, and a resumed
run continues with the rollouts it had (they are saved with the checkpoint, gathered from every rank).

The policy's log-probs use the rollout temperature, logits / temperature, as the sampler did.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from bumblecore.args import GRPOArgs
from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.train.grpo_loss import aggregate, group_advantages, token_terms, unit_count
from bumblecore.train.losses import chunked_token_logps, shift_targets
from bumblecore.train.rewards import RewardFunction, reward_names, score
from bumblecore.train.runtime import evaluating


def unwrapped(model):
    """The module under Fabric's wrapper (and DDP's or DeepSpeed's): what the generation engine decodes with."""
    model = getattr(model, "_original_module", model)
    while hasattr(model, "module") and not hasattr(model, "lm_head"):
        model = model.module
    return model


class TemperatureHead:
    """The LM head with its logits divided by the rollout temperature (the weight stays visible to the
    chunked log-prob code, which checks it for ZeRO-3 partitioning)."""

    def __init__(self, head, temperature: float):
        self.head, self.temperature, self.weight = head, temperature, getattr(head, "weight", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) / self.temperature


def completion_token_logps(model, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position log-prob of the next token, 0 off the completions; mask of completion targets)."""
    targets = shift_targets(batch["labels"])
    hidden = model(batch["input_ids"], position_ids=batch.get("position_ids"), return_hidden_states=True)
    head = model.lm_head if temperature == 1.0 else TemperatureHead(model.lm_head, temperature)
    return chunked_token_logps(hidden, head, targets), targets != IGNORE_INDEX


def completion_seed(seed: int, round_index: int, position: int, generation: int) -> int:
    """The sampling seed of one completion: a function of where it sits, not of which rank samples it."""
    value = seed
    for part in (round_index, position, generation):
        value = (value * 1_000_003 + part + 1) % (1 << 62)
    return value


# ---------------------------------------------------------------------------- the stage


class GRPOStage:
    """count(batch): sequences, completion tokens or sequences x max_completion_length (loss_type);
    loss(model, batch): the summed token terms, and the round's reward statistics."""

    reports_perplexity = False
    headline_metrics = ("reward",)  # the greedy answers' mean reward, beside the (zero) eval loss

    def __init__(self, grpo: GRPOArgs, names: list[str]):
        self.grpo, self.names = grpo, names
        self.epsilon_high = grpo.epsilon if grpo.epsilon_high is None else grpo.epsilon_high
        self.summary = (
            f"grpo: {grpo.num_generations} completions per prompt (<= {grpo.max_completion_length} tokens, "
            f"temperature {grpo.temperature}, top_p {grpo.top_p}), rewards {', '.join(names)}, "
            f"advantage {grpo.advantage}, loss {grpo.loss_type}, "
            f"clip [{1 - grpo.epsilon:g}, {1 + self.epsilon_high:g}], beta {grpo.beta}, "
            f"{grpo.num_iterations} step(s) per round"
        )

    def count(self, batch: dict) -> int:
        mask = shift_targets(batch["labels"]) != IGNORE_INDEX
        return unit_count(mask, self.grpo.loss_type, self.grpo.max_completion_length)

    def loss(self, model, batch: dict):
        grpo = self.grpo
        logps, mask = completion_token_logps(model, batch, grpo.temperature)
        old = batch.get("old_logps")
        terms = token_terms(
            logps,
            logps.detach() if old is None else old,
            batch["advantages"],
            mask,
            grpo.epsilon,
            self.epsilon_high,
            grpo.beta,
            batch.get("ref_logps"),
        )
        loss_sum, _ = aggregate(terms.loss, mask, grpo.loss_type, grpo.max_completion_length)
        with torch.no_grad():
            rows, tokens = mask.shape[0], mask.sum()
            metrics = {
                "reward": (batch["rewards"].sum(), rows),
                "reward_std": (batch["group_std"][:, -1].sum(), rows),
                "frac_reward_zero_std": ((batch["group_std"][:, -1] == 0).sum(), rows),
                "completions/mean_length": (mask.sum(-1).sum(), rows),
                "completions/clipped_ratio": (batch["truncated"].sum(), rows),
                "clip_ratio": (terms.clipped.sum(), tokens),
            }
            for j, name in enumerate(self.names):
                metrics[f"rewards/{name}/mean"] = (batch["reward_table"][:, j].sum(), rows)
                metrics[f"rewards/{name}/std"] = (batch["group_std"][:, j].sum(), rows)
            if grpo.beta:
                metrics["kl"] = (terms.kl.sum(), tokens)
        return loss_sum, metrics


# ---------------------------------------------------------------------------- rollouts


@dataclass
class RoundPlan:
    prompts_per_rank: int
    rounds_per_epoch: int


class RolloutLoader:
    """The step-indexed loader of GRPO: micro_batches(step) generates the round's rollouts at the
    round's first step (or finds them restored from a checkpoint) and lays them out as micro-batches.
    `bind(model, reference)` gives it the policy (and the KL reference) once Fabric has set them up."""

    def __init__(
        self,
        prompts: list,
        tokenizer,
        grpo: GRPOArgs,
        functions: list[RewardFunction],
        micro_batch_size: int,
        accumulation: int,
        world_size: int,
        rank: int,
        seed: int,
        pad_id: int,
        eos_ids: list[int],
    ):
        per_rank = micro_batch_size * accumulation
        if per_rank % grpo.num_generations:
            raise ValueError(
                f"train_micro_batch_size_per_gpu x gradient_accumulation_steps = {per_rank} completions per process "
                f"and step must be a multiple of num_generations {grpo.num_generations} (whole groups per process)"
            )
        prompts_per_rank = per_rank // grpo.num_generations
        rounds = len(prompts) // (prompts_per_rank * world_size)
        if rounds < 1:
            raise ValueError(
                f"dataset_path: {len(prompts)} prompts, fewer than the {prompts_per_rank * world_size} one round "
                f"takes ({per_rank} completions per process / num_generations {grpo.num_generations} x "
                f"{world_size} process(es))"
            )
        self.prompts, self.tokenizer, self.grpo, self.functions = prompts, tokenizer, grpo, functions
        self.micro_batch_size, self.accumulation, self.world_size, self.rank = (
            micro_batch_size,
            accumulation,
            world_size,
            rank,
        )
        self.seed, self.pad_id, self.eos_ids = seed, pad_id, eos_ids
        self.plan = RoundPlan(prompts_per_rank, rounds)
        self.global_size = per_rank * world_size
        self.steps_per_epoch = rounds * grpo.num_iterations
        self.model, self.reference, self.autocast = None, None, contextlib.nullcontext
        self.rollouts: dict | None = None
        self.device = torch.device("cpu")

    def bind(self, model, reference=None, device=None, autocast=None) -> None:
        self.model, self.reference = model, reference
        self.device = device or self.device
        self.autocast = autocast or contextlib.nullcontext

    def total_steps(self, num_epochs: float, max_steps=None) -> int:
        """As the other stages' loader counts them (data/loader.py)."""
        if max_steps:
            return max_steps
        return max(1, math.ceil(num_epochs * self.steps_per_epoch))

    # ------------------------------------------------------------------ the step

    def micro_batches(self, step: int) -> list[dict]:
        round_index = step // self.grpo.num_iterations
        if self.rollouts is None or self.rollouts["round"] != round_index:
            self.rollouts = self.roll_out(round_index)
        rows = range(self.micro_batch_size * self.accumulation)
        return [
            self.collate(self.rollouts, rows[i * self.micro_batch_size : (i + 1) * self.micro_batch_size])
            for i in range(self.accumulation)
        ]

    def round_prompts(self, round_index: int) -> list[tuple[int, object]]:
        """This rank's (position in the round, prompt) pairs: an epoch's order is a seeded permutation."""
        epoch, within = divmod(round_index, self.plan.rounds_per_epoch)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
        per_round = self.plan.prompts_per_rank * self.world_size
        start = within * per_round + self.rank * self.plan.prompts_per_rank
        return [
            (self.rank * self.plan.prompts_per_rank + i, self.prompts[int(order[start + i])])
            for i in range(self.plan.prompts_per_rank)
        ]

    @torch.no_grad()
    def roll_out(self, round_index: int) -> dict:
        from bumblecore.inference.generate import SamplingParams

        grpo, group = self.grpo, self.grpo.num_generations
        rows = [(position, prompt, g) for position, prompt in self.round_prompts(round_index) for g in range(group)]
        params = [
            SamplingParams(
                max_new_tokens=grpo.max_completion_length,
                do_sample=True,
                temperature=grpo.temperature,
                top_p=grpo.top_p,
                top_k=grpo.top_k,
                seed=completion_seed(self.seed, round_index, position, g),
            )
            for position, _, g in rows
        ]
        rollouts = {"round": round_index, **self.sample([prompt for _, prompt, _ in rows], params, group)}
        if grpo.num_iterations > 1:  # later steps of the round weigh their ratio against these
            rollouts["old_logps"] = self._row_logps(rollouts, self.model)
        if grpo.beta:
            rollouts["ref_logps"] = self._row_logps(rollouts, None)
        return rollouts

    @torch.no_grad()
    def sample(self, prompts: list, params: list, group: int) -> dict:
        """Completions of `prompts` (consecutive groups of `group` rows) by the current policy, scored."""
        from bumblecore.inference.generate import GenerationEngine

        policy = unwrapped(self.model)
        with evaluating(policy):
            engine = GenerationEngine(
                policy,
                self.tokenizer,
                max_batch_size=len(prompts),
                max_len=max(len(prompt.ids) for prompt in prompts) + self.grpo.max_completion_length,
                eos_token_ids=self.eos_ids,
            )
            results = engine.generate([prompt.ids for prompt in prompts], params)
            del engine  # its prepared weights are of this round's policy
        for result in results:
            if "error" in result:
                raise RuntimeError(f"a GRPO rollout failed: {result['error']}")
        keys = sorted({key for prompt in prompts for key in prompt.fields})
        fields = {key: [prompt.fields.get(key) for prompt in prompts] for key in keys}
        table, total = score(self.functions, [p.messages for p in prompts], [r["text"] for r in results], fields)
        table = torch.tensor(table, dtype=torch.float64).T.reshape(len(prompts), -1)  # rows x functions
        total = torch.tensor(total, dtype=torch.float64)
        columns = torch.cat([table, total[:, None]], dim=1).view(-1, group, table.shape[1] + 1)
        spread = columns.std(dim=1) if group > 1 else torch.zeros_like(columns[:, 0])
        return {
            "prompt_ids": [list(prompt.ids) for prompt in prompts],
            "completion_ids": [list(r["token_ids"]) for r in results],
            "truncated": torch.tensor([r["finish_reason"] == "length" for r in results]),
            "reward_table": table.float(),
            "rewards": total.float(),
            "group_std": spread.repeat_interleave(group, dim=0).float(),
            "advantages": group_advantages(
                total, group, self.grpo.scale_rewards, advantage=self.grpo.advantage
            ).float(),
        }

    def _row_logps(self, rollouts: dict, model) -> list[torch.Tensor]:
        """Each row's completion-token log-probs under `model` (None: the reference), without dropout."""
        logps = []
        for start in range(0, len(rollouts["prompt_ids"]), self.micro_batch_size):
            rows = range(start, min(start + self.micro_batch_size, len(rollouts["prompt_ids"])))
            batch = {
                k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in self.collate(rollouts, rows, with_logps=False).items()
            }
            with self.autocast():
                if model is None:
                    token_logps = self.reference(batch, self.grpo.temperature)
                else:
                    with evaluating(model):
                        token_logps, _ = completion_token_logps(model, batch, self.grpo.temperature)
            for b, row in enumerate(rows):
                p, c = len(rollouts["prompt_ids"][row]), len(rollouts["completion_ids"][row])
                logps.append(token_logps[b, p - 1 : p - 1 + c].float().cpu())
        return logps

    def collate(self, rollouts: dict, rows, with_logps: bool = True) -> dict:
        """Right-padded rows: prompt + completion ids, labels on the completion only, per-position
        old/reference log-probs aligned with the shifted targets (position t predicts token t + 1)."""
        rows = list(rows)
        lengths = [len(rollouts["prompt_ids"][r]) + len(rollouts["completion_ids"][r]) for r in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        logps = {
            key: torch.zeros(len(rows), width) for key in ("old_logps", "ref_logps") if with_logps and key in rollouts
        }
        for b, r in enumerate(rows):
            prompt, completion = rollouts["prompt_ids"][r], rollouts["completion_ids"][r]
            p, c = len(prompt), len(completion)
            input_ids[b, : p + c] = torch.tensor(prompt + completion)
            labels[b, p : p + c] = torch.tensor(completion)
            for key, table in logps.items():
                table[b, p - 1 : p - 1 + c] = rollouts[key][r]
        index = torch.tensor(rows)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": torch.arange(width).expand(len(rows), width).contiguous(),
            "num_tokens": sum(lengths),
            **{
                key: rollouts[key][index] for key in ("advantages", "rewards", "reward_table", "group_std", "truncated")
            },
            **logps,
        }
        return batch

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The current round's rollouts of every rank (a collective under several processes), so a run
        resumed within a round trains on exactly the rollouts it had."""
        if self.rollouts is None:
            return {"round": None}
        mine = self.rollouts
        if self.world_size > 1:
            import torch.distributed as dist

            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
            merged = {"round": mine["round"]}
            for key, value in mine.items():
                if key == "round":
                    continue
                if isinstance(value, torch.Tensor):
                    merged[key] = torch.cat([part[key] for part in everyone])
                else:
                    merged[key] = [row for part in everyone for row in part[key]]
            mine = merged
        return {"round": mine["round"], "rows_per_step": self.global_size, "rollouts": mine}

    def load_state_dict(self, state: dict) -> None:
        if state.get("round") is None:
            return
        if state["rows_per_step"] != self.global_size:
            raise ValueError(
                f"the checkpoint's generation round holds {state['rows_per_step']} completions per step; this run "
                f"takes {self.global_size} (micro batch x accumulation x processes must stay the same to resume "
                "within a round)"
            )
        per_rank = self.global_size // self.world_size
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        saved = state["rollouts"]
        self.rollouts = {key: (value if key == "round" else value[rows]) for key, value in saved.items()}


class GreedyEvaluation:
    """Eval batches of GRPO: this rank's share of the eval prompts, answered greedily by the current
    policy at each evaluation and scored; the stage then logs eval/reward, eval/rewards/<f>/mean, ...
    (the eval loss is 0: one completion per prompt has no advantage)."""

    def __init__(self, loader: RolloutLoader, prompts: list, world_size: int, rank: int):
        self.loader, self.prompts = loader, prompts[rank::world_size]  # every rank has some when there are enough

    def __len__(self) -> int:
        return -(-len(self.prompts) // self.loader.micro_batch_size)

    def __iter__(self):
        from bumblecore.inference.generate import SamplingParams

        greedy = SamplingParams(max_new_tokens=self.loader.grpo.max_completion_length)
        rollouts = self.loader.sample(self.prompts, [greedy] * len(self.prompts), 1)
        size = self.loader.micro_batch_size
        for start in range(0, len(self.prompts), size):
            yield self.loader.collate(rollouts, range(start, min(start + size, len(self.prompts))))


# ---------------------------------------------------------------------------- references


class LiveReference:
    """The KL reference's per-position log-probs: the LoRA base with its adapter disabled, or a frozen copy."""

    def __init__(self, policy=None, frozen=None):
        self.policy, self.frozen = policy, frozen.requires_grad_(False) if frozen is not None else None

    @torch.no_grad()
    def __call__(self, batch: dict, temperature: float) -> torch.Tensor:
        if self.frozen is not None:
            with evaluating(self.frozen):
                return completion_token_logps(self.frozen, batch, temperature)[0]
        peft_model = unwrapped(self.policy)
        with evaluating(peft_model), peft_model.disable_adapter():
            return completion_token_logps(peft_model, batch, temperature)[0]


def build_grpo(fabric, run, prompts, tokenizer, pad_id: int):
    """The stage and its loader (bind the policy once Fabric has set it up: loader.bind)."""
    from bumblecore.inference.generate import default_eos_ids
    from bumblecore.train.rewards import load_reward_functions, reward_scorer

    grpo, optimization = run.grpo, run.optimization
    scorers = [reward_scorer(path, run, str(fabric.device)) for path in grpo.reward_models]
    functions = load_reward_functions(grpo.reward_function_specs, grpo.reward_weights, scorers)
    loader = RolloutLoader(
        prompts,
        tokenizer,
        grpo,
        functions,
        optimization.train_micro_batch_size_per_gpu,
        optimization.gradient_accumulation_steps,
        fabric.world_size,
        fabric.global_rank,
        optimization.seed,
        pad_id,
        default_eos_ids(run.model.model_name_or_path, tokenizer),
    )
    return GRPOStage(grpo, reward_names(functions)), loader
