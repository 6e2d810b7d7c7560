"""The only place that knows about strategies and launchers: builds Lightning Fabric for a run.

One rule for the processes: when a launcher started them (`fabric run`, `torchrun`, the `deepspeed`
launcher, SLURM's `srun`), the world size, ranks and nodes are the launcher's; otherwise they come
from `devices` x `num_nodes` and a plain `bumblecore train` starts the processes itself. Anything
else that runs several copies of the command is refused before it writes a thing. Every rank then
runs on its share of the cores (cores // processes per node torch threads) unless the user set
OMP_NUM_THREADS (a value other than the one its launcher writes) or torch.set_num_threads.

Strategy: single process, DDP (world size > 1) or DeepSpeed (`deepspeed_config_path`), precision from
`train_model_precision`. DeepSpeed JSON may say "auto"; those values are filled from the run's keys
the way the original did (micro batch, accumulation, clipping, precision, bucket sizes from hidden
size) and the launcher's world size. DeepSpeed runs on CPU processes too (gloo), which Fabric's own
strategy refuses; that is how the tests exercise ZeRO-1/2/3 without a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

PRECISIONS = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def fabric_precision(train_model_precision: str) -> str:
    if train_model_precision not in PRECISIONS:
        raise ValueError(f"train_model_precision {train_model_precision!r} is not supported; choose fp32, fp16 or bf16")
    return PRECISIONS[train_model_precision]


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode (no dropout) inside the block, back in the mode it had after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- launchers


@dataclass
class Launch:
    """Who started this process and the shape of the job."""

    launcher: Optional[str]  # None: nothing did; we start the processes (if more than one)
    devices: int  # processes per node
    num_nodes: int
    accelerator: str
    precision: Optional[str] = None  # `fabric run --precision` overrides the config's
    cluster_environment: Any = None  # a Fabric ClusterEnvironment for launchers Fabric does not detect

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _int_env(environ: Mapping[str, str], name: str) -> Optional[int]:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        return None


def _slurm_tasks_per_node(value: str) -> int:
    """SLURM_NTASKS_PER_NODE is "4" or, for uneven jobs, "4(x2),3": the first node's count."""
    return int(value.split(",")[0].split("(")[0])


SUPPORTED_LAUNCH_LINES = (
    "bumblecore train --config F --devices N                      (this machine: starts N processes)\n"
    "  fabric run --devices N [--num-nodes M --node-rank R --main-address HOST] bumblecore/__main__.py train --config F\n"
    "  torchrun --nproc_per_node N [--nnodes M ...] -m bumblecore train --config F\n"
    "  deepspeed --num_gpus N bumblecore/__main__.py train --config F\n"
    "  srun (SLURM, --ntasks-per-node N) bumblecore train --config F   (scripts/slurm_train.sbatch)"
)


SELF_LAUNCHED = "BUMBLECORE_SELF_LAUNCHED"  # set before Fabric starts our own ranks; they inherit it


def launch_processes(fabric, launch: Launch) -> None:
    """Start this run's other ranks when nothing else did (each reruns the same command; no-op for one
    process), or join the ranks an external launcher started; then give this rank its share of the
    cores (`intra_op_threads`)."""
    import torch

    # Read before Fabric's launch, which sets OMP_NUM_THREADS itself when it is unset.
    environ, torch_threads = dict(os.environ), torch.get_num_threads()
    if launch.launcher is None:
        os.environ[SELF_LAUNCHED] = "1"  # the children copy the environment as they start
        try:
            fabric.launch()
        finally:
            os.environ.pop(SELF_LAUNCHED, None)  # later commands of this process (the Python API) start afresh
    elif launch.launcher != "fabric run":  # fabric run has set Fabric up itself
        fabric.launch()
    # The environment stays the user's: a later run in this process must not take Fabric's value for theirs.
    if "OMP_NUM_THREADS" in environ:
        os.environ["OMP_NUM_THREADS"] = environ["OMP_NUM_THREADS"]
    else:
        os.environ.pop("OMP_NUM_THREADS", None)
    threads = intra_op_threads(launch.launcher, launch.devices, environ, available_cores(), torch_threads)
    if threads is not None:
        _set_threads(threads)


# ---------------------------------------------------------------------------- threads


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset, cgroups and SLURM narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def launcher_omp_default(launcher: Optional[str], local_world_size: int, cores: int) -> Optional[int]:
    """What a launcher writes into OMP_NUM_THREADS when the user left it unset (None: it writes nothing).
    torchrun: 1 when it starts several processes per node. `fabric run`: the machine's cores, whatever
    --devices says (a default sized for one process). The deepspeed launcher sets it only with
    --bind_cores_to_rank, to each rank's own bound cores, a value to keep; srun and we set nothing."""
    if launcher == "torchrun" and local_world_size > 1:
        return 1
    if launcher == "fabric run":
        return cores
    return None


_threads_set_here: Optional[int] = None  # what this process last chose, so a later run in it is not taken as the user's


def intra_op_threads(
    launcher: Optional[str], local_world_size: int, environ: Mapping[str, str], cores: int, torch_threads: int
) -> Optional[int]:
    """This rank's torch intra-op threads: its share of the cores, `cores // processes per node` (at least
    1), whatever launched it; None keeps the user's own choice. The user chose when OMP_NUM_THREADS holds
    a value other than the one the launcher writes when it is unset (launcher_omp_default), or when a
    Python caller's torch.set_num_threads left torch a count other than OMP_NUM_THREADS (or, unset, the
    cores) gives it. A user value equal to the launcher's default cannot be told from it: it is replaced."""
    value = environ.get("OMP_NUM_THREADS")
    launcher_default = launcher_omp_default(launcher, local_world_size, cores)
    if value is not None and (launcher_default is None or value.strip() != str(launcher_default)):
        return None
    implied = cores if value is None else launcher_default
    if torch_threads not in (implied, _threads_set_here):
        return None
    return max(1, cores // max(1, local_world_size))


def _set_threads(threads: int) -> None:
    import torch

    global _threads_set_here
    torch.set_num_threads(threads)
    _threads_set_here = threads


def detect_launch(
    devices: int = 1, num_nodes: int = 1, accelerator: str = "auto", environ: Optional[Mapping[str, str]] = None
) -> Launch:
    """The job's shape from the launcher's environment, else from the config's devices/num_nodes."""
    env = os.environ if environ is None else environ
    if env.get(SELF_LAUNCHED) == "1":  # a rank that `bumblecore train --devices N` started: the same config
        return Launch(None, int(devices), int(num_nodes), accelerator)
    if env.get("LT_CLI_USED") == "1":  # `fabric run` (it starts the processes through torchrun)
        local = _int_env(env, "LOCAL_WORLD_SIZE") or _int_env(env, "LT_DEVICES") or devices
        world = _int_env(env, "WORLD_SIZE") or local * (_int_env(env, "LT_NUM_NODES") or num_nodes)
        return Launch(
            "fabric run",
            local,
            max(1, world // local),
            env.get("LT_ACCELERATOR", accelerator),
            env.get("LT_PRECISION") or None,
        )
    if env.get("TORCHELASTIC_RUN_ID") is not None:  # torchrun (also accelerate launch, torch.distributed.run)
        local = _int_env(env, "LOCAL_WORLD_SIZE") or 1
        world = _int_env(env, "WORLD_SIZE") or local
        return Launch("torchrun", local, max(1, world // local), accelerator)
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env and "RANK" in env:  # the deepspeed launcher
        local = _int_env(env, "LOCAL_SIZE") or 1
        world = _int_env(env, "WORLD_SIZE") or local
        return Launch(
            "deepspeed",
            local,
            max(1, world // local),
            accelerator,
            cluster_environment=_env_variables_environment(node_rank_variable="CROSS_RANK"),
        )
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        tasks = _int_env(env, "SLURM_NTASKS") or 1
        nodes = _int_env(env, "SLURM_NNODES") or 1
        per_node = (
            _slurm_tasks_per_node(env["SLURM_NTASKS_PER_NODE"]) if env.get("SLURM_NTASKS_PER_NODE") else tasks // nodes
        )
        if tasks > 1 and "SLURM_PROCID" not in env:
            raise ValueError(
                f"SLURM allocated {tasks} tasks but this process was not started by srun: put `srun` before "
                "the command (see scripts/slurm_train.sbatch), or run with --devices N inside one task"
            )
        if per_node * nodes != tasks:
            raise ValueError(
                f"SLURM job with {tasks} tasks on {nodes} node(s) is uneven; use --ntasks-per-node so every "
                "node runs the same number of processes"
            )
        return Launch("srun", per_node, nodes, accelerator)
    for variable, name in (
        ("OMPI_COMM_WORLD_SIZE", "mpirun (Open MPI)"),
        ("PMI_SIZE", "an MPI launcher (PMI)"),
        ("PMIX_SIZE", "an MPI launcher (PMIx)"),
        ("WORLD_SIZE", "an unknown launcher (WORLD_SIZE is set)"),
    ):
        if (_int_env(env, variable) or 1) > 1:
            raise ValueError(
                f"this process was started by {name}, which bumblecore does not support: it would run "
                f"independent copies of the same training. Run one of these instead:\n  {SUPPORTED_LAUNCH_LINES}"
            )
    return Launch(None, int(devices), int(num_nodes), accelerator)


def _env_variables_environment(node_rank_variable: str):
    from lightning.fabric.plugins.environments import ClusterEnvironment  # imported here: lightning is slow to import

    class EnvVariables(ClusterEnvironment):
        """A launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT but that
        Fabric does not detect (the deepspeed launcher); the node rank comes from its own variable."""

        def __init__(self, node_rank_variable: str = "NODE_RANK"):
            super().__init__()
            self.node_rank_variable = node_rank_variable

        @property
        def creates_processes_externally(self) -> bool:
            return True

        @property
        def main_address(self) -> str:
            return os.environ.get("MASTER_ADDR", "127.0.0.1")

        @property
        def main_port(self) -> int:
            return int(os.environ.get("MASTER_PORT", "29500"))

        @staticmethod
        def detect() -> bool:
            return "RANK" in os.environ and "WORLD_SIZE" in os.environ

        def world_size(self) -> int:
            return int(os.environ["WORLD_SIZE"])

        def set_world_size(self, size: int) -> None:
            pass  # the launcher's

        def global_rank(self) -> int:
            return int(os.environ["RANK"])

        def set_global_rank(self, rank: int) -> None:
            pass  # the launcher's

        def local_rank(self) -> int:
            return int(os.environ.get("LOCAL_RANK", 0))

        def node_rank(self) -> int:
            return int(os.environ.get(self.node_rank_variable, 0))

    return EnvVariables(node_rank_variable)


# ---------------------------------------------------------------------------- DeepSpeed config


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
    layer_params: Optional[int] = None,
) -> dict:
    """Replace every "auto" with the value the run implies; explicit values are kept, and must agree.
    `layer_params`: parameters of one decoder layer (default 12 x hidden^2, a standard layer), which
    sizes ZeRO-3's live-parameter and reuse-distance limits (docs/CONFIG.md, "ZeRO-3 knobs")."""
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
        # DeepSpeed's 1e9 defaults keep every gathered weight until the step for a model under 1B
        # parameters: a rank would hold the whole model. Two layers live (the one computing and the one
        # prefetched); a weight not reused within a layer's worth of others is released, not kept.
        layer = layer_params or 12 * h2
        fill(zero, "stage3_max_live_parameters", 2 * layer)
        fill(zero, "stage3_max_reuse_distance", layer)
        # The ZeRO-3 step flattens each sub-group's gradient partition into a fresh fp32 buffer: sized to
        # a layer, that transient is a layer's slice, not the whole partition (the default 1e9 is).
        fill(zero, "sub_group_size", layer)
    leftover = sorted(_auto_keys(config))
    if leftover:
        raise ValueError(f"DeepSpeed config keeps 'auto' values that bumblecore cannot fill: {', '.join(leftover)}")
    micro, accumulation = config.get("train_micro_batch_size_per_gpu"), config.get("gradient_accumulation_steps")
    if isinstance(micro, int) and isinstance(accumulation, int) and isinstance(config.get("train_batch_size"), int):
        if config["train_batch_size"] != micro * accumulation * world_size:
            raise ValueError(
                f"DeepSpeed config: train_batch_size {config['train_batch_size']} != micro batch {micro} x accumulation "
                f'{accumulation} x world size {world_size}; set it to "auto"'
            )
    return config


def _auto_keys(config: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in config.items():
        if value == "auto":
            found.append(prefix + key)
        elif isinstance(value, dict):
            found += _auto_keys(value, f"{prefix}{key}.")
    return found


def zero_stage(deepspeed_config: Optional[dict]) -> Optional[int]:
    """The ZeRO stage of a DeepSpeed config (0 without a zero_optimization section), None without DeepSpeed."""
    if deepspeed_config is None:
        return None
    return int((deepspeed_config.get("zero_optimization") or {}).get("stage", 0))


# ---------------------------------------------------------------------------- Fabric


def _cpu_deepspeed_strategy(config: dict):
    """Fabric's DeepSpeedStrategy minus its CUDA-only check: the real DeepSpeed engine on CPU
    processes, talking over gloo (DeepSpeed's CPU accelerator)."""
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
            import argparse

            import deepspeed

            engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=self.config,
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer,
                lr_scheduler=scheduler,
                dist_init_required=False,
            )
            return engine, ds_optimizer, ds_scheduler

    return CPUDeepSpeedStrategy(config=config, process_group_backend="gloo")


def build_fabric(
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    train_model_precision: str = "bf16",
    deepspeed_config: Optional[dict] = None,
    launch: Optional[Launch] = None,
):
    """Fabric for the run. `deepspeed_config` is an already-filled DeepSpeed dict, or None; `launch`
    (from detect_launch) overrides accelerator/devices/num_nodes with the launcher's."""
    import torch
    from lightning.fabric import Fabric

    launch = launch or detect_launch(devices, num_nodes, accelerator)
    precision = launch.precision or fabric_precision(train_model_precision)
    accelerator = launch.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu" and train_model_precision == "fp16":
        raise ValueError("train_model_precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    plugins = [launch.cluster_environment] if launch.cluster_environment is not None else None
    if deepspeed_config is not None:
        # DeepSpeed still calls torch.distributed's old names (reduce_scatter_tensor ...): one warning per call.
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use", category=FutureWarning)
        if accelerator == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
            strategy = _cpu_deepspeed_strategy(deepspeed_config)
        else:
            from lightning.fabric.strategies import DeepSpeedStrategy

            # DeepSpeed keeps fp32 master weights itself; its bf16/fp16 sections (filled above) set the compute dtype.
            strategy = DeepSpeedStrategy(config=deepspeed_config)
    elif launch.world_size > 1:
        strategy = "ddp"
    else:
        strategy = "auto"
    return Fabric(
        accelerator=accelerator,
        devices=launch.devices,
        num_nodes=launch.num_nodes,
        precision=precision,
        strategy=strategy,
        plugins=plugins,
    )


def deepspeed_engine(model):
    """The DeepSpeed engine under Fabric's wrapper, or None for other strategies."""
    engine = getattr(model, "_forward_module", None)
    return engine if hasattr(engine, "zero_optimization_stage") else None


def share_fp32_master_weights(model) -> int:
    """Bytes freed on this rank by letting DeepSpeed's fp32 master partitions be the fp32 weights' own.

    With fp32 weights the ZeRO optimizers still keep a master copy of each rank's weight partition:
    ZeRO-1/2 always clone it, and ZeRO-3's check for "already fp32" compares a torch.device with a
    device string and never matches (DeepSpeed 0.19). The copy holds the same values and the step
    writes it back into the weights, so pointing each master partition at the weights' partition
    drops a partition's worth of memory (4 bytes per parameter / ranks) and changes no number."""
    import torch

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


def partitions_weights(model) -> bool:
    """True under ZeRO-3: each rank holds a slice of every weight, gathered only inside forward."""
    engine = deepspeed_engine(model)
    return engine is not None and bool(engine.zero_optimization_partition_weights())


def runtime_keeps_no_grad_norm(model) -> bool:
    """DeepSpeed ZeRO-0 in fp32 clips in its step (torch's clip_grad_norm_) but keeps no gradient
    norm, so the loop measures it there itself; every other DeepSpeed mode keeps one in its optimizer."""
    engine = deepspeed_engine(model)
    return (
        engine is not None
        and engine.zero_optimization_stage() == 0
        and not engine.bfloat16_enabled()
        and not engine.fp16_enabled()
    )


def runtime_grad_norm(model) -> Optional[float]:
    """DeepSpeed's global gradient norm of the last optimiser step (before clipping); None where it keeps none."""
    engine = deepspeed_engine(model)
    if engine is None:
        return None
    norm = engine.get_global_grad_norm()
    if norm is None:  # the engine copies it from its ZeRO optimizer on some paths only
        norm = getattr(engine.optimizer, "_global_grad_norm", None)
    return None if norm is None else float(norm)


def gathered_state_dict(fabric, model, trainable_only: bool = False) -> Optional[dict]:
    """The full model state (or only its trainable tensors) on rank 0, None elsewhere. Under ZeRO-3 the
    weights are partitioned: every rank takes part in gathering them, one tensor at a time."""
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


def load_into_partitioned(model, path, is_rank_zero: bool) -> None:
    """Pretrained weights into a ZeRO-3 model built partitioned (under `fabric.init_module`): tensor by
    tensor, shard file by shard file, rank 0 reads each one and DeepSpeed scatters it to the ranks
    that own its slices, so no rank ever holds the whole model."""
    import deepspeed

    from bumblecore.model.hf_io import expected_tensors, iter_checkpoint

    parameters = dict(model.named_parameters())
    for name, load in iter_checkpoint(path, model.config, expected_tensors(model)):
        param = parameters[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if is_rank_zero:
                param.data.copy_(load())
