"""The training backends once the model is set up: how one optimiser step is taken on Fabric (one
process or DDP) and on DeepSpeed, ZeRO-3's gathers, and every use of DeepSpeed and Lightning Fabric
beyond their public surface, in this one module, each with the reason it is needed.
tests/train/test_backend_canary.py names each of those private names and checks that it still exists with
the shape relied on, so an upgrade that moves one fails there, naming it, rather than in a running
job; it also checks that no other package module reaches one.

A stepper owns what differs between the backends; the engine (train/engine.py) owns what a step's loss
is (its terms, each divided by its units over the step) and calls, per step:
    loss_multiplier(n)      what each micro-batch's loss scale is multiplied by (n: DeepSpeed divides
                            every micro-batch's loss by its accumulation steps itself)
    accumulating(last)      around one micro-batch's forward and backward
    backward(loss, last)    after each micro-batch
    finish_gradients()      once the step's gradients are complete: (finite on this rank, their norm
                            where known), read before anything is updated
    step()                  the update (clipped), the gradients cleared; returns the norm to report
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

# ---------------------------------------------------------------------------- steppers


class FabricStepper:
    """One process or DDP: Fabric's backward, the gradients all-reduced once (on the step's last
    micro-batch), Fabric's clipping (whose norm, before clipping, is the one reported), the optimiser's step."""

    def __init__(self, fabric, model, optimizer, settings):
        self.fabric, self.model, self.optimizer, self.settings = fabric, model, optimizer, settings
        self.grad_norm = math.nan

    def loss_multiplier(self, micro_batches: int) -> int:
        return 1

    def accumulating(self, last: bool):
        return self.fabric.no_backward_sync(self.model, enabled=not last)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.fabric.backward(loss)

    def finish_gradients(self) -> tuple[bool, Optional[float]]:
        max_norm = self.settings.max_grad_norm
        if max_norm:
            norm = self.fabric.clip_gradients(self.model, self.optimizer, max_norm=max_norm, error_if_nonfinite=False)
        else:
            norm = grad_norm(self.model)
        self.grad_norm = float(norm)
        # fp16 with a grad scaler: an overflowing step is skipped by the scaler, not a divergence.
        return self.settings.skips_overflow_steps or math.isfinite(self.grad_norm), self.grad_norm

    def step(self) -> float:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.grad_norm


class DeepSpeedStepper:
    """DeepSpeed's engine owns accumulation, clipping and the update. Its step() runs after every
    micro-batch, as it requires: it counts them, and only at the step's last one reduces, clips and
    updates (Fabric's optimizer.step() would call the ZeRO optimizer directly, skipping that count: it
    would update after every micro-batch)."""

    def __init__(self, fabric, model, optimizer, settings):
        self.fabric, self.model, self.optimizer, self.settings = fabric, model, optimizer, settings
        self.engine = deepspeed_engine(model)
        self.own_norm = math.nan

    def loss_multiplier(self, micro_batches: int) -> int:
        return micro_batches

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.fabric.backward(loss)
        if not last:
            self.engine.step()  # counted; the boundary's step (in step() below) is the real one

    def finish_gradients(self) -> tuple[bool, Optional[float]]:
        self.own_norm = math.nan
        if keeps_no_grad_norm(self.engine):  # ZeRO-0 in fp32: DeepSpeed clips but keeps no norm
            self.own_norm = float(grad_norm(self.model))
            return math.isfinite(self.own_norm), self.own_norm
        return self.settings.skips_overflow_steps or grads_finite(self.engine), None

    def step(self) -> float:
        self.engine.step()  # the accumulation boundary: reduce, clip, update
        reported = reported_grad_norm(self.engine)
        self.optimizer.zero_grad(set_to_none=True)
        return reported if reported is not None else self.own_norm


def stepper_for(fabric, model, optimizer, settings):
    """The stepper of the backend the model was set up with (`settings`: the engine's LoopSettings)."""
    kind = DeepSpeedStepper if deepspeed_engine(model) is not None else FabricStepper
    return kind(fabric, model, optimizer, settings)


def grad_norm(model) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


# ---------------------------------------------------------------------------- DeepSpeed's engine


def deepspeed_engine(model):
    """The DeepSpeed engine under Fabric's wrapper, or None for other strategies (Fabric has no public
    accessor for the module it wraps)."""
    engine = getattr(model, "_forward_module", None)
    return engine if hasattr(engine, "zero_optimization_stage") else None


def keeps_no_grad_norm(engine) -> bool:
    """DeepSpeed ZeRO-0 in fp32 clips in its step (torch's clip_grad_norm_) but keeps no gradient norm,
    so the stepper measures it there itself; every other DeepSpeed mode keeps one in its optimizer."""
    return engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled() and not engine.fp16_enabled()


def reported_grad_norm(engine) -> Optional[float]:
    """DeepSpeed's global gradient norm of the last optimiser step (before clipping); None where it keeps none."""
    norm = engine.get_global_grad_norm()
    if norm is None:  # the engine copies it from its ZeRO optimizer on some paths only
        norm = getattr(engine.optimizer, "_global_grad_norm", None)
    return None if norm is None else float(norm)


def grads_finite(engine) -> bool:
    """Whether this rank's share of the accumulated gradients is finite, read after DeepSpeed's last
    backward of the step and before its step() (which would apply them): the ZeRO-1/2 partitions it
    is about to step (`averaged_gradients`), ZeRO-3's local fp32 partitions, or without ZeRO the bf16
    optimizer's fp32 gradients (`_hp_grad`) or the plain ones. DeepSpeed has no public check that
    runs before its step."""
    optimizer = getattr(engine, "optimizer", None)
    if engine.zero_optimization_stage() == 3:
        from deepspeed.utils import safe_get_local_grad

        grads = [safe_get_local_grad(p) for p in engine.module.parameters() if p.requires_grad]
    elif isinstance(getattr(optimizer, "averaged_gradients", None), dict):
        grads = [g for group in optimizer.averaged_gradients.values() for g in (group or [])]
    else:
        grads = [
            getattr(p, "_hp_grad", None) if getattr(p, "_hp_grad", None) is not None else p.grad
            for p in engine.module.parameters()
            if p.requires_grad
        ]
    grads = [g for g in grads if g is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def partitions_weights(model) -> bool:
    """True under ZeRO-3: each rank holds a slice of every weight, gathered only inside forward."""
    engine = deepspeed_engine(model)
    return engine is not None and bool(engine.zero_optimization_partition_weights())


def share_fp32_master_weights(model) -> int:
    """Bytes freed on this rank by letting DeepSpeed's fp32 master partitions be the fp32 weights' own.

    With fp32 weights the ZeRO optimizers still keep a master copy of each rank's weight partition:
    ZeRO-1/2 always clone it, and ZeRO-3's check for "already fp32" compares a torch.device with a
    device string and never matches (DeepSpeed 0.19). The copy holds the same values and the step
    writes it back into the weights, so pointing each master partition at the weights' partition
    drops a partition's worth of memory (4 bytes per parameter / ranks) and changes no number.
    The optimizers' partition lists are internal attributes (no public accessor)."""
    optimizer = getattr(deepspeed_engine(model), "optimizer", None)
    pairs = [
        (
            getattr(optimizer, "fp16_partitioned_groups_flat", None),
            getattr(optimizer, "fp32_partitioned_groups_flat", None),
        ),
        (_own_partitions(optimizer), getattr(optimizer, "single_partition_of_fp32_groups", None)),
    ]
    freed = 0
    for weights, masters in pairs:
        for weight, master in zip(weights or [], masters or []):
            if (
                weight is not None
                and weight.dtype == master.dtype == torch.float32
                and weight.device == master.device
                and weight.shape == master.shape
                and weight.untyped_storage().data_ptr() != master.untyped_storage().data_ptr()
                and torch.equal(weight, master)  # the copy DeepSpeed made, not yet stepped
            ):
                master.data = weight.data
                freed += master.numel() * 4
    return freed


def _own_partitions(optimizer) -> Optional[list]:
    """ZeRO-1/2: this rank's partition of each flat weight group (views into the full weights)."""
    groups = getattr(optimizer, "parallel_partitioned_bit16_groups", None)
    process_groups = getattr(optimizer, "real_dp_process_group", None)
    if groups is None or process_groups is None:
        return None
    import deepspeed.comm as dist

    return [group[dist.get_rank(group=process_groups[i])] for i, group in enumerate(groups)]


# ---------------------------------------------------------------------------- ZeRO-3 weights


def gathered_state_dict(fabric, model, trainable_only: bool = False) -> Optional[dict]:
    """The full model state (or only its trainable tensors) on rank 0, None elsewhere. Under ZeRO-3 the
    weights are partitioned: every rank takes part in gathering them, one tensor at a time (the whole
    model through the engine's consolidation, which Fabric and DeepSpeed call on save, not publicly)."""
    bare = getattr(model, "module", model)
    if not partitions_weights(model):
        if trainable_only:
            names = {n for n, p in bare.named_parameters() if p.requires_grad}
            return {k: v for k, v in bare.state_dict().items() if k in names}
        return bare.state_dict()
    if not trainable_only:
        return deepspeed_engine(model)._zero3_consolidated_16bit_state_dict()
    import deepspeed

    state = {}
    for name, param in bare.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if fabric.is_global_zero:
                    state[name] = param.detach().clone().cpu()
    return state if fabric.is_global_zero else None


def gathered_tensors(model, dtype, is_rank_zero: bool):
    """A ZeRO-3 model's full state for an export written one tensor at a time: (layout {name: (shape,
    dtype)}, an iterator of (name, tensor on rank 0 / None elsewhere)). Every rank must run the iterator
    to its end: each step gathers one weight (a collective) and releases it at the next, so rank 0
    holds one whole tensor at a time, never the consolidated model."""
    import deepspeed

    bare = getattr(model, "module", model)
    entries = bare.state_dict(keep_vars=True)  # partitioned weights keep their real shape in ds_shape

    def final_dtype(tensor):
        return dtype if tensor.is_floating_point() else tensor.dtype

    layout = {name: (tuple(getattr(t, "ds_shape", t.shape)), final_dtype(t)) for name, t in entries.items()}

    def tensors():
        for name, tensor in entries.items():
            partitioned = hasattr(tensor, "ds_id")
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=partitioned):
                yield name, tensor.detach().to(final_dtype(tensor)) if is_rank_zero else None

    return layout, tensors()


def load_into_partitioned(model, path, is_rank_zero: bool, **options) -> None:
    """Pretrained weights into a ZeRO-3 model built partitioned (under `fabric.init_module`): tensor by
    tensor, shard file by shard file, rank 0 reads each one and DeepSpeed scatters it to the ranks
    that own its slices, so no rank ever holds the whole model. The model says which tensors its
    checkpoint gives (`Bumblebee.checkpoint_tensors`; a reward model's adds its new head, `options`: its seed)."""
    import deepspeed

    parameters = dict(model.named_parameters())
    for name, load in model.checkpoint_tensors(path, **options):
        param = parameters[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if is_rank_zero:
                param.data.copy_(load())


# ---------------------------------------------------------------------------- DeepSpeed on CPU


def cpu_deepspeed_strategy(config: dict):
    """Fabric's DeepSpeedStrategy minus its CUDA-only check: the real DeepSpeed engine on CPU
    processes, talking over gloo (DeepSpeed's CPU accelerator). It overrides three of Fabric's
    methods, two of them private, and calls the private steps of Fabric's own `_setup_distributed`."""
    from lightning.fabric.strategies import DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self) -> None:
            super(DeepSpeedStrategy, self).setup_environment()  # DDPStrategy's: devices, then the process group

        def _setup_distributed(self) -> None:
            # Fabric's, less its check that CUDA device indices match local ranks (CPU devices have none).
            import deepspeed.ops
            from lightning.fabric.utilities.seed import reset_seed

            # Plain gloo collectives: DeepSpeed's optional shared-memory kernel would be compiled on first
            # use on every fresh machine, and a run killed while compiling leaves a lock the next waits on forever.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            reset_seed()
            self._set_world_ranks()
            self._init_deepspeed_distributed()
            if not self._config_initialized:
                self._format_config()
                self._config_initialized = True

        def _initialize_engine(self, model, optimizer=None, scheduler=None):
            # Fabric's, with the local rank as DeepSpeed's device rank (a CPU device has no index).
            return _initialize_engine(self.config, self.local_rank, model, optimizer, scheduler)

    return CPUDeepSpeedStrategy(config=config, process_group_backend="gloo")


def cuda_deepspeed_strategy(config: dict):
    """Fabric's DeepSpeedStrategy; with sequence parallelism, its engine made with DeepSpeed's SP groups
    (Fabric's `_initialize_engine` passes no `mpu`)."""
    from lightning.fabric.strategies import DeepSpeedStrategy

    if sequence_parallel_size(config) == 1:
        return DeepSpeedStrategy(config=config)

    class SequenceParallelDeepSpeedStrategy(DeepSpeedStrategy):
        def _initialize_engine(self, model, optimizer=None, scheduler=None):
            return _initialize_engine(self.config, self.root_device.index, model, optimizer, scheduler)

    return SequenceParallelDeepSpeedStrategy(config=config)


def _initialize_engine(config: dict, device_rank, model, optimizer, scheduler):
    """deepspeed.initialize as Fabric calls it, plus DeepSpeed's SP state (`mpu`) under sequence parallelism:
    the engine then partitions ZeRO over every rank and divides the summed gradients by the data-parallel size."""
    import argparse

    import deepspeed

    size = sequence_parallel_size(config)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        args=argparse.Namespace(device_rank=device_rank),
        config=config,
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=scheduler,
        dist_init_required=False,
        mpu=sequence_parallel_state(size) if size > 1 else None,
    )
    return engine, ds_optimizer, ds_scheduler


# ---------------------------------------------------------------------------- sequence parallelism


def sequence_parallel_size(config: Optional[dict]) -> int:
    """The SP size a filled DeepSpeed config carries (train/launch.py writes it; DeepSpeed reads it too)."""
    return int((config or {}).get("sequence_parallel_size", 1))


def sequence_parallel_state(size: int):
    """DeepSpeed's SP state module (its Ulysses groups of `size` consecutive ranks and the data-parallel
    group across them), initialised once per process after the processes are connected."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as state

    try:
        made = state.get_sequence_parallel_world_size()
    except AssertionError:  # not made yet in this process
        state.initialize_sequence_parallel(sequence_parallel_size=size)
        made = size
    if made != size:
        raise ValueError(f"sequence_parallel_size {size}: this process already has SP groups of {made}")
    return state


def sequence_parallel_group(size: int):
    """This rank's Ulysses group (the ranks that share each sample's sequence)."""
    return sequence_parallel_state(size).get_sequence_parallel_group()


def gradient_averaging_size(fabric, model) -> int:
    """Over how many ranks the backend averages gradients: the world, or under sequence parallelism what
    DeepSpeed 0.19 divides the summed gradients by. ZeRO-0/1/2 divide by the data-parallel size (world /
    SP: the SP ranks each hold a slice's gradient, their sum is the sample's). ZeRO-3's reduce-scatter path
    divides by the whole world, SP or not (its contiguous path by world / SP), so launch.py turns
    `reduce_scatter` on under SP for one known divisor (tests/train/test_sequence_parallel.py pins both)."""
    engine = deepspeed_engine(model)
    size = engine.sequence_parallel_size if engine is not None else 1
    if size > 1 and engine.zero_optimization_stage() == 3:
        return fabric.world_size
    return fabric.world_size // max(1, int(size))
