"""The DeepSpeed and Lightning Fabric names bumblecore/train/backend.py relies on beyond their public
surface, each checked on the installed versions for the shape the module uses. An upgrade that moves
one fails here, with a message that names it, instead of in a run: most are read with
getattr(..., None), so a moved one would quietly switch a check or a saving off rather than fail.
No other package module may reach one of them: they stay fenced in backend.py."""

import inspect
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKEND = ROOT / "bumblecore" / "train" / "backend.py"

FABRIC = {
    "_forward_module": "the module a _FabricModule wraps (under DeepSpeed: its engine)",
    "_setup_distributed": "DeepSpeedStrategy's process-group setup, overridden for CPU processes",
    "_set_world_ranks": "a step of DeepSpeedStrategy._setup_distributed",
    "_init_deepspeed_distributed": "a step of DeepSpeedStrategy._setup_distributed",
    "_config_initialized": "DeepSpeedStrategy's flag that its config is formatted",
    "_format_config": "a step of DeepSpeedStrategy._setup_distributed",
    "_initialize_engine": "DeepSpeedStrategy's deepspeed.initialize call, overridden for CPU devices",
}
DEEPSPEED = {
    "__compatible_ops__": "deepspeed.ops' table of ops it may build (the shared-memory kernel is switched off)",
    "_zero3_consolidated_16bit_state_dict": "DeepSpeedEngine's ZeRO-3 gather of the whole model",
    "_global_grad_norm": "the ZeRO and bf16 optimizers' gradient norm of the last step",
    "averaged_gradients": "the ZeRO-1/2 optimizer's gradient partitions before its step",
    "_hp_grad": "the bf16 optimizer's fp32 gradient of a parameter",
    "fp16_partitioned_groups_flat": "the ZeRO-3 optimizer's weight partitions",
    "fp32_partitioned_groups_flat": "the ZeRO-3 optimizer's fp32 master partitions",
    "parallel_partitioned_bit16_groups": "the ZeRO-1/2 optimizer's weight partitions, per rank",
    "real_dp_process_group": "the ZeRO-1/2 optimizer's data-parallel process groups",
    "single_partition_of_fp32_groups": "the ZeRO-1/2 optimizer's fp32 master partitions",
}
# Read on a ZeRO-3 parameter here and in model/ (which may not import train/): pinned, not fenced.
PARAMETER_ATTRIBUTES = {"ds_shape": "a partitioned weight's real shape", "ds_id": "marks a partitioned weight"}
PUBLIC = {
    "optimizer",
    "module",
    "zero_optimization_stage",
}  # what backend.py's getattr/hasattr read that is public


def moved(library: str, name: str, what: str):
    pytest.fail(
        f"{library} moved {name}: {what}. bumblecore/train/backend.py relies on it; update it (and this test) "
        "before widening the pin.",
        pytrace=False,
    )


def test_backend_lists_every_private_name_it_reaches():
    source = BACKEND.read_text(encoding="utf-8")
    reached = set(re.findall(r"\.(_\w+)", source))
    reached |= set(re.findall(r"def (_[a-z]\w*)\(self", source))  # a library's private method, overridden
    reached |= set(re.findall(r"(?:getattr|hasattr)\([^,()]+(?:\([^()]*\))?,\s*\"(\w+)\"", source))
    listed = set(FABRIC) | set(DEEPSPEED) | set(PARAMETER_ATTRIBUTES)
    assert reached - PUBLIC == listed, "name the new private reach in this test, with a check of its shape"


def test_no_other_package_module_reaches_them():
    fenced = [name for name in (*FABRIC, *DEEPSPEED)]
    pattern = re.compile(r"[.\"'](" + "|".join(map(re.escape, fenced)) + r")\b")
    outside = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "bumblecore").rglob("*.py"))
        if path != BACKEND
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not outside, "DeepSpeed/Fabric private names belong in train/backend.py:\n" + "\n".join(outside)


def test_the_fabric_strategy_steps_the_cpu_strategy_repeats():
    from lightning.fabric.strategies import DDPStrategy, DeepSpeedStrategy
    from lightning.fabric.wrappers import _FabricModule

    if DeepSpeedStrategy.__mro__[1] is not DDPStrategy:
        moved("Fabric", "DeepSpeedStrategy's parent", "setup_environment no longer skips to DDPStrategy's")
    steps = [
        "reset_seed()",
        "self._set_world_ranks()",
        "self._init_deepspeed_distributed()",
        "if not self._config_initialized:",
        "self._format_config()",
        "self._config_initialized = True",
    ]
    setup = inspect.getsource(DeepSpeedStrategy._setup_distributed)
    at = [setup.find(step) for step in steps]
    if -1 in at or at != sorted(at):
        moved("Fabric", "DeepSpeedStrategy._setup_distributed", f"its steps are no longer {steps}, in that order")
    initialize = DeepSpeedStrategy._initialize_engine
    if [p for p in inspect.signature(initialize).parameters if p != "self"] != ["model", "optimizer", "scheduler"]:
        moved("Fabric", "DeepSpeedStrategy._initialize_engine", "its parameters changed")
    if "deepspeed.initialize(" not in inspect.getsource(initialize) or "self._initialize_engine(" not in (
        inspect.getsource(DeepSpeedStrategy.setup_module_and_optimizers)
    ):
        moved("Fabric", "DeepSpeedStrategy._initialize_engine", "it no longer builds the engine for setup()")
    if "self._forward_module =" not in inspect.getsource(_FabricModule.__init__):
        moved("Fabric", "_FabricModule._forward_module", "a wrapped module no longer keeps it")


def test_the_shared_memory_kernel_is_switched_off_where_deepspeed_reads_it():
    import importlib

    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    comm = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` names torch itself
    if "deepspeed.ops.__compatible_ops__.get(builder.NAME" not in inspect.getsource(comm.build_shm_op):
        moved("DeepSpeed", "deepspeed.ops.__compatible_ops__", "build_shm_op no longer asks it")
    if ShareMemCommBuilder.NAME != "deepspeed_shm_comm":
        moved("DeepSpeed", "ShareMemCommBuilder.NAME", f"it is now {ShareMemCommBuilder.NAME!r}")


PROBE = """
import json, math, os, sys, torch
import deepspeed
from bumblecore.model.bumblebee import Bumblebee
from bumblecore.model.config import BumblebeeConfig
from bumblecore.train import backend
from bumblecore.train.runtime import build_fabric, fill_deepspeed_config

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
moved = []

def check(ok, name, what):
    if not ok:
        moved.append(f"{name}: {what}")

setups = [(1, "fp32", {}), (3, "fp32", {}), (1, "bf16", {"data_types": {"grad_accum_dtype": "fp32"}})]
for stage, precision, extra in setups:  # ZeRO-1/2's optimizer, ZeRO-3's, the bf16 optimizer (ZeRO-1, fp32 gradients)
    where = f"ZeRO-{stage} {precision}"
    config = fill_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, **extra},
        micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, precision=precision, max_grad_norm=1.0,
        hidden_size=64)
    config["bf16"] = {"enabled": precision == "bf16"}
    fabric = build_fabric(accelerator="cpu", devices=1, train_model_precision=precision, deepspeed_config=config)
    fabric.launch()
    torch.manual_seed(0)
    model = Bumblebee(BumblebeeConfig.from_preset("0.5B", num_hidden_layers=1, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256, torch_dtype="float32"))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    wrapped, _ = fabric.setup(model.to(torch.bfloat16 if precision == "bf16" else torch.float32),
        torch.optim.AdamW(model.parameters(), lr=1e-2))
    engine = backend.deepspeed_engine(wrapped)
    check(isinstance(engine, deepspeed.DeepSpeedEngine), "_FabricModule._forward_module", "not the DeepSpeed engine")
    optimizer = engine.optimizer
    if precision == "fp32":
        names = ("fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat") if stage == 3 else (
            "parallel_partitioned_bit16_groups", "real_dp_process_group", "single_partition_of_fp32_groups")
        for name in names:
            check(isinstance(getattr(optimizer, name, None), list), f"{type(optimizer).__name__}.{name}", "not a list")
        check(backend.share_fp32_master_weights(wrapped) > 0, "the fp32 master partitions", f"none shared ({where})")
    if stage == 3:
        for name, p in wrapped.module.named_parameters():
            check(hasattr(p, "ds_id") and tuple(getattr(p, "ds_shape", ())) == shapes[name],
                f"ZeRO-3 parameter {name}.ds_shape/ds_id", "missing or not its real shape")
        state = engine._zero3_consolidated_16bit_state_dict()
        check(set(state) >= set(shapes), "DeepSpeedEngine._zero3_consolidated_16bit_state_dict", "not the model")
    ids = torch.randint(0, 256, (1, 8))
    fabric.backward(wrapped(ids).float().logsumexp(-1).mean())
    if stage == 1 and precision == "fp32":
        grads = getattr(optimizer, "averaged_gradients", None)
        check(isinstance(grads, dict) and any(g is not None for group in grads.values() for g in (group or [])),
            "DeepSpeedZeroOptimizer.averaged_gradients", "no gradient partitions after the step's last backward")
    if precision == "bf16":
        check(type(optimizer).__name__ == "BF16_Optimizer", "the bf16 optimizer", type(optimizer).__name__)
        check(all(isinstance(getattr(p, "_hp_grad", None), torch.Tensor) for p in wrapped.module.parameters()),
            "BF16_Optimizer's parameter._hp_grad", "not a tensor after backward")
    check(backend.grads_finite(engine), "backend.grads_finite", f"finite gradients read as not finite ({where})")
    engine.step()
    norm = getattr(optimizer, "_global_grad_norm", None)
    check(norm is not None and math.isfinite(float(norm)) and float(norm) > 0,
        f"{type(optimizer).__name__}._global_grad_norm", f"{norm!r} after a step")
    fabric.backward(wrapped(ids).float().logsumexp(-1).mean() * float("inf"))
    check(not backend.grads_finite(engine), "backend.grads_finite", f"an infinite gradient went unseen ({where})")
print(json.dumps(moved))
"""


@pytest.mark.slow
def test_the_deepspeed_internals_on_real_engines():
    """ZeRO-1, ZeRO-3 and the bf16 optimizer built for real (one CPU process each, over gloo): every
    internal attribute backend.py reads is there, with the type it expects, at the moment it reads it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    done = subprocess.run([sys.executable, "-c", PROBE, port], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if found:
        import deepspeed

        moved(f"DeepSpeed {deepspeed.__version__}", "; ".join(found), "see above")
