"""`sequence_parallel_size: N`: each sample's sequence split over N ranks (DeepSpeed's Ulysses, ALST).

The world is cut into groups of N consecutive ranks (DeepSpeed's own SP groups, train/backend.py); the
data-parallel size is world / N. Every rank of a group reads the same samples (the loaders are built
for the data-parallel size and rank) and keeps its contiguous 1/N of each row (`shard`):

- rows are padded to a multiple of N (padding is never a target, and causal attention keeps it out of
  every real token's view);
- targets are shifted on the full row, before the split, so the token after each slice boundary is
  still predicted, and a packed document's first token is still not;
- position ids are the full row's, sliced (RoPE per document continues across the split);
- the full row's segment ids go with every slice: attention sees the whole sequence for its share of
  the heads (model/sequence_parallel.py), so its per-document mask is the full row's.

Each rank's loss is the sum over its slice's targets and its count their number; the engine sums both
over every rank (a superset of the group), so the loss is the token mean one process computes. DeepSpeed
sums the gradients over the SP and DP ranks and divides by the DP size only; the engine's scale uses
that size (`gradient_averaging_size`).
"""

from __future__ import annotations

import torch

from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.train.losses import shift_targets

PAD_SEGMENT = 1 << 20  # data/packing.py's segment of padding in packed rows


def check_sequence_parallel(run, recipe) -> None:
    """Refusals before anything starts: what SP needs from the run, the stage and the model."""
    size = run.runtime.sequence_parallel_size
    if size < 1:
        raise ValueError(f"sequence_parallel_size {size}: must be 1 (off) or more")
    if size == 1:
        return
    if not recipe.sequence_parallel:
        raise ValueError(
            f"sequence_parallel_size {size}: training_stage {run.model.training_stage} does not support sequence "
            "parallelism yet (supported: pretrain, continue_pretrain, sft); set sequence_parallel_size 1"
        )
    if not run.runtime.deepspeed_config_path:
        raise ValueError(
            f"sequence_parallel_size {size} runs on DeepSpeed's Ulysses sequence parallelism: give "
            "deepspeed_config_path (e.g. configs/deepspeed/zero2.json); DDP does not split sequences"
        )
    if not run.optimization.average_tokens_across_devices:
        raise ValueError(
            f"sequence_parallel_size {size} needs average_tokens_across_devices true: a sample's tokens are "
            "split over ranks, so only the step's global token mean is the one-process loss"
        )
    check_model(run.model.model_name_or_path, size)


def check_model(model_dir, size: int) -> None:
    """Bumblebee's own families only (the transformers path is refused), with heads divisible by `size`."""
    import json
    from pathlib import Path

    from bumblecore.model.hf_config import bumblebee_expresses
    from bumblecore.model.sequence_parallel import check_heads_divide

    config = Path(model_dir) / "config.json"
    if not bumblebee_expresses(model_dir):
        raise ValueError(
            f"sequence_parallel_size {size}: {config} is a model trained through transformers "
            "(model/transformers_family.py); sequence parallelism is built for Bumblebee's families "
            "(qwen2, llama, qwen3, mistral layouts); set sequence_parallel_size 1"
        )
    raw = json.loads(config.read_text(encoding="utf-8"))
    heads = int(raw.get("num_attention_heads", 1))
    check_heads_divide(heads, int(raw.get("num_key_value_heads") or heads), size, str(config))


def check_world(world_size: int, size: int) -> None:
    if world_size % size:
        raise ValueError(
            f"sequence_parallel_size {size}: the run has {world_size} processes, not a multiple of {size} "
            "(each sample's sequence is split over a group of that many ranks)"
        )


def data_parallel(world_size: int, global_rank: int, size: int) -> tuple[int, int]:
    """(data-parallel size, this rank's data-parallel rank): groups are `size` consecutive ranks."""
    return world_size // size, global_rank // size


def data_parallel_line(world_size: int, size: int) -> str:
    """The banner's batch factor: devices, or data-parallel groups of `size` ranks sharing each sample."""
    if size == 1:
        return f"{world_size} device(s)"
    return f"{world_size // size} data-parallel group(s) of {size} sequence-parallel ranks"


def padded_length(length: int, size: int) -> int:
    return -(-length // size) * size


def shard(batch: dict, size: int, rank: int, pad_id: int = 0, longest_row: int = 0) -> dict:
    """This rank's slice of an LM batch (see the module docstring): input_ids, position_ids and
    `shift_labels` (targets, already shifted) sliced; segment_ids whole; num_tokens on the group's first
    rank; `slice_positions`: the most positions any rank's slice of the run holds (rows of at most
    `longest_row` tokens), so every rank calls the LM head equally often (train/sft.py)."""
    length = batch["input_ids"].shape[1]
    width = padded_length(length, size)
    extra = width - length
    segments = batch.get("segment_ids")
    targets = shift_targets(batch["labels"], segments)

    def pad(tensor, value):
        return torch.nn.functional.pad(tensor, (0, extra), value=value) if extra else tensor

    positions = batch["position_ids"]
    if extra:  # padding continues each row's last position (its values are never read by a real token)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, extra + 1)], dim=1)
    part = slice(rank * (width // size), (rank + 1) * (width // size))
    out = {
        "input_ids": pad(batch["input_ids"], pad_id)[:, part],
        "labels": pad(batch["labels"], IGNORE_INDEX)[:, part],  # unshifted, for the record; the loss reads shift_labels
        "shift_labels": pad(targets, IGNORE_INDEX)[:, part],
        "position_ids": positions[:, part],
        "num_tokens": batch.get("num_tokens", batch["input_ids"].numel()) if rank == 0 else 0,
        "slice_positions": batch["input_ids"].shape[0] * padded_length(max(longest_row, length), size) // size,
    }
    if segments is not None:
        out["segment_ids"] = pad(segments, PAD_SEGMENT)
    if "source_ids" in batch:  # each target's source: that of the token it predicts, shifted like the targets
        sources = torch.full_like(batch["source_ids"], -1)
        sources[:, :-1] = batch["source_ids"][:, 1:]
        out["shift_source_ids"] = pad(sources, -1)[:, part]
        out["source_names"], out["source_loss_weights"] = batch["source_names"], batch["source_loss_weights"]
    return out


class ShardedLoader:
    """A step loader whose micro-batches are this rank's slices of its SP group's micro-batches."""

    def __init__(self, loader, size: int, rank: int, pad_id: int, longest_row: int):
        self.loader, self.size, self.rank, self.pad_id, self.longest_row = loader, size, rank, pad_id, longest_row

    def __getattr__(self, name):  # steps_per_epoch, global_size, total_steps: the group's loader's
        return getattr(self.loader, name)

    def micro_batches(self, step: int) -> list[dict]:
        return [shard(b, self.size, self.rank, self.pad_id, self.longest_row) for b in self.loader.micro_batches(step)]


def sharded_batches(batches: list[dict], size: int, rank: int, pad_id: int, longest_row: int) -> list[dict]:
    """Eval batches: this rank's slice of each."""
    return [shard(b, size, rank, pad_id, longest_row) for b in batches]
