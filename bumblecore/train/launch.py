"""How a training run starts: its inputs checked, Fabric built for its scale (DeepSpeed's config filled),
its processes launched; and how the processes agree (rank 0 decides or builds first, the others follow)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bumblecore.args import TrainArgs
from bumblecore.train.sequence_parallel import check_world
from bumblecore.train.trackers import check_installed


def launch(run: TrainArgs):
    """Fabric for the run's scale, its processes started (`devices: N` starts N; under a launcher,
    `fabric run`, `torchrun`, `deepspeed`, SLURM `srun`, the processes are the launcher's), and its
    DeepSpeed config filled. Returns (fabric, the DeepSpeed config or None, the launcher's name or None)."""
    from bumblecore.train.runtime import (
        build_fabric,
        detect_launch,
        fill_deepspeed_config,
        launch_processes,
        load_deepspeed_config,
    )

    scale, optimization = run.runtime, run.optimization
    launch = detect_launch(scale.devices, scale.num_nodes, scale.accelerator)
    deepspeed = None
    sequence_parallel = scale.sequence_parallel_size
    check_world(launch.world_size, sequence_parallel)
    if scale.deepspeed_config_path:
        from bumblecore.train.memory import Workload
        from bumblecore.train.optimizers import deepspeed_client_optimizer

        raw = json.loads((Path(run.model.model_name_or_path) / "config.json").read_text())
        hidden = raw.get("hidden_size", 0)
        deepspeed = fill_deepspeed_config(
            load_deepspeed_config(scale.deepspeed_config_path),
            micro_batch_size=optimization.train_micro_batch_size_per_gpu,
            gradient_accumulation_steps=optimization.gradient_accumulation_steps,
            world_size=launch.world_size // sequence_parallel,  # the data-parallel size: an SP group reads as one
            precision=optimization.train_model_precision,
            max_grad_norm=optimization.max_grad_norm,
            hidden_size=hidden,
            layer_params=Workload.from_config(raw, 1, 1).layer_params or None,
        )
        deepspeed = deepspeed_client_optimizer(deepspeed, optimization.optim)
        if sequence_parallel > 1:  # read by DeepSpeed and by our strategy (train/backend.py)
            deepspeed["sequence_parallel_size"] = sequence_parallel
            if (deepspeed.get("zero_optimization") or {}).get("stage") == 3:  # one gradient divisor (backend.py)
                deepspeed["zero_optimization"]["reduce_scatter"] = True
    fabric = build_fabric(
        scale.accelerator, scale.devices, scale.num_nodes, optimization.train_model_precision, deepspeed, launch=launch
    )
    launch_processes(fabric, launch)
    return fabric, deepspeed, launch.launcher


def check_inputs(run: TrainArgs) -> None:
    """What every stage needs, refused before anything starts (a stage's own: its recipe's check)."""
    if not run.model.model_name_or_path:
        raise ValueError("model_name_or_path is required")
    if not (Path(run.model.model_name_or_path) / "config.json").is_file():
        raise FileNotFoundError(
            f"model_name_or_path {run.model.model_name_or_path}: no config.json (expected a model directory)"
        )
    if not run.data.dataset_path:
        raise ValueError("dataset_path is required")
    check_installed(run.output.report_to)  # a tracker's missing package, named with its extra
    if run.optimization.enable_liger_kernel:
        check_liger(run)
    check_long_context(run)
    if run.optimization.lr_scheduler_type == "reduce_on_plateau" and not run.data.eval_dataset_path:
        # It steps on the eval loss only: without an eval set the lr would silently stay constant.
        raise ValueError(
            "lr_scheduler_type reduce_on_plateau lowers the lr when the eval loss stops improving, "
            "so it needs eval_dataset_path; give one, or choose another schedule (e.g. cosine)"
        )


def check_liger(run: TrainArgs) -> None:
    """enable_liger_kernel's refusals: liger's kernels are Triton (CUDA) and swap Bumblebee's modules."""
    from bumblecore.model.hf_config import bumblebee_expresses
    from bumblecore.model.liger import liger_refusal

    if not bumblebee_expresses(run.model.model_name_or_path):
        raise ValueError(
            f"enable_liger_kernel: model_name_or_path {run.model.model_name_or_path} trains through transformers, "
            "and liger's kernels are wired into Bumblebee models only (ours, Qwen2, Qwen3, Llama, Mistral); "
            "set enable_liger_kernel: false"
        )
    cuda = run.runtime.accelerator in ("auto", "cuda") and torch.cuda.is_available()
    refusal = liger_refusal("cuda" if cuda else "cpu")
    if refusal:
        raise ValueError(f"enable_liger_kernel: {refusal}; or set enable_liger_kernel: false")


def check_long_context(run: TrainArgs) -> None:
    """tiled_mlp, activation_offload and rope_scaling refused where they cannot work (model/tiling.py,
    model/rope.py), naming the key."""
    import torch

    from bumblecore.model.hf_config import bumblebee_expresses, read_config
    from bumblecore.model.rope import context_scaling, rope_type_of
    from bumblecore.model.tiling import check_long_context as check_tiling

    optimization, model_dir = run.optimization, run.model.model_name_or_path
    on_cuda = run.runtime.accelerator != "cpu" and torch.cuda.is_available()
    check_tiling(
        optimization.tiled_mlp,
        optimization.activation_offload,
        optimization.enable_gradient_checkpointing,
        "cuda" if on_cuda else "cpu",
    )
    asked = {
        "tiled_mlp": optimization.tiled_mlp > 1,
        "activation_offload": optimization.activation_offload,
        "rope_scaling": run.model.rope_scaling is not None,
    }
    asked = [key for key, on in asked.items() if on]
    if asked and not bumblebee_expresses(model_dir):
        raise ValueError(
            f"{', '.join(asked)}: implemented in Bumblebee (qwen2, qwen3, llama, mistral families); "
            f"{model_dir} trains through transformers"
        )
    if run.runtime.sequence_parallel_size > 1 and bumblebee_expresses(model_dir):
        # dynamic RoPE scales by the longest position a forward sees: each rank would see only its slice's.
        requested = run.model.rope_scaling
        kind = (
            requested if isinstance(requested, str) else rope_type_of(requested or read_config(model_dir).rope_scaling)
        )
        if kind == "dynamic":
            raise ValueError(
                "sequence_parallel_size > 1 with dynamic RoPE scaling (rope_scaling, or the model's config.json): "
                "each rank would scale by its own slice's positions; use yarn or linear, or sequence_parallel_size 1"
            )
    if run.model.rope_scaling is None:
        return
    if run.model.finetuning_type == "lora":
        raise ValueError(
            "rope_scaling changes the base model's config.json, which a LoRA adapter does not carry: "
            "extend the context with finetuning_type full, or write rope_parameters into the base's config.json"
        )
    context_scaling(run.model.rope_scaling, read_config(model_dir), run.data.cutoff_len)


def load_zero_stage(path) -> int:
    from bumblecore.train.runtime import load_deepspeed_config

    return int(load_deepspeed_config(path).get("zero_optimization", {}).get("stage", 0))


def config_notes(run: TrainArgs) -> list[str]:
    """Keys that are accepted but change nothing, said once at start rather than silently ignored."""
    notes = []
    if run.data.num_local_io_workers is not None:
        notes.append(
            f"num_local_io_workers {run.data.num_local_io_workers} is accepted and ignored: the Rust tokenizer "
            "already tokenizes the cache on every core, and batches are read in-process from the "
            "memory-mapped cache (no loader workers)"
        )
    return notes


def build_once(fabric, build):
    """`build()` run first by global rank 0 (say, tokenizing into the token cache), then by the first
    rank of every other node, then by everyone else. On a shared filesystem the later calls find what
    rank 0 built; a node without one builds its own copy once instead of failing."""
    result = None
    if fabric.global_rank == 0:
        result = build()
    fabric.barrier()
    if fabric.local_rank == 0 and fabric.global_rank != 0:
        result = build()
    fabric.barrier()
    if fabric.local_rank != 0:
        result = build()
    return result


def processes_per_node(fabric) -> int:
    return max(1, fabric.world_size // getattr(fabric.strategy, "num_nodes", 1))


class ReportedByRankZero(ValueError):
    """Rank 0's error, raised on the other ranks so they stop too; rank 0 alone prints it (cli.main)."""

    reported_by_rank_zero = True


def agreed_on_rank_zero(fabric, decide):
    """`decide(notes)` runs on global rank 0 only; every rank gets its result, or raises its error, so
    no rank goes on alone (and none waits for a rank that stopped). The error is printed once: the
    other ranks raise it as ReportedByRankZero."""
    outcome, failure = None, None
    if fabric.is_global_zero:
        notes: list = []
        try:
            outcome = ("ok", decide(notes), notes)
        except Exception as err:
            failure, outcome = err, ("error", str(err), notes)
    if fabric.world_size > 1:
        outcome = fabric.broadcast(outcome, src=0)
    kind, value, notes = outcome
    if failure is not None:
        raise failure
    if kind == "error":
        raise ReportedByRankZero(value)
    return value, notes
