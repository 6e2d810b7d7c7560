"""GRPO (training_stage grpo): prompts, not token units; the policy's rollouts make each round's
batches, scored by the reward functions (train/grpo.py). Evaluation answers the eval prompts greedily."""

from __future__ import annotations

import dataclasses

from bumblecore.data.formats import ReadReport
from bumblecore.data.prompts import prompt_paths, read_prompts, tokenize_prompts
from bumblecore.recipes.base import Recipe, StageData
from bumblecore.train.grpo import GreedyEvaluation, LiveReference, build_grpo
from bumblecore.train.launch import load_zero_stage


class GRPORecipe(Recipe):
    name = "grpo"
    reading = None  # prompts (data/prompts.py): nothing to cache

    def check(self, run) -> None:
        if run.runtime.deepspeed_config_path and load_zero_stage(run.runtime.deepspeed_config_path) == 3:
            raise ValueError(
                "training_stage grpo with ZeRO-3: the rollouts decode with whole weights on every process; "
                "use ZeRO-0/1/2 or DDP"
            )

    def adapter_off_reference(self, run) -> bool:
        return bool(run.grpo.beta)  # the KL reference

    def frozen_copy(self, run, total: int, trainable: int) -> int:
        """The KL reference (beta > 0) of full fine-tuning is a frozen copy (LoRA's is its own base), and
        each reward model is held beside the policy."""
        from bumblecore.inference.scoring import reward_model_parameters

        reference = total if run.grpo.beta and run.model.finetuning_type == "full" else 0
        return reference + sum(reward_model_parameters(path) for path in run.grpo.reward_models)

    def data(self, fabric, run, tokenizer, pad_id: int) -> StageData:
        units, lines = read_grpo_prompts(run, tokenizer, run.data.dataset_path)
        stage, loader = build_grpo(fabric, run, units, tokenizer, pad_id)
        data = StageData(units, loader, lines=lines, stage=stage, pad_id=pad_id)
        if run.data.eval_dataset_path:
            data.eval_units, eval_lines = read_grpo_prompts(
                run, tokenizer, run.data.eval_dataset_path, "eval_dataset_path"
            )
            if len(data.eval_units) < fabric.world_size:
                raise ValueError(
                    f"eval_dataset_path: {len(data.eval_units)} prompts for {fabric.world_size} processes; give one per process"
                )
            data.eval_loader = GreedyEvaluation(loader, data.eval_units, fabric.world_size, fabric.global_rank)
            data.lines += eval_lines
        return data

    def stage(self, fabric, run, model, data: StageData, load_model, resuming: bool):
        data.loader.bind(model, reference(fabric, run, model, load_model), fabric.device, fabric.autocast)
        return data.stage, data.loader, data.eval_loader


def read_grpo_prompts(run, tokenizer, paths, label: str = "dataset_path") -> tuple[list, list[str]]:
    """The prompts of `paths` with their ids, and the banner's lines about them."""
    report = ReadReport()
    prompts = read_prompts(prompt_paths(run.data, paths, label), run.data.skip_bad_records, report)
    prompts, too_long = tokenize_prompts(prompts, tokenizer, run.data.cutoff_len)
    if not prompts:
        raise ValueError(
            f"{label}: no usable prompt ({report.records} records, {too_long} longer than cutoff_len "
            f"{run.data.cutoff_len}, {len(report.skipped)} bad records skipped)"
        )
    lengths = sorted(len(p.ids) for p in prompts)
    fields = sorted({key for p in prompts for key in p.fields})
    name = "data" if label == "dataset_path" else "eval data"
    lines = [
        f"  {name}: {len(prompts)} prompts ({report.records} records; {too_long} longer than cutoff_len "
        f"{run.data.cutoff_len} dropped, {len(report.skipped)} bad records skipped), prompt tokens median "
        f"{lengths[len(lengths) // 2]}, max {lengths[-1]}; fields for the rewards: {', '.join(fields) or 'none'}",
        *[f"    skipped: {reason}" for reason in report.skipped[:3]],
    ]
    return prompts, lines


def reference(fabric, run, model, load):
    """GRPO's KL reference (beta > 0): the LoRA base with its adapter disabled, else a frozen copy of the start."""
    if not run.grpo.beta:
        return None
    if run.model.finetuning_type == "lora":
        return LiveReference(policy=model)
    frozen = dataclasses.replace(
        run, optimization=dataclasses.replace(run.optimization, enable_gradient_checkpointing=False)
    )
    return LiveReference(frozen=fabric.to_device(load(frozen, fabric)))
