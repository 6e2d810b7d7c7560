"""The only place that knows about strategies: builds Lightning Fabric for a run.

Single process, DDP (devices x nodes > 1) or DeepSpeed (`deepspeed_config_path`), precision from
`train_model_precision`. DeepSpeed JSON may say "auto"; those values are filled from the run's keys
the way the original did (micro batch, accumulation, clipping, precision, bucket sizes from hidden size).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

PRECISIONS = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def fabric_precision(train_model_precision: str) -> str:
    if train_model_precision not in PRECISIONS:
        raise ValueError(f"train_model_precision {train_model_precision!r} is not supported; choose fp32, fp16 or bf16")
    return PRECISIONS[train_model_precision]


def load_deepspeed_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"deepspeed_config_path {path} does not exist")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def fill_deepspeed_config(
    raw: dict,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    precision: str,
    max_grad_norm: Optional[float],
    hidden_size: int,
) -> dict:
    """Replace every "auto" with the value the run implies; explicit values are kept."""
    config = copy.deepcopy(raw)

    def fill(section: dict, key: str, value: Any) -> None:
        if section.get(key) == "auto":
            section[key] = value

    fill(config, "train_micro_batch_size_per_gpu", micro_batch_size)
    fill(config, "gradient_accumulation_steps", gradient_accumulation_steps)
    fill(config, "train_batch_size", micro_batch_size * gradient_accumulation_steps * world_size)
    fill(config, "gradient_clipping", max_grad_norm if max_grad_norm else 0.0)
    for section, wanted in (("fp16", "fp16"), ("bf16", "bf16")):
        if isinstance(config.get(section), dict):
            fill(config[section], "enabled", precision == wanted)
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        h2 = hidden_size * hidden_size
        fill(zero, "reduce_bucket_size", h2)
        fill(zero, "stage3_prefetch_bucket_size", int(0.9 * h2))
        fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    leftover = sorted(_auto_keys(config))
    if leftover:
        raise ValueError(f"DeepSpeed config keeps 'auto' values that bumblecore cannot fill: {', '.join(leftover)}")
    return config


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in config.items():
        if value == "auto":
            found.append(prefix + key)
        elif isinstance(value, dict):
            found += _auto_keys(value, f"{prefix}{key}.")
    return found


def build_fabric(
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    train_model_precision: str = "bf16",
    deepspeed_config: Optional[dict] = None,
):
    """Fabric for the run. `deepspeed_config` is an already-filled DeepSpeed dict, or None."""
    import torch
    from lightning.fabric import Fabric

    precision = fabric_precision(train_model_precision)
    if os.environ.get("LT_CLI_USED") == "1":
        # Started by `fabric run`: the processes exist and the launcher's flags take precedence.
        accelerator = os.environ.get("LT_ACCELERATOR", accelerator)
        devices = int(os.environ.get("LT_DEVICES", devices))
        num_nodes = int(os.environ.get("LT_NUM_NODES", num_nodes))
        precision = os.environ.get("LT_PRECISION", precision)
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu" and train_model_precision == "fp16":
        raise ValueError("train_model_precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    if deepspeed_config is not None:
        if accelerator != "cuda":
            raise ValueError("DeepSpeed needs CUDA GPUs; on CPU leave deepspeed_config_path unset (plain or DDP training)")
        from lightning.fabric.strategies import DeepSpeedStrategy

        # DeepSpeed keeps fp32 master weights itself; its bf16/fp16 sections (filled above) set the compute dtype.
        strategy = DeepSpeedStrategy(config=deepspeed_config)
    elif num_nodes > 1 or int(devices) > 1:
        strategy = "ddp"
    else:
        strategy = "auto"
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision, strategy=strategy)


def gathered_state_dict(fabric, model) -> dict:
    """The full model state on rank 0. Under ZeRO-3 the weights are partitioned: every rank must take
    part in gathering them (DeepSpeed's consolidated 16-bit state dict)."""
    engine = getattr(model, "_forward_module", None)
    partitioned = getattr(engine, "zero_optimization_partition_weights", None)
    if callable(partitioned) and partitioned():
        return engine._zero3_consolidated_16bit_state_dict()
    return getattr(model, "module", model).state_dict()
