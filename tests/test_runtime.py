"""Runtime: precision names, DeepSpeed "auto" filling (the original's rules), clear CPU errors."""

import json
from pathlib import Path

import pytest

from bumblecore.train.memory import plan_memory
from bumblecore.train.runtime import (
    build_fabric,
    detect_launch,
    fabric_precision,
    fill_deepspeed_config,
    load_deepspeed_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_configs_fill_completely(stage):
    raw = load_deepspeed_config(CONFIGS / f"ds_z{stage}_config.json")
    filled = fill_deepspeed_config(
        raw,
        micro_batch_size=4,
        gradient_accumulation_steps=8,
        world_size=2,
        precision="bf16",
        max_grad_norm=1.0,
        hidden_size=896,
    )
    assert "auto" not in json.dumps(filled)
    assert filled["train_batch_size"] == 64 and filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 8 and filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    zero = filled["zero_optimization"]
    assert zero["stage"] == stage
    if stage >= 1:
        assert zero["reduce_bucket_size"] == 896 * 896
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 896 * 896)
        assert zero["stage3_param_persistence_threshold"] == 8960
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_explicit_values_are_kept_and_unknown_auto_is_an_error():
    raw = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5, "optimizer": {"params": {"lr": "auto"}}}
    with pytest.raises(ValueError, match="optimizer.params.lr"):
        fill_deepspeed_config(
            raw,
            micro_batch_size=4,
            gradient_accumulation_steps=1,
            world_size=1,
            precision="fp32",
            max_grad_norm=1.0,
            hidden_size=64,
        )
    del raw["optimizer"]
    filled = fill_deepspeed_config(
        raw,
        micro_batch_size=4,
        gradient_accumulation_steps=1,
        world_size=1,
        precision="fp32",
        max_grad_norm=1.0,
        hidden_size=64,
    )
    assert filled["train_micro_batch_size_per_gpu"] == 2 and filled["gradient_clipping"] == 0.5


def test_precision_and_cpu_errors():
    assert fabric_precision("bf16") == "bf16-mixed" and fabric_precision("fp32") == "32-true"
    with pytest.raises(ValueError, match="fp64"):
        fabric_precision("fp64")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        build_fabric(accelerator="cpu", train_model_precision="fp16")
    fabric = build_fabric(accelerator="cpu", devices=1, train_model_precision="fp32")
    assert fabric.world_size == 1
    deepspeed = build_fabric(
        accelerator="cpu", train_model_precision="fp32", deepspeed_config={"train_micro_batch_size_per_gpu": 1}
    )
    assert type(deepspeed.strategy).__name__ == "CPUDeepSpeedStrategy"  # the real engine on CPU, over gloo


def test_launchers_give_the_world_size():
    """Each launcher's own variables (as it sets them for rank 1 of 4) decide the job's shape."""
    torchrun = detect_launch(
        environ={"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "1"}
    )
    assert (torchrun.launcher, torchrun.devices, torchrun.num_nodes) == ("torchrun", 2, 2)
    fabric_run = detect_launch(
        environ={
            "LT_CLI_USED": "1",
            "LT_DEVICES": "2",
            "LT_NUM_NODES": "2",
            "LT_ACCELERATOR": "cpu",
            "TORCHELASTIC_RUN_ID": "x",
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
        }
    )
    assert (fabric_run.launcher, fabric_run.world_size, fabric_run.accelerator) == ("fabric run", 4, "cpu")
    deepspeed = detect_launch(
        environ={
            "RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_SIZE": "2",
            "CROSS_RANK": "0",
            "CROSS_SIZE": "2",
        }
    )
    assert (deepspeed.launcher, deepspeed.devices, deepspeed.num_nodes) == ("deepspeed", 2, 2)
    slurm = detect_launch(
        environ={
            "SLURM_NTASKS": "8",
            "SLURM_NNODES": "2",
            "SLURM_NTASKS_PER_NODE": "4(x2)",
            "SLURM_PROCID": "5",
            "SLURM_JOB_NAME": "train",
        }
    )
    assert (slurm.launcher, slurm.devices, slurm.num_nodes) == ("srun", 4, 2)
    plain = detect_launch(devices=3, num_nodes=1, environ={})
    assert (plain.launcher, plain.world_size) == (None, 3)
    interactive = detect_launch(environ={"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive"})
    assert interactive.launcher is None
    with pytest.raises(ValueError, match="not started by srun"):
        detect_launch(environ={"SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "train"})
    with pytest.raises(ValueError, match="mpirun"):
        detect_launch(environ={"OMPI_COMM_WORLD_SIZE": "2"})


def test_filled_train_batch_size_uses_the_world_size_and_a_wrong_explicit_one_is_an_error():
    raw = load_deepspeed_config(CONFIGS / "ds_z2_config.json")
    filled = fill_deepspeed_config(
        raw,
        micro_batch_size=4,
        gradient_accumulation_steps=8,
        world_size=8,
        precision="bf16",
        max_grad_norm=1.0,
        hidden_size=64,
    )
    assert filled["train_batch_size"] == 4 * 8 * 8
    with pytest.raises(ValueError, match="train_batch_size 32"):
        fill_deepspeed_config(
            {**raw, "train_batch_size": 32},
            micro_batch_size=4,
            gradient_accumulation_steps=8,
            world_size=8,
            precision="bf16",
            max_grad_norm=1.0,
            hidden_size=64,
        )


def test_memory_plan_follows_the_zero_paper():
    """Bytes per parameter with Adam: 16 for plain fp32 (4 weights + 4 gradients + 8 moments);
    DeepSpeed bf16 2 + 2 + 12, of which ZeRO-1 shards 12, ZeRO-2 also 2, ZeRO-3 all 16 (over N ranks)."""
    p, n = 1_000_000, 4
    plain = plan_memory(p, p, "fp32", 1, None, "host", None)
    assert (plain.parameters, plain.gradients, plain.optimizer) == (4 * p, 4 * p, 8 * p)
    plans = {
        stage: plan_memory(p, p, "bf16", n, {"zero_optimization": {"stage": stage}}, "gpu", None) for stage in range(4)
    }
    assert plans[0].total == 16 * p
    assert plans[1].total == 2 * p + 2 * p + 12 * p // n
    assert plans[2].total == 2 * p + (2 * p + 12 * p) // n
    assert plans[3].total == 16 * p // n
    lora = plan_memory(p, p // 100, "bf16", n, {"zero_optimization": {"stage": 3}}, "gpu", None)
    assert lora.total == (2 * p + 2 * (p // 100) + 12 * (p // 100)) // n
    offload = plan_memory(
        p, p, "bf16", n, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "gpu", None
    )
    assert offload.optimizer == 0 and offload.host_offload == 12 * p // n
    fp32_zero2 = plan_memory(p, p, "fp32", n, {"zero_optimization": {"stage": 2}}, "gpu", None)
    assert fp32_zero2.total == 4 * p + (4 * p + 8 * p) // n  # fp32 weights are their own master copy
    with pytest.raises(ValueError, match="cannot fit"):
        plan_memory(p, p, "fp32", 1, None, "a small device", 10 * p).check()
