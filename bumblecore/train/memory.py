"""The memory plan of a run: what each rank holds for parameters, gradients and optimizer states,
for the strategy and world size at hand, checked against the device before anything is allocated.

Bytes per parameter, with Adam (the ZeRO paper's accounting; P all parameters, T trainable, N ranks):

    plain / DDP (fp32 weights, bf16 autocast)     4P weights + 4T gradients + 8T Adam moments
    DeepSpeed with bf16/fp16                      2P weights + 2T gradients + 12T (fp32 master + moments)
    DeepSpeed ZeRO-1/2/3 in fp32                  4P weights + 4T gradients + 12T (it keeps an fp32 master copy too)
    DeepSpeed ZeRO-0 in fp32                      4P weights + 4T gradients + 8T
    ZeRO-1 divides the optimizer states by N, ZeRO-2 the gradients too, ZeRO-3 the weights too;
    offload_optimizer / offload_param move those states to host memory.

Activations are not counted (they depend on the batch and on gradient checkpointing), so a plan that
exceeds the device is a run that cannot fit at all: it is refused before the model is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

GIB = 1024**3


@dataclass
class MemoryPlan:
    parameters: int
    gradients: int
    optimizer: int
    device_name: str
    available: Optional[int]  # bytes this rank may use on its device; None when unknown
    strategy: str
    host_offload: int = 0  # bytes moved to host memory by ZeRO offload
    extra: dict = field(default_factory=dict)  # name -> bytes (e.g. a frozen DPO reference)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + sum(self.extra.values())

    def lines(self) -> list[str]:
        parts = [
            f"parameters {_gib(self.parameters)}",
            f"gradients {_gib(self.gradients)}",
            f"optimizer states {_gib(self.optimizer)}",
        ] + [f"{k} {_gib(v)}" for k, v in self.extra.items()]
        where = (
            f"{_gib(self.available)} available on {self.device_name}"
            if self.available is not None
            else f"{self.device_name}"
        )
        text = f"  memory plan per rank ({self.strategy}): {', '.join(parts)} = {_gib(self.total)} before activations; {where}"
        lines = [text]
        if self.host_offload:
            lines.append(f"  offloaded to host memory per rank: {_gib(self.host_offload)}")
        return lines

    def check(self) -> None:
        if self.available is not None and self.total > self.available:
            raise ValueError(
                f"this run cannot fit: each rank needs {_gib(self.total)} for parameters, gradients and optimizer states "
                f"alone ({self.strategy}), but {self.device_name} has {_gib(self.available)} available. Shard more: "
                "ZeRO-3 (--deepspeed_config_path configs/deepspeed/ds_z3_config.json) over more devices, bf16, "
                "or LoRA (--finetuning_type lora)"
            )


def _gib(size: Optional[int]) -> str:
    if size is None:
        return "?"
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def plan_memory(
    total_params: int,
    trainable_params: int,
    precision: str,
    world_size: int,
    deepspeed_config: Optional[dict],
    device_name: str,
    available: Optional[int],
    frozen_copy_params: int = 0,
) -> MemoryPlan:
    """Per-rank bytes of the run's states; `frozen_copy_params`: a second model held without gradients
    (a frozen DPO reference), at the weights' width."""
    zero = (deepspeed_config or {}).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if deepspeed_config is not None else None
    sixteen = stage is not None and precision in ("bf16", "fp16")
    width = 2 if sixteen else 4
    frozen = total_params - trainable_params
    parameters = trainable_params * width + frozen * width
    gradients = trainable_params * width
    optimizer = trainable_params * (12 if sixteen or (stage or 0) >= 1 else 8)
    n = max(1, world_size)
    if stage is not None and stage >= 1:
        optimizer //= n
    if stage is not None and stage >= 2:
        gradients //= n
    if stage == 3:
        parameters //= n
    host = 0
    if _offloaded(zero.get("offload_optimizer")):
        host += optimizer
        optimizer = 0
    if stage == 3 and _offloaded(zero.get("offload_param")):
        host += parameters
        parameters = 0
    strategy = f"DeepSpeed ZeRO-{stage}" if stage is not None else ("DDP" if world_size > 1 else "single process")
    strategy += f", {world_size} rank(s), {precision}"
    extra = {"frozen reference": frozen_copy_params * 4} if frozen_copy_params else {}
    return MemoryPlan(parameters, gradients, optimizer, device_name, available, strategy, host, extra)


def _offloaded(section) -> bool:
    return isinstance(section, dict) and section.get("device") in ("cpu", "nvme")


def available_memory(device, local_processes: int) -> tuple[str, Optional[int]]:
    """(name, bytes this rank may use): a GPU's free memory, or this node's available host memory
    shared by the node's processes."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return f"{device} ({torch.cuda.get_device_name(device)})", int(free)
    available = host_memory_available()
    if available is None:
        return "host memory", None
    return f"host memory (shared by {local_processes} process(es))", available // max(1, local_processes)


def host_memory_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def peak_host_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_host_memory() -> None:
    """Hand memory that has been freed back to the OS (glibc keeps freed heap blocks for reuse).
    Building and loading a model churns many short-lived tensors of a layer's size (below glibc's mmap
    threshold, so on the heap); without this a rank's RSS stays up to ~1 GB above what it holds."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (e.g. musl): nothing to trim
