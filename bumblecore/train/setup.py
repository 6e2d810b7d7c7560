"""What a training run sets up: the tokenizer, the model (Bumblebee, or a transformers family), LoRA,
the memory plan checked before anything is allocated, and the optimizer with its schedule."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch

from bumblecore.args import TrainArgs


def _is_bumblebee(model_dir) -> bool:
    """Bumblebee trains the model (its family, every feature expressed); else the transformers fallback."""
    from bumblecore.model.hf_config import bumblebee_expresses

    return bumblebee_expresses(model_dir)


def load_model(
    run: TrainArgs,
    fabric,
    dtype: torch.dtype = torch.float32,
    partitioned: bool = False,
    vocab_size: int = 0,
    from_scratch: bool = False,
    scalar_head: bool = False,
):
    """Bumblebee for our configs, Qwen2 and Llama; any other causal LM through transformers.

    Pretrained weights are read tensor by tensor straight into `dtype` on the run's device.
    `partitioned` (ZeRO-3): the model is built under DeepSpeed's ZeRO-3 init, so each rank only ever
    holds its slice of every weight, and the checkpoint is scattered into those slices.
    `vocab_size` (resize_vocab): at least this many embedding rows, new ones the mean of the old.
    `from_scratch` (pretraining): a random init from the config, seeded.
    `scalar_head` (a reward model, model/reward.py): the body with a `score` head, from a reward model
    or (its head drawn from the run's seed) a causal LM."""
    from bumblecore.model.bumblebee import Bumblebee
    from bumblecore.model.hf_config import read_config
    from bumblecore.model.reward import RewardBumblebee, TransformersReward, transformers_reward
    from bumblecore.model.vocab import grow_vocab, load_grown_into_partitioned

    seed = run.optimization.seed
    if scalar_head and not _is_bumblebee(run.model.model_name_or_path):
        with torch.random.fork_rng():  # transformers draws the new head from the global generator
            torch.manual_seed(seed)
            model = TransformersReward(transformers_reward(run.model.model_name_or_path, torch.float32))
        if run.optimization.enable_gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        return model
    if _is_bumblebee(run.model.model_name_or_path):
        architecture = RewardBumblebee if scalar_head else Bumblebee
        extra = {"seed": seed} if scalar_head else {}  # the new score head's draw
        model_config = read_config(run.model.model_name_or_path)
        grows = vocab_size > model_config.vocab_size
        built = dataclasses.replace(model_config, vocab_size=vocab_size) if grows else model_config
        if from_scratch:  # every row random, the new ones too
            with fabric.init_module(empty_init=True) if partitioned else contextlib.nullcontext():
                torch.manual_seed(
                    run.optimization.seed
                )  # the same random init on every rank (ZeRO-3: DeepSpeed broadcasts rank 0's)
                model = architecture(built)
        elif partitioned:
            from bumblecore.train.backend import load_into_partitioned

            with torch.random.fork_rng(), fabric.init_module(empty_init=True):  # draws nothing, like a load
                model = architecture(built)
            load = load_grown_into_partitioned if grows else load_into_partitioned
            load(model, run.model.model_name_or_path, fabric.is_global_zero, **extra)
        else:
            model = architecture.from_pretrained(
                run.model.model_name_or_path, dtype=dtype, device=fabric.device, **extra
            )
            grow_vocab(model, vocab_size)
        if run.optimization.enable_gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        if run.optimization.enable_liger_kernel:  # refused before the run where liger cannot run (launch.py)
            from bumblecore.model.liger import use_liger_kernels

            fabric.print(f"liger kernels: {', '.join(use_liger_kernels(model))}")
        return model
    model = load_transformers_model(
        run.model.model_name_or_path,
        from_scratch=from_scratch,
        trust_remote_code=run.model.trust_remote_code,
        seed=run.optimization.seed,
        gradient_checkpointing=run.optimization.enable_gradient_checkpointing,
    )
    grow_vocab(model, vocab_size)
    return model


def load_transformers_model(
    model_dir: str,
    from_scratch: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    gradient_checkpointing: bool = False,
):
    """A transformers family for training: its weights from model_dir, or (from_scratch, pretraining) a
    random init from its config.json, seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bumblecore.model.transformers_family import TransformersCausalLM
    from bumblecore.train.losses import check_loss_parity

    if from_scratch:
        hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    wrapped = TransformersCausalLM(model)
    check_loss_parity(wrapped)
    if gradient_checkpointing:
        wrapped.set_gradient_checkpointing(True)
    return wrapped


def count_parameters(run: TrainArgs) -> tuple[int, int]:
    """(all, trainable) parameters of the run's model, counted on the meta device (nothing allocated)."""
    from bumblecore.model.lora import linear_layer_names

    if _is_bumblebee(run.model.model_name_or_path):
        from bumblecore.model.bumblebee import Bumblebee
        from bumblecore.model.hf_config import read_config

        with torch.device("meta"):
            model = Bumblebee(read_config(run.model.model_name_or_path))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(
            run.model.model_name_or_path, trust_remote_code=run.model.trust_remote_code
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=run.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    if run.model.finetuning_type != "lora":
        return total, total
    targets = set(run.lora.lora_target_modules or linear_layer_names(model))
    adapters = sum(
        run.lora.lora_rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    # lora_modules_to_save: peft trains a full copy of each beside the frozen original
    saved = set(run.lora.lora_modules_to_save or [])
    copies = sum(
        p.numel() for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in saved for p in m.parameters()
    )
    return total + adapters + copies, adapters + copies


def trainable_share(model) -> tuple[int, int]:
    """(trainable, all) parameters of the live model, each shared tensor once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        count = getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned weight's local tensor is empty
        total += count
        trainable += count if p.requires_grad else 0
    return trainable, total


def memory_plan(
    fabric,
    run: TrainArgs,
    deepspeed_config,
    recipe,
    local_processes: int,
    sequence_length: Optional[int] = None,
    runtime: Optional[int] = None,
    prompt_release: bool = False,
):
    """The per-rank memory plan, the recipe's extra models and rows per unit in it. `sequence_length`: the rows' length where the data is known (default
    cutoff_len, the bound); `runtime`: the process's own RSS as measured before the model was built;
    `prompt_release`: freed blocks go back to the OS at once (RuntimeArgs.release_freed_memory)."""
    from bumblecore.train.memory import (
        Workload,
        available_memory,
        plan_memory,
        runtime_rss,
        sequence_parallel_share,
    )

    total, trainable = count_parameters(run)
    frozen_copy = recipe.frozen_copy(run, total, trainable)
    name, available = available_memory(fabric.device, local_processes)
    optimization = run.optimization
    raw = json.loads((Path(run.model.model_name_or_path) / "config.json").read_text(encoding="utf-8"))
    rows = recipe.rows_per_unit  # a preference pair: chosen and rejected rows
    workload = Workload.from_config(
        raw,
        micro_batch_size=optimization.train_micro_batch_size_per_gpu * rows,
        sequence_length=sequence_length or run.data.cutoff_len,
        gradient_checkpointing=bool(optimization.enable_gradient_checkpointing),
        lora_dropout=run.model.finetuning_type == "lora" and bool(run.lora.lora_dropout),
        accumulates=optimization.gradient_accumulation_steps > 1,
        mlp_tiles=optimization.tiled_mlp,
        activation_offload=optimization.activation_offload,
    )
    if run.runtime.sequence_parallel_size > 1:  # each rank holds a slice of every row
        workload = sequence_parallel_share(workload, run.runtime.sequence_parallel_size)
    if recipe.scalar_head:  # a reward model: one score per token, no LM head and no logits
        head = 0 if raw.get("tie_word_embeddings", True) else workload.vocab_size * workload.hidden_size
        total, trainable = total - head, trainable - (head if trainable == total else 0)
        workload = dataclasses.replace(workload, vocab_size=0, embedding_params=workload.embedding_params - head)
        # The score head trains in full (LoRA: peft's copy of it, beside the frozen original).
        lora = run.model.finetuning_type == "lora"
        total, trainable = total + workload.hidden_size * (2 if lora else 1), trainable + workload.hidden_size
    return plan_memory(
        total,
        trainable,
        optimization.train_model_precision,
        fabric.world_size,
        deepspeed_config,
        name,
        available,
        frozen_copy,
        workload=workload,
        # the host process shares the device on CPU
        runtime=(runtime if runtime is not None else runtime_rss()) if fabric.device.type == "cpu" else 0,
        prompt_release=prompt_release,
    )


def tokenizer_and_vocab(run: TrainArgs, chat: bool):
    """The run's tokenizer, and the embedding rows resize_vocab grows the model to (0: none)."""
    from bumblecore.data.dataset import run_tokenizer
    from bumblecore.tokenizer import check_fits_model

    # The model's own chat template (ours, ChatML, where it has none): what is trained is what is served.
    tokenizer = run_tokenizer(run.model, chat)
    # resize_vocab grows the embedding to the tokenizer; else its ids must fit the model's rows.
    vocab_size = len(tokenizer) if run.model.resize_vocab else 0
    if not vocab_size:
        check_fits_model(
            tokenizer, run.model.model_name_or_path, run.model.model_name_or_path
        )  # before anything is written
    return tokenizer, vocab_size


def lora_base(fabric, run: TrainArgs) -> Optional[dict]:
    """The base as this run reads it, recorded beside every adapter it saves (model/lora.py)."""
    if run.model.finetuning_type == "lora" and fabric.is_global_zero:
        from bumblecore.model.adapter_base import base_fingerprint

        return base_fingerprint(run.model.model_name_or_path)
    return None


def releases_promptly(run: TrainArgs, stage_of_zero: Optional[int]) -> bool:
    """Whether freed blocks go straight back to the OS (RuntimeArgs.release_freed_memory)."""
    from bumblecore.train.memory import release_freed_memory_promptly

    prompt_release = run.runtime.release_freed_memory
    if prompt_release is None:
        # ZeRO-3 ranks gather and free every weight each step. Sequence-parallel ranks free each layer's
        # activations and all-to-all buffers, 1/N the one-process size, mostly under the mmap threshold
        # glibc raises itself (to 32 MiB): it kept them, and a rank's RSS grew ~0.7-0.8x a process's per
        # token where its tensors grow 0.5x (docs/BENCHMARKS.md, long context).
        prompt_release = stage_of_zero == 3 or run.runtime.sequence_parallel_size > 1
    return prompt_release and release_freed_memory_promptly()


def build_model(fabric, run: TrainArgs, load, tokenizer, stage_of_zero: Optional[int]):
    """The model the run trains: loaded (`load`: load_model with the run's vocab and init), LoRA applied."""
    from bumblecore.model.lora import apply_lora
    from bumblecore.train.memory import release_freed_host_memory

    optimization = run.optimization
    # DeepSpeed with 16-bit weights keeps a 16-bit module and fp32 master weights itself: load 16-bit.
    weights_dtype = torch.float32
    if stage_of_zero is not None and optimization.train_model_precision in ("bf16", "fp16"):
        weights_dtype = torch.bfloat16 if optimization.train_model_precision == "bf16" else torch.float16
    model = load(run, fabric, dtype=weights_dtype, partitioned=stage_of_zero == 3)
    release_freed_host_memory()
    extend_context(model, run, tokenizer)
    if getattr(model, "is_transformers_fallback", False) and run.data.packing:
        fabric.print("note: packing is off for transformers models (their CPU attention would cross documents)")
        run.data = dataclasses.replace(run.data, packing=False)
    if run.model.finetuning_type == "lora":
        from bumblecore.chat.templates import added_token_ids
        from bumblecore.model.lora_options import lora_config_options
        from bumblecore.model.vocab import lora_token_indices

        new_rows = lora_token_indices(model, added_token_ids(tokenizer, tokenizer.bumblecore_added_tokens))
        model = apply_lora(
            model,
            run.lora.lora_rank,
            run.lora.lora_alpha,
            run.lora.lora_dropout,
            run.lora.lora_target_modules,
            trainable_token_indices=new_rows,
            zero3=stage_of_zero == 3,
            variants=lora_config_options(run.lora),
        )
    if (
        run.runtime.sequence_parallel_size > 1
    ):  # attention exchanges heads for the sequence (model/sequence_parallel.py)
        from bumblecore.model.sequence_parallel import use_sequence_parallel
        from bumblecore.train.backend import sequence_parallel_group

        size = run.runtime.sequence_parallel_size
        use_sequence_parallel(model, sequence_parallel_group(size), size)
    if optimization.compile:
        from bumblecore.model.regional_compile import compile_for_training

        for note in compile_for_training(model, getattr(model, "lm_head", None)):
            fabric.print(f"note: {note}")
    return model


def extend_context(model, run: TrainArgs, tokenizer) -> None:
    """rope_scaling, tiled_mlp and activation_offload on the loaded Bumblebee (train/launch.py checked them):
    the config (and so config.json) takes the scaling and its longer context, the tokenizer its length."""
    from bumblecore.model.rope import context_scaling
    from bumblecore.model.tiling import enable_long_context

    if run.model.rope_scaling is not None:
        scaling, positions = context_scaling(run.model.rope_scaling, model.config, run.data.cutoff_len)
        model.config = dataclasses.replace(model.config, rope_scaling=scaling, max_position_embeddings=positions)
        tokenizer.model_max_length = max(tokenizer.model_max_length, positions)
    optimization = run.optimization
    if optimization.tiled_mlp > 1 or optimization.activation_offload:
        enable_long_context(model, optimization.tiled_mlp, optimization.activation_offload)


def build_optimizer(fabric, run: TrainArgs, model, total_steps: int):
    """The optimizer (`optim`: train/optimizers.py) and its schedule, with the model set up by Fabric:
    (model, optimizer, scheduler, warmup steps)."""
    from bumblecore.train.backend import share_fp32_master_weights
    from bumblecore.train.memory import release_freed_host_memory
    from bumblecore.train.optimizers import build_optimizer_for
    from bumblecore.train.schedulers import build_scheduler

    optimization = run.optimization
    warmup_steps = math.ceil(optimization.warmup_ratio * total_steps)
    lora = run.lora if run.model.finetuning_type == "lora" else None
    own_optimizer = build_optimizer_for(model, optimization, lora)
    model, optimizer = fabric.setup(model, own_optimizer)
    share_fp32_master_weights(model)
    release_freed_host_memory()  # DeepSpeed's setup copies every partition once more
    # The schedule drives the optimizer's own param groups: under DeepSpeed the ZeRO optimizer wraps it and steps it.
    scheduler = build_scheduler(
        optimization.lr_scheduler_type, own_optimizer, warmup_steps, total_steps, **optimization.lr_scheduler_kwargs
    )
    return model, optimizer, scheduler, warmup_steps


def loop_settings(run: TrainArgs, total_steps: int, evaluates: bool, deepspeed_config):
    """The engine's loop: steps, clipping, logging, evaluation and checkpoint cadence."""
    from bumblecore.train.engine import LoopSettings

    optimization, output = run.optimization, run.output
    return LoopSettings(
        total_steps=total_steps,
        max_grad_norm=optimization.max_grad_norm,
        logging_steps=output.logging_steps,
        eval_steps=output.eval_steps or (output.save_steps if evaluates else None),
        eval_at_end=output.eval_at_end,
        save_steps=output.save_steps,
        save_total_limit=output.save_total_limit,
        save_last=output.save_last,
        average_tokens_across_devices=optimization.average_tokens_across_devices,
        skips_overflow_steps=optimization.train_model_precision == "fp16",
    )
