"""What every recipe shares: the Recipe (a training stage's one module: what it reads, how its batches
are made, its Stage, its evaluation, its extra models' share of the memory plan, its banner lines) and
the token-cache data path the stages that train on token units walk.

A recipe is asked, in this order, by `bumblecore train` (train/run.py):
  check(run)                         refusals across config groups, before anything starts
  notes(run)                         keys accepted but changing nothing for this stage
  frozen_copy(run, total, trainable) parameters of its extra models (reference, reward) in memory
  data(fabric, run, tokenizer, pad_id) -> StageData    its units, loaders and banner lines
  stage(fabric, run, model, data, load_model, resuming) -> (Stage, loader, eval loader)
The Stage (train/engine.py) returns summed losses and counts: the engine divides by the step's global count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from bumblecore.data.dataset import dataset_units, run_sources
from bumblecore.data.formats import StageReading
from bumblecore.data.loader import BatchLoader, eval_batches
from bumblecore.data.mixture import source_records, source_report
from bumblecore.train.launch import build_once
from bumblecore.train.sequence_parallel import ShardedLoader, data_parallel, sharded_batches
from bumblecore.train.sft import LanguageModelingStage


@dataclass
class StageData:
    """A stage's training data as the run uses it."""

    units: object  # what one epoch walks: token units (data/packing.py) or GRPO's prompts
    loader: object  # this rank's micro-batches of each step
    eval_units: object = None
    eval_loader: object = None
    lines: list[str] = field(default_factory=list)  # the banner's lines about the data
    longest: Optional[int] = None  # padded rows: the data's longest row (the memory plan is held to it)
    beside: dict = field(default_factory=dict)  # a preference mixture's SFT sources: {name: (source, (cache, units))}
    stage: object = None  # a Stage built with its data (GRPO's rollouts make its batches)
    pad_id: int = 0


class Recipe:
    """A training stage. The defaults are a stage trained on the token cache's units with the language
    modelling loss (pretraining, SFT); a stage overrides what it does otherwise."""

    name: str = ""
    reading: Optional[StageReading] = None  # None: the stage reads prompts, no token cache (GRPO)
    chat = True  # trains conversations through the chat template (the tokenizer is checked for it)
    from_scratch = False  # starts from a random init, not the model's weights
    rows_per_unit = 1  # rows one unit puts in a micro-batch (the memory plan's batch)
    plans_padded_rows = False  # unpacked rows: plan memory again at the data's longest row
    scalar_head = False  # the model is a reward model: the body with a score head (model/reward.py)
    # trains with sequence_parallel_size > 1 (train/sequence_parallel.py): checked equal to one process
    sequence_parallel = False
    compiles = False  # compile: true is checked equal to eager for this stage (model/regional_compile.py)

    @property
    def smooth_curves(self) -> bool:
        """The loss plots are smoothed (pretraining's curve from scratch is shown raw)."""
        return not self.from_scratch

    def check(self, run) -> None:
        """Refusals of this stage that one config group alone cannot tell."""

    def adapter_off_reference(self, run) -> bool:
        """Under LoRA, the stage's reference is the policy with its adapter switched off."""
        return False

    def notes(self, run) -> list[str]:
        """Keys that are accepted but change nothing for this stage, said once at start."""
        return []

    def frozen_copy(self, run, total: int, trainable: int) -> int:
        """Parameters of the extra models this stage holds beside the policy (a reference, a reward model)."""
        return 0

    def data(self, fabric, run, tokenizer, pad_id: int) -> StageData:
        """Its units, loaders and banner lines (before the model is set up)."""
        return token_data(fabric, run, tokenizer, pad_id, self.reading, self.plans_padded_rows)

    def stage(self, fabric, run, model, data: StageData, load_model, resuming: bool):
        """The Stage, the training loader and the eval loader (the model is set up by now)."""
        return LanguageModelingStage(), data.loader, data.eval_loader


def step_loader(fabric, run, units, pad_id: int, packing: bool, group_by_length: bool = False) -> BatchLoader:
    """This rank's share of each step: its data-parallel rank's, sliced when the sequence is split over ranks."""
    optimization = run.optimization
    micro, accumulation = optimization.train_micro_batch_size_per_gpu, optimization.gradient_accumulation_steps
    sp = run.runtime.sequence_parallel_size
    size, rank = data_parallel(fabric.world_size, fabric.global_rank, sp)
    loader = BatchLoader(
        units, micro, accumulation, size, rank, optimization.seed, pad_id, packing, group_by_length,
    )  # fmt: skip
    return loader if sp == 1 else ShardedLoader(loader, sp, fabric.global_rank % sp, pad_id, run.data.cutoff_len)


def token_data(
    fabric,
    run,
    tokenizer,
    pad_id: int,
    reading: StageReading,
    plan_padded_rows: bool = False,
    pairs: Optional[tuple] = None,
    beside: tuple = (),
    beside_reading: Optional[StageReading] = None,
) -> StageData:
    """The token cache's units (built once, see build_once), loaders and banner lines. A preference
    mixture (recipes/preference.py) gives its `pairs` as (paths, label) and the SFT sources `beside`
    them, read with `beside_reading`."""
    optimization = run.optimization
    train_paths, label = pairs or (run.data.dataset_path, "dataset_path")

    def units_of(paths, progress, label, reading=reading, data=run.data):
        return dataset_units(data, reading, optimization.seed, tokenizer, paths, progress, label)

    def tokenized():  # the token cache, built once and memory-mapped by every rank
        progress = fabric.is_global_zero
        packed = dataclasses.replace(run.data, packing=True)  # {name: (source, (cache, units))}, packed as for sft
        sft = {
            s.name: (s, units_of(list(s.paths), progress, f"dataset_path {s.name}", beside_reading, packed))
            for s in beside
        }
        train_data = units_of(train_paths, progress, label)
        held_out = (
            units_of(run.data.eval_dataset_path, False, "eval_dataset_path")
            if run.data.eval_dataset_path
            else (None, None)
        )
        return train_data, held_out, sft

    (train_cache, units), (eval_cache, eval_units), beside = build_once(fabric, tokenized)
    sp = run.runtime.sequence_parallel_size
    readers, reader = data_parallel(fabric.world_size, fabric.global_rank, sp)  # an SP group reads as one
    if eval_units is not None and len(eval_units) < readers:  # every rank evaluates a share
        raise ValueError(
            f"eval_dataset_path: {len(eval_units)} eval units for {readers} data-parallel processes; "
            "give at least one per process"
        )
    lengths = getattr(train_cache, "lengths", None)
    longest = None
    if plan_padded_rows and not run.data.packing and not beside and lengths is not None:
        # Padded rows are as long as their batch's longest sample, not cutoff_len: the plan checked first is
        # the bound made before the data was read; this one, from the data, is what the run's peak is held to.
        longest = min(int(lengths.max(initial=1)), run.data.cutoff_len)
    loader = step_loader(fabric, run, units, pad_id, bool(run.data.packing), run.data.group_by_length)
    eval_loader = (
        eval_batches(
            eval_units,
            optimization.train_micro_batch_size_per_gpu,
            pad_id,
            bool(run.data.packing),
            readers,
            reader,
        )
        if eval_units is not None
        else None
    )
    if eval_loader is not None and sp > 1:
        eval_loader = sharded_batches(eval_loader, sp, fabric.global_rank % sp, pad_id, run.data.cutoff_len)
    lines = [
        f"  data: {len(units)} training units ({'packed' if run.data.packing else 'padded'} rows of <= {run.data.cutoff_len} tokens)"
        + (f", {len(eval_units)} eval units" if eval_units is not None else ""),
        f"  dataset: {train_cache.summary.counts()}",
        *source_lines(run, train_cache, units),
        *([f"  eval dataset: {eval_cache.summary.counts()}"] if eval_cache is not None else []),
        *[f"    {example}" for example in train_cache.summary.examples()],
        *[
            f"  beside the pairs: SFT source {name}, {len(u)} units (packed rows of <= {run.data.cutoff_len} "
            f"tokens; {cache.summary.counts()}), loss weight {source.loss_weight}: a term of its own, its mean "
            "over its target tokens of the step"
            for name, (source, (cache, u)) in beside.items()
        ],
    ]
    return StageData(units, loader, eval_units, eval_loader, lines, longest, beside, pad_id=pad_id)


def source_lines(run, cache, units) -> list[str]:
    """A mixture's sources in the banner: records, share of the trained tokens, weights."""
    sources = run_sources(run.data, run.data.dataset_path)
    return source_report(units, sources, source_records(cache, sources))
