"""Run by tests/train/test_sequence_parallel.py under torchrun, 2 CPU ranks over gloo: for each case,
one optimiser step of the engine (train/engine.py) with sequence_parallel_size 2 on DeepSpeed's real
engine, through our CPU DeepSpeed strategy, against the same model in one plain process (the oracle,
computed on each rank): the step's loss and every trainable parameter's full gradient (read with
DeepSpeed's safe_get_full_grad before the update). Prints one JSON line per case on rank 0.

Cases: ZeRO-2 and ZeRO-3 x full and LoRA x pretraining (every token a target) and SFT (a prompt
prefix not trained) x packed rows (documents crossing the split) and padded rows (odd lengths, so the
rows are padded to a multiple of 2); 2 micro-batches of accumulation, ~2,000 tokens per row.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny.py

from tiny import make_tiny_model, saved_tensor_bytes  # noqa: E402

from bumblecore.model.lora import apply_lora  # noqa: E402
from bumblecore.model.sequence_parallel import use_sequence_parallel  # noqa: E402
from bumblecore.train.backend import sequence_parallel_group  # noqa: E402
from bumblecore.train.engine import Engine, LoopSettings  # noqa: E402
from bumblecore.train.runtime import build_fabric, detect_launch, fill_deepspeed_config, launch_processes  # noqa: E402
from bumblecore.train.sequence_parallel import shard  # noqa: E402
from bumblecore.train.sft import LanguageModelingStage  # noqa: E402

SP, VOCAB, ACCUMULATION = 2, 768, 2
ZERO = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def packed_row(lengths: list[int], generator) -> dict:
    """One packed row of documents back to back (position ids restart per document)."""
    width = sum(lengths)
    ids = torch.randint(1, VOCAB, (1, width), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions, "segment_ids": segments}


def padded_rows(lengths: list[int], generator) -> dict:
    """Rows of these lengths, right-padded to the longest (pad id 0, labels -100)."""
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=generator)
        labels[r, :n] = ids[r, :n]
    positions = torch.arange(width)[None].expand(len(lengths), width).clone()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def micro_batches(packed: bool, sft: bool, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    if packed:
        batches = [packed_row([700, 1101, 248], generator), packed_row([1500, 501], generator)]
    else:
        batches = [padded_rows([2047, 1400], generator), padded_rows([1999], generator)]
    for batch in batches:
        if sft:  # a prompt of 300 tokens at each row's (or document's) start is not trained
            starts = [0] if "segment_ids" not in batch else torch.nonzero(batch["position_ids"][0] == 0).flatten()
            for start in starts:
                batch["labels"][:, int(start) : int(start) + 300] = -100
        batch["num_tokens"] = int((batch["input_ids"] != 0).sum())
    return batches


class OneStep:
    steps_per_epoch = 1

    def __init__(self, batches):
        self.batches = batches

    def micro_batches(self, step):
        return self.batches


def make_model(lora: bool, zero3: bool):
    model = make_tiny_model(VOCAB, seed=0).train()
    if lora:
        model = apply_lora(model, 4, 8, 0.0, zero3=zero3)
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_" in name:  # B starts at zero: both adapter matrices random, so every gradient is nonzero
                p.data.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def one_process(model, batches) -> tuple[float, dict]:
    """The oracle: the step's summed loss over its summed target count, in one plain process."""
    stage = LanguageModelingStage()
    total = sum(stage.count(b) for b in batches)
    loss = sum(stage.loss(model, b)[0] for b in batches) / total
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def sequence_parallel(fabric, model, batches, stage: int, rank: int) -> tuple[float, dict]:
    from deepspeed.utils import safe_get_full_grad

    fabric.strategy.config["zero_optimization"]["stage"] = stage
    fabric.strategy.config["zero_optimization"]["reduce_scatter"] = True  # as train/launch.py sets it under SP
    use_sequence_parallel(model, sequence_parallel_group(SP), SP)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    fabric._models_setup = 0  # one model per case: Fabric would ask which of them each backward is for
    wrapped, optimizer = fabric.setup(model, optimizer)
    loader = OneStep([shard(b, SP, rank, longest_row=2048) for b in batches])
    engine = Engine(fabric, wrapped, optimizer, scheduler, LanguageModelingStage(), loader, LoopSettings(1, None), None)
    grads = {}
    step = engine.stepper.step

    def capture_then_step():  # the step's complete gradients, read before the update
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads[name] = safe_get_full_grad(p).detach().clone().float()
        return step()

    engine.stepper.step = capture_then_step
    record = engine.train_step()
    return record["loss"], grads


def saved_bytes(model, batch: dict) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward, weights excluded, each storage once."""
    return saved_tensor_bytes(
        model,
        lambda: model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]),
    )


def activations(rank: int) -> dict:
    """What one process and one SP rank keep for backward on a packed row of 4,096 tokens, beside the
    plan's closed form for each (train/memory.py)."""
    from bumblecore.train.memory import Workload, sequence_parallel_share

    batch = packed_row([1500, 2596], torch.Generator().manual_seed(2))
    model = make_tiny_model(VOCAB, seed=0).train()
    one = saved_bytes(model, batch)
    use_sequence_parallel(model, sequence_parallel_group(SP), SP)
    per_rank = saved_bytes(model, shard(batch, SP, rank))
    work = Workload.from_config(json.loads(json.dumps(vars(model.config), default=str)), 1, 4096)
    planned = {
        "planned_one": work.activations("fp32"),
        "planned_rank": sequence_parallel_share(work, SP).activations("fp32"),
    }
    return {"one": one, "rank": per_rank, **planned}


def main() -> None:
    launch = detect_launch(2, 1, "cpu")
    raw = json.loads((ZERO / "ds_z2_config.json").read_text())
    config = fill_deepspeed_config(
        raw, micro_batch_size=2, gradient_accumulation_steps=ACCUMULATION, world_size=1, precision="fp32",
        max_grad_norm=None, hidden_size=64,
    )  # fmt: skip
    config["sequence_parallel_size"] = SP
    # DeepSpeed's safe_get_full_grad misreads ZeRO-2 partitions reordered round robin (a test-side read only).
    config["zero_optimization"]["round_robin_gradients"] = False
    fabric = build_fabric("cpu", 2, 1, "fp32", config, launch=launch)
    launch_processes(fabric, launch)
    rank = fabric.global_rank % SP
    # Half of the 2^4 combinations, every pair of factors in all four of its combinations (sft is the
    # parity of the other three): 8 engines instead of 16, and each factor still meets each other's levels.
    cases = [
        (zero, lora, packed, (zero == 3) ^ lora ^ packed)
        for zero in (2, 3)
        for lora in (False, True)
        for packed in (True, False)
    ]
    for zero, lora, packed, sft in cases:
        batches = micro_batches(packed, sft, seed=0)
        model = make_model(lora, zero == 3)
        expected_loss, expected = one_process(copy.deepcopy(model), batches)
        loss, got = sequence_parallel(fabric, model, batches, zero, rank)
        worst = max(float((got[n] - g).norm() / g.norm()) for n, g in expected.items())
        smallest = min(float(g.norm()) for g in expected.values())
        case = {"zero": zero, "lora": lora, "packed": packed, "sft": sft}
        result = {**case, "loss": loss, "expected_loss": expected_loss, "worst_grad": worst, "smallest": smallest}
        result["params"] = len(expected)
        if fabric.is_global_zero:
            print("RESULT " + json.dumps(result), flush=True)
    measured = activations(rank)
    if fabric.is_global_zero:
        print("ACTIVATIONS " + json.dumps(measured), flush=True)
    # Then `bumblecore train` itself in these processes: a run, and one resumed from its checkpoint.
    if len(sys.argv) > 1:
        from bumblecore.cli import main as cli

        config, root = sys.argv[1], Path(sys.argv[2])
        cli(["train", "--config", config, "--output_dir", str(root / "sp")])
        resumed = ["--output_dir", str(root / "resumed"), "--resume_from_checkpoint", str(root / "sp" / "checkpoint-2")]
        cli(["train", "--config", config, *resumed])


if __name__ == "__main__":
    main()
