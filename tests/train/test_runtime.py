"""Runtime: precision names, DeepSpeed "auto" filling (the original's rules), clear CPU errors."""

import json
import os
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

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


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


def test_each_rank_gets_its_share_of_the_cores_unless_the_user_chose(monkeypatch):
    """The thread rule of every launcher, on 8 cores with 2 processes per node: a value the launcher
    writes itself (its own code, run here, is the oracle of what it writes) is replaced by 8 // 2;
    the user's OMP_NUM_THREADS, or torch.set_num_threads, is kept."""
    from bumblecore.train import runtime
    from bumblecore.train.runtime import intra_op_threads

    monkeypatch.setattr(runtime, "_threads_set_here", None)  # no earlier run in this process

    def threads(launcher, local, environ, torch_threads=None, cores=8):
        implied = int(environ["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in environ else cores
        return intra_op_threads(launcher, local, environ, cores, implied if torch_threads is None else torch_threads)

    for launcher in (None, "deepspeed", "srun"):  # nothing written by the launcher: unset is ours to choose
        assert threads(launcher, 2, {}) == 4
        assert threads(launcher, 1, {}) == 8
        assert threads(launcher, 2, {"OMP_NUM_THREADS": "8"}) is None  # the user's, even if it is the cores
    assert threads("fabric run", 2, {"OMP_NUM_THREADS": "8"}) == 4  # fabric run's default: all the cores
    assert threads("fabric run", 2, {"OMP_NUM_THREADS": "3"}) is None
    assert threads("fabric run", 1, {"OMP_NUM_THREADS": "8"}) == 8
    assert threads("torchrun", 2, {"OMP_NUM_THREADS": "1"}) == 4  # torchrun's default for several processes
    assert threads("torchrun", 1, {"OMP_NUM_THREADS": "1"}) is None  # one process: torchrun writes nothing
    assert threads("torchrun", 2, {"OMP_NUM_THREADS": "2"}) is None
    assert threads(None, 2, {}, torch_threads=3) is None  # torch.set_num_threads(3) by a Python caller
    assert threads(None, 3, {}, cores=2) == 1  # at least one thread


def test_the_launchers_own_defaults_are_the_ones_the_rule_knows(monkeypatch):
    """What torchrun and `fabric run` really write into an unset OMP_NUM_THREADS, read from their code."""
    import torch.distributed.run as torchrun
    from lightning.fabric.utilities.distributed import _suggested_max_num_threads

    from bumblecore.train.runtime import available_cores, launcher_omp_default

    cores = available_cores()
    # `fabric run` sets OMP_NUM_THREADS to this before it starts torchrun (lightning/fabric/cli.py)
    assert launcher_omp_default("fabric run", 2, cores) == _suggested_max_num_threads()
    for processes in (1, 2):
        monkeypatch.setenv("OMP_NUM_THREADS", "x")  # so that the teardown restores the real value
        monkeypatch.delenv("OMP_NUM_THREADS")
        torchrun.config_from_args(torchrun.parse_args(["--nproc_per_node", str(processes), "train.py"]))
        written = os.environ.get("OMP_NUM_THREADS")
        assert launcher_omp_default("torchrun", processes, cores) == (None if written is None else int(written))
