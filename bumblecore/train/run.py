"""`bumblecore train`: launch (train/launch.py) -> setup (train/setup.py, the stage through its recipe,
bumblecore/recipes/) -> Engine.fit (train/engine.py) -> outputs (train/outputs.py)."""

from __future__ import annotations

import functools
import time

import torch

from bumblecore.args import TrainArgs
from bumblecore.recipes import recipe_for
from bumblecore.train.launch import agreed_on_rank_zero, check_inputs, config_notes, launch, processes_per_node
from bumblecore.train.outputs import Exporter, open_monitor, prepare_output_dir, report_peak_memory, write_run_record
from bumblecore.train.sequence_parallel import check_sequence_parallel, data_parallel_line
from bumblecore.train.setup import (
    build_model,
    build_optimizer,
    load_model,
    loop_settings,
    lora_base,
    memory_plan,
    releases_promptly,
    tokenizer_and_vocab,
    trainable_share,
)
from bumblecore.train.task_eval import check_eval_tasks, task_evaluator


def train(run: TrainArgs) -> None:
    """Train a model: pretrain, continue_pretrain, sft, dpo, kto, grpo or rm; full fine-tuning or LoRA.

    Takes the original's flat YAML keys (`--config F` or `--yaml_config F`), each overridable on the
    command line. `devices: N` starts N processes; under a launcher (`fabric run`, `torchrun`,
    `deepspeed`, SLURM `srun`) the processes, world size and nodes are the launcher's.
    """
    recipe = recipe_for(run.model.training_stage)
    check_inputs(run)
    check_eval_tasks(run)
    recipe.check(run)
    check_sequence_parallel(run, recipe)
    check_adapter_and_optimizer(run, recipe)
    fabric, deepspeed, launcher = launch(run)
    main(fabric, run, recipe, deepspeed_config=deepspeed, launcher=launcher)


def check_adapter_and_optimizer(run: TrainArgs, recipe) -> None:
    """The LoRA variants', compile's and the optimizer's refusals, before anything starts."""
    from bumblecore.model.lora_options import check_lora_options
    from bumblecore.train.launch import load_zero_stage
    from bumblecore.train.optimizers import check_optimizer

    ds_path = run.runtime.deepspeed_config_path
    lora, compiles = run.model.finetuning_type == "lora", run.optimization.compile
    zero = load_zero_stage(ds_path) if ds_path and (lora or compiles) else None
    if lora:
        check_lora_options(run.lora, zero, recipe.adapter_off_reference(run))
    if compiles:
        from bumblecore.model.regional_compile import check_compile

        optimization = run.optimization
        asked = {
            "sequence_parallel_size": run.runtime.sequence_parallel_size > 1,
            "tiled_mlp": optimization.tiled_mlp > 1,
            "activation_offload": optimization.activation_offload,
        }
        long_context = tuple(key for key, on in asked.items() if on)
        check_compile(run.model.training_stage, recipe.compiles, zero, lora, long_context)
    check_optimizer(run.optimization, ds_path, run.runtime.accelerator)


def main(fabric, run: TrainArgs, recipe, deepspeed_config: dict | None = None, launcher: str | None = None) -> None:
    """One process's run: tokenizer, output dir, memory plan, model, data, optimizer, stage, fit, export."""
    from bumblecore.train.checkpoint import in_place_checkpoint_io
    from bumblecore.train.engine import Engine
    from bumblecore.train.runtime import zero_stage

    started = time.perf_counter()
    fabric.seed_everything(run.optimization.seed)
    tokenizer, vocab_size = tokenizer_and_vocab(run, recipe.chat)
    load = functools.partial(
        load_model, vocab_size=vocab_size, from_scratch=recipe.from_scratch, scalar_head=recipe.scalar_head
    )
    resume_dir, notes = agreed_on_rank_zero(fabric, lambda notes: prepare_output_dir(run, notes))
    base = lora_base(fabric, run)
    notes = notes + config_notes(run) + recipe.notes(run)
    for note in notes:
        fabric.print(f"note: {note}")
    if deepspeed_config is None:
        # Our checkpoint directory is atomic already: write the state once, in place, mode 0644.
        fabric.strategy.checkpoint_io = in_place_checkpoint_io()

    stage_of_zero = zero_stage(deepspeed_config)
    prompt_release = releases_promptly(run, stage_of_zero)
    plan_memory = functools.partial(
        memory_plan, fabric, run, deepspeed_config, recipe, processes_per_node(fabric), prompt_release=prompt_release
    )
    plan = plan_memory()
    plan.check()  # before anything is allocated or written
    model = build_model(fabric, run, load, tokenizer, stage_of_zero)
    trainable, total = trainable_share(model)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = recipe.data(fabric, run, tokenizer, pad_id)
    if data.longest is not None:  # padded rows: the plan held to the data's longest row
        plan = plan_memory(sequence_length=data.longest, runtime=plan.runtime)
    total_steps = data.loader.total_steps(run.optimization.num_epochs, run.optimization.max_steps)
    model, optimizer, scheduler, warmup_steps = build_optimizer(fabric, run, model, total_steps)
    stage, loader, eval_loader = recipe.stage(fabric, run, model, data, load, resuming=resume_dir is not None)

    monitor = open_monitor(fabric, run, resume_dir, notes)
    try:
        task_eval = task_evaluator(fabric, run, tokenizer)
        settings = loop_settings(run, total_steps, bool(eval_loader) or bool(task_eval), deepspeed_config)
        exporter = Exporter(
            fabric, run, tokenizer, monitor, base_fingerprint=base, chat=recipe.chat, smooth_curves=recipe.smooth_curves
        )
        engine = Engine(
            fabric,
            model,
            optimizer,
            scheduler,
            stage,
            loader,
            settings,
            monitor,
            save_fn=lambda step, final: exporter.checkpoint(engine, step, final),
            eval_loader=eval_loader,
            task_eval=task_eval,
        )
        if resume_dir is not None:
            engine.load_state(resume_dir)
            fabric.print(f"resumed from {resume_dir} at step {engine.step}")

        write_run_record(fabric, run)
        steps, parameters = (total_steps, warmup_steps), (total, trainable)
        lines = banner(fabric, run, launcher, data.lines, loader, steps, parameters, model, stage_of_zero)
        for line in [*lines, *plan.lines(), *([f"  {stage.summary}"] if getattr(stage, "summary", "") else [])]:
            fabric.print(line)
            monitor.info(line)

        engine.fit()
        exporter.export_final(engine)
    except BaseException as error:  # an error, an interrupt, a stop: the trackers close with the run's state
        monitor.close(smooth=recipe.smooth_curves, error=error)
        raise
    monitor.close(smooth=recipe.smooth_curves)
    fabric.print(f"done in {time.perf_counter() - started:.1f}s: {run.output.output_dir}")
    report_peak_memory(fabric, monitor, plan.peak_mb)  # the run's last line


def banner(fabric, run: TrainArgs, launcher, data_lines, loader, steps, parameters, model, zero) -> list[str]:
    """The run's opening lines: stage, data, processes, batch, parameters, features."""
    optimization, per_node = run.optimization, processes_per_node(fabric)
    (total_steps, warmup_steps), (total, trainable) = steps, parameters
    return [
        f"BumbleCore train: stage {run.model.training_stage}, {run.model.finetuning_type} fine-tuning, model {run.model.model_name_or_path}",
        *data_lines,
        f"  processes: {fabric.world_size} ({per_node} per node x {fabric.world_size // per_node} node(s), "
        f"started by {launcher or ('bumblecore' if fabric.world_size > 1 else 'this command')}), {fabric.device.type}, "
        f"{torch.get_num_threads()} intra-op thread(s) each",
        f"  batch: {optimization.train_micro_batch_size_per_gpu} micro x {data_parallel_line(fabric.world_size, run.runtime.sequence_parallel_size)} x {optimization.gradient_accumulation_steps} "
        f"accumulation = {loader.global_size} per step; {loader.steps_per_epoch} steps/epoch, {total_steps} steps, {warmup_steps} warmup",
        f"  parameters: {total:,} ({trainable:,} trainable, {trainable / max(1, total):.2%})",
        f"  features: precision {optimization.train_model_precision}, scheduler {optimization.lr_scheduler_type}, lr {optimization.learning_rate}, "
        f"gradient checkpointing {'on' if optimization.enable_gradient_checkpointing else 'off'}, "
        f"attention {getattr(getattr(model, 'config', None), 'attn_implementation', 'transformers')}, "
        f"strategy {type(fabric.strategy).__name__}" + (f" (ZeRO-{zero})" if zero is not None else ""),
    ]
