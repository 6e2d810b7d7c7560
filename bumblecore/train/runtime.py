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
strategy refuses; that is how the tests exercise ZeRO-1/2/3 without a GPU. What the strategies do once
the model is set up (the step, ZeRO-3's gathers, every private name they need) is train/backend.py's.
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
            from bumblecore.train.backend import cpu_deepspeed_strategy

            strategy = cpu_deepspeed_strategy(deepspeed_config)
        else:
            from bumblecore.train.backend import cuda_deepspeed_strategy

            # DeepSpeed keeps fp32 master weights itself; its bf16/fp16 sections (filled above) set the compute dtype.
            strategy = cuda_deepspeed_strategy(deepspeed_config)
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
