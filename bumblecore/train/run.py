"""`bumblecore train`: setup (Fabric, launch) -> main (model, data, optimiser) -> Engine.fit -> export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from bumblecore.train.config import TrainConfig, to_yaml


def train(config: TrainConfig) -> None:
    """Train a model: pretrain, continue_pretrain, sft or dpo; full fine-tuning or LoRA.

    Takes the original's flat YAML keys (`--config F` or `--yaml_config F`), each overridable on the
    command line. `devices: N` starts N processes; under `fabric run` the launcher's flags win.
    """
    from bumblecore.train.runtime import build_fabric, fill_deepspeed_config, load_deepspeed_config

    _check_inputs(config)
    deepspeed = None
    if config.deepspeed_config_path:
        hidden = json.loads((Path(config.model_name_or_path) / "config.json").read_text()).get("hidden_size", 0)
        deepspeed = fill_deepspeed_config(
            load_deepspeed_config(config.deepspeed_config_path), micro_batch_size=config.train_micro_batch_size_per_gpu,
            gradient_accumulation_steps=config.gradient_accumulation_steps, world_size=config.devices * config.num_nodes,
            precision=config.train_model_precision, max_grad_norm=config.max_grad_norm, hidden_size=hidden)
    fabric = build_fabric(config.accelerator, config.devices, config.num_nodes, config.train_model_precision, deepspeed)
    if not _launched_by_fabric_cli():
        fabric.launch()  # no-op for one process; otherwise starts the other ranks, which rerun this command
    main(fabric, config, runtime_owns_accumulation=deepspeed is not None)


def _launched_by_fabric_cli() -> bool:
    return os.environ.get("LT_CLI_USED") == "1"


def _check_inputs(config: TrainConfig) -> None:
    if not config.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    if not (Path(config.model_name_or_path) / "config.json").is_file():
        raise FileNotFoundError(f"model_name_or_path {config.model_name_or_path}: no config.json (expected a model directory)")
    if not config.dataset_path:
        raise ValueError("dataset_path is required")


# ---------------------------------------------------------------------------- model


def load_model(config: TrainConfig, fabric):
    """Bumblebee for our configs, Qwen2 and Llama; any other causal LM through transformers."""
    from bumblecore.model.hf_io import SUPPORTED_MODEL_TYPES, load_pretrained, read_config
    from bumblecore.model.bumblebee import Bumblebee

    raw = json.loads((Path(config.model_name_or_path) / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") in SUPPORTED_MODEL_TYPES:
        if config.training_stage == "pretrain":
            model_config = read_config(config.model_name_or_path)
            torch.manual_seed(config.seed)  # the same random init on every rank
            model = Bumblebee(model_config)
        else:
            model = load_pretrained(config.model_name_or_path, dtype=torch.float32)
        if config.enable_gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        return model
    from bumblecore.train.hf_fallback import load_transformers_model

    return load_transformers_model(config)


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay for biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------- main


def main(fabric, config: TrainConfig, runtime_owns_accumulation: bool = False) -> None:
    from bumblecore.data.commands import dataset_units
    from bumblecore.data.loader import BatchLoader, eval_batches
    from bumblecore.tokenizer import CHAT_TEMPLATE, load_tokenizer
    from bumblecore.train.checkpoint import read_trainer_state, resolve_resume_dir
    from bumblecore.train.engine import Engine, LoopSettings
    from bumblecore.train.lora import apply_lora, trainable_share
    from bumblecore.train.monitor import Monitor
    from bumblecore.train.schedulers import build_scheduler
    from bumblecore.train.sft import LanguageModelingStage

    started = time.perf_counter()
    fabric.seed_everything(config.seed)
    output_dir = Path(config.output_dir)
    tokenizer = load_tokenizer(config.model_name_or_path)
    tokenizer.chat_template = CHAT_TEMPLATE  # what is trained is what is served

    model = load_model(config, fabric)
    if getattr(model, "is_transformers_fallback", False) and config.packing:
        fabric.print("note: packing is off for transformers models (their CPU attention would cross documents)")
        config.packing = False
    if config.finetuning_type == "lora":
        model = apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    trainable, total = trainable_share(model)

    with fabric.rank_zero_first():  # rank 0 tokenizes; the others then reuse its cache
        _, units = dataset_units(config, tokenizer, config.dataset_path, progress=fabric.is_global_zero)
        eval_units = dataset_units(config, tokenizer, config.eval_dataset_path, progress=False)[1] if config.eval_dataset_path else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = BatchLoader(units, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps,
                         fabric.world_size, fabric.global_rank, config.seed, pad_id, bool(config.packing), config.group_by_length)
    eval_loader = (eval_batches(eval_units, config.train_micro_batch_size_per_gpu, pad_id, bool(config.packing),
                                fabric.world_size, fabric.global_rank) if eval_units is not None else None)
    total_steps = loader.total_steps(config.num_epochs, config.max_steps)
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)

    optimizer = torch.optim.AdamW(optimizer_groups(model, config.weight_decay), lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = build_scheduler(config.lr_scheduler_type, optimizer, warmup_steps, total_steps, **config.lr_scheduler_kwargs)

    resume_dir = resolve_resume_dir(output_dir, config.resume_from_checkpoint)
    stage = LanguageModelingStage()
    if config.training_stage == "dpo":
        from bumblecore.train.dpo import build_preference_stage

        def load_reference(path):
            return load_model(dataclasses.replace(config, model_name_or_path=path, enable_gradient_checkpointing=False), fabric)

        stage, attach_reference = build_preference_stage(fabric, config, model, units, eval_units, pad_id,
                                                         resuming=resume_dir is not None, load_reference_model=load_reference)
        loader = attach_reference(loader, "train")
        eval_loader = attach_reference(eval_loader, "eval") if eval_loader is not None else None
    monitor = Monitor(output_dir, config.use_tensorboard, config.save_train_log, fabric.is_global_zero,
                      resume_step=read_trainer_state(resume_dir)["step"] if resume_dir else None)
    settings = LoopSettings(
        total_steps=total_steps, max_grad_norm=config.max_grad_norm, logging_steps=config.logging_steps,
        eval_steps=config.eval_steps or (config.save_steps if eval_loader else None), save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, save_last=config.save_last,
        average_tokens_across_devices=config.average_tokens_across_devices,
        runtime_owns_accumulation=runtime_owns_accumulation)
    exporter = Exporter(fabric, config, tokenizer, monitor)
    engine = Engine(fabric, model, optimizer, scheduler, stage, loader, settings, monitor,
                    save_fn=lambda step, final: exporter.checkpoint(engine, step, final), eval_loader=eval_loader)
    if resume_dir is not None:
        engine.load_state(resume_dir)
        fabric.print(f"resumed from {resume_dir} at step {engine.step}")

    if fabric.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.yaml").write_text(to_yaml(config), encoding="utf-8")
    banner = [
        f"BumbleCore train: stage {config.training_stage}, {config.finetuning_type} fine-tuning, model {config.model_name_or_path}",
        f"  data: {len(units)} training units ({'packed' if config.packing else 'padded'} rows of <= {config.cutoff_len} tokens)"
        + (f", {len(eval_units)} eval units" if eval_units is not None else ""),
        f"  batch: {config.train_micro_batch_size_per_gpu} micro x {fabric.world_size} device(s) x {config.gradient_accumulation_steps} "
        f"accumulation = {loader.global_size} per step; {loader.steps_per_epoch} steps/epoch, {total_steps} steps, {warmup_steps} warmup",
        f"  parameters: {total:,} ({trainable:,} trainable, {trainable / max(1, total):.2%})",
        f"  features: precision {config.train_model_precision}, scheduler {config.lr_scheduler_type}, lr {config.learning_rate}, "
        f"gradient checkpointing {'on' if config.enable_gradient_checkpointing else 'off'}, "
        f"attention {getattr(getattr(model, 'config', None), 'attn_implementation', 'transformers')}, "
        f"strategy {type(fabric.strategy).__name__}",
    ]
    if getattr(stage, "summary", ""):
        banner.append(f"  {stage.summary}")
    for line in banner:
        fabric.print(line)
        monitor.info(line)

    engine.fit()
    exporter.export_final(engine)
    monitor.close(smooth=config.training_stage != "pretrain")
    fabric.print(f"done in {time.perf_counter() - started:.1f}s: {config.output_dir}")


# ---------------------------------------------------------------------------- saving


class Exporter:
    """Writes checkpoints (HF export + resume state, atomically) and the final model."""

    def __init__(self, fabric, config: TrainConfig, tokenizer, monitor):
        self.fabric, self.config, self.tokenizer, self.monitor = fabric, config, tokenizer, monitor

    def _save_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.train_model_precision, torch.float32)

    def write_model(self, model, directory: Path) -> None:
        """The HF-format model (or peft adapter) and tokenizer; rank 0 writes, all ranks join (sharded states)."""
        from bumblecore.train.lora import save_adapter
        from bumblecore.train.runtime import gathered_state_dict

        bare = getattr(model, "module", model)
        state = gathered_state_dict(self.fabric, model) if self.config.finetuning_type == "full" else None
        if not self.fabric.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.finetuning_type == "lora":
            save_adapter(bare, directory, self.config.model_name_or_path)
        else:
            dtype = self._save_dtype()
            casted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            bare.save_pretrained(directory, state_dict=casted)
        self.tokenizer.save_pretrained(str(directory))

    def checkpoint(self, engine, step: int, final: bool) -> None:
        from bumblecore.train.checkpoint import rotate_checkpoints, save_checkpoint

        name = f"checkpoint-{step}" if not final else "checkpoint-last"

        def contents(tmp: Path) -> None:
            self.write_model(engine.model, tmp)
            engine.save_state(tmp)

        state = {"step": step, "tokens_seen": engine.tokens_seen, "training_stage": self.config.training_stage}
        path = save_checkpoint(self.config.output_dir, name, contents, state, self.fabric.is_global_zero, self.fabric.barrier)
        if self.fabric.is_global_zero:
            if not final:
                rotate_checkpoints(self.config.output_dir, self.config.save_total_limit)
            self.monitor.plot(smooth=self.config.training_stage != "pretrain")
            self.monitor.info(f"saved {path}")

    def export_final(self, engine) -> None:
        """The trained model at output_dir's root (DESIGN.md §3)."""
        self.write_model(engine.model, Path(self.config.output_dir))
        self.fabric.barrier()
