"""Dataset mixtures: several named sources in one run (docs/DATA_FORMAT.md, "Mixtures").

The sources' files are tokenized into one cache entry, source after source, and the cache records each
sample's file, so every sample (and after packing every token) knows its source: `collate` writes
`source_ids` (B, T) into the batch, which the stage turns into per-source losses and loss weights.

- concat: the units are exactly those of the sources' files given as one list (packed rows may hold
  samples of several sources); every unit once per epoch, as without a mixture.
- interleave_under / interleave_over: each source is packed on its own, and an epoch draws a fixed
  number of units from each, in proportion to its weight: as many as the first source to run out allows
  (under), or enough that the last one is used up once (over; the others repeat, reshuffled each pass).
  The epoch's order is a pure function of (seed, epoch), so step s always gets the same batch and a
  resumed run asks for it directly.
"""

from __future__ import annotations

import math

import numpy as np

from bumblecore.data.cache import TokenCache
from bumblecore.data.formats import StageReading
from bumblecore.data.packing import Units, UnitSources, build_units, packed_rows, pretraining_blocks, sample_pieces
from bumblecore.data.sources import data_files


def all_paths(sources) -> list[str]:
    """Every source's paths in source order: the cache is built over them as one list."""
    return [path for source in sources for path in source.paths]


def sample_sources(cache: TokenCache, sources) -> np.ndarray:
    """The source index of every cache sample (from the file it came from)."""
    file_source = np.concatenate(
        [np.full(len(data_files(list(source.paths))), index, np.int64) for index, source in enumerate(sources)]
    )
    return file_source[cache.file_of_sample]


def draws_per_epoch(sizes, weights, strategy: str) -> np.ndarray:
    """Units drawn from each source per epoch: shares of the epoch equal to the weights (largest
    remainder rounding), the epoch as long as the first (under) or last (over) source to run out allows."""
    sizes, weights = np.asarray(sizes, np.int64), np.asarray(weights, np.float64)
    shares = weights / weights.sum()
    used = shares > 0
    runs_out = sizes[used] / shares[used]  # epoch length at which each source is used up exactly once
    length = int(math.floor(runs_out.min())) if strategy == "interleave_under" else int(math.ceil(runs_out.max()))
    exact = shares * length
    draws = np.floor(exact).astype(np.int64)
    left = length - int(draws.sum())
    if left > 0:
        draws[np.argsort(-(exact - draws), kind="stable")[:left]] += 1
    return draws


def interleaved_order(unit_source: np.ndarray, draws: np.ndarray, epoch: int, seed: int) -> np.ndarray:
    """The epoch's unit indices: `draws[s]` units of each source s (its units in a fresh seeded
    permutation per pass), placed in a seeded random order of the sources' slots."""
    picks = []
    for source, wanted in enumerate(draws):
        units = np.flatnonzero(unit_source == source)
        passes = [
            np.random.default_rng([seed, epoch, source, k]).permutation(units)
            for k in range(-(-int(wanted) // max(1, len(units))))
        ]
        picks.append(np.concatenate(passes)[:wanted] if passes else np.zeros(0, np.int64))
    slots = np.random.default_rng([seed, epoch]).permutation(np.repeat(np.arange(len(draws)), draws))
    order = np.empty(len(slots), np.int64)
    for source, chosen in enumerate(picks):
        order[slots == source] = chosen  # the source's picks in the order its slots appear
    return order


def mixture_units(
    cache: TokenCache, sources, reading: StageReading, cutoff_len: int, packing: bool, seed: int, strategy: str
):
    """The units of a mixture, with their sources. One source of weight and loss weight 1 is a plain
    dataset (no source ids at all: the run is today's, bit for bit)."""
    plain = all(s.loss_weight == 1.0 for s in sources) and (strategy == "concat" or len(sources) == 1)
    if len(sources) == 1 and plain:
        return build_units(cache, reading, cutoff_len, packing, seed)
    if reading.pairs:  # pairs: one dataset, as before mixtures
        if plain:
            return build_units(cache, reading, cutoff_len, packing, seed)
        raise ValueError(
            f"dataset_path: interleaving and loss weights are for pretrain and sft runs; training_stage {reading.stage} "
            "takes its files as one dataset (mix_strategy concat, no loss weights)"
        )
    of_sample = sample_sources(cache, sources)
    names = tuple(s.name for s in sources)
    loss_weights = tuple(s.loss_weight for s in sources)
    if strategy == "concat" or len(sources) == 1:
        units = build_units(cache, reading, cutoff_len, packing, seed)
        units.sources = UnitSources(names, loss_weights, of_sample)
        return units
    rows, unit_source = [], []
    for index in range(len(sources)):
        members = np.flatnonzero(of_sample == index)
        if len(members) == 0:
            own = []
        elif reading.documents:  # a source's documents are contiguous in the cache
            own = pretraining_blocks(cache, cutoff_len, int(members[0]), int(members[-1]) + 1)
        elif packing:
            own = [
                [sample_pieces(cache, int(members[i])) for i in row]
                for row in packed_rows(cache.lengths[members], cutoff_len, seed)
            ]
        else:
            own = [[sample_pieces(cache, int(i))] for i in members]
        rows += own
        unit_source += [index] * len(own)
    unit_source = np.asarray(unit_source, np.int64)
    sizes = np.bincount(unit_source, minlength=len(sources))
    empty = [s.name for s, n in zip(sources, sizes) if n == 0 and s.weight > 0]
    if empty:
        raise ValueError(f"dataset_path: source {empty[0]!r} has no usable samples")
    units = Units(cache, rows)
    units.sources = UnitSources(
        names, loss_weights, of_sample, unit_source, draws_per_epoch(sizes, [s.weight for s in sources], strategy)
    )
    return units


def source_report(units: Units, sources, records: list[int]) -> list[str]:
    """The banner's lines: each source's records, units per epoch, share of an epoch's trained tokens, weights."""
    cache, info = units.cache, units.sources
    if info is None:
        return []
    count = len(sources)
    targets = np.add.reduceat(cache.mask, cache.offsets[:-1], dtype=np.int64) if len(cache) else np.zeros(0)
    source_targets = np.bincount(info.of_sample, weights=targets, minlength=count)
    if info.draws is None:  # concat: every sample once per epoch
        trained, per_epoch = source_targets, np.bincount(info.of_sample, minlength=count)
    else:  # interleave: the draws, each at its source's mean trained tokens per unit
        sizes = np.bincount(info.of_unit, minlength=count)
        trained, per_epoch = info.draws * source_targets / np.maximum(1, sizes), info.draws
    total = max(1.0, float(np.sum(trained)))
    return [
        f"  source {s.name}: {records[i]} records, {int(per_epoch[i])} {'samples' if info.draws is None else 'units'}"
        f" per epoch, "
        f"{float(trained[i]) / total:.1%} of the trained tokens, weight {s.weight:g}, loss weight {s.loss_weight:g}"
        for i, s in enumerate(sources)
    ]


def source_records(cache: TokenCache, sources) -> list[int]:
    """Records read from each source's files (the cache's meta counts them per file)."""
    per_file = cache.meta.get("file_records", [])
    counts, start = [], 0
    for source in sources:
        n = len(data_files(list(source.paths)))
        counts.append(int(sum(per_file[start : start + n])))
        start += n
    return counts
