"""Training units built from a token cache, and how a list of units becomes one batch of tensors.

- pretraining: every document (+ end-of-text) back to back, cut into `cutoff_len` blocks, so no text
  is thrown away; with packing, positions restart and attention stops at each document boundary.
- SFT with packing: samples placed greedily into rows of at most `cutoff_len` tokens; each sample keeps
  its own positions and attends only to itself, so a row computes what its samples would alone.
- SFT without packing: one sample per row, batches padded to their longest row (not to cutoff_len).
- preference pairs: one unit = (chosen, rejected); a batch holds all chosen rows then all rejected rows.
- KTO: one unit = (prompt + completion, KL row) and its desirable flag; rows as for pairs, with
  `desirable` (n,) bool in the batch; reward-model pairs add `margin` (n,) float32.

Batches: input_ids (B, T), labels (B, T) unshifted with -100 where not trained, position_ids (B, T),
segment_ids (B, T) when packed (padding is its own segment), num_tokens (non-padding tokens); a mixture
(data/mixture.py) adds source_ids (B, T) (-1 on padding), source_names and source_loss_weights (S,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from bumblecore.data.cache import TokenCache
from bumblecore.data.formats import StageReading

# The label of a position that is not trained (PyTorch's cross-entropy ignore_index default).
IGNORE_INDEX = -100


@dataclass
class Piece:
    """A slice [start, end) of the cache's token stream: one sample, or the part of a document inside a block."""

    start: int
    end: int


@dataclass
class UnitSources:
    """A mixture's sources (data/mixture.py): which source each cache sample comes from and, for the
    interleaving strategies, each unit's source and how many units an epoch draws from each."""

    names: tuple[str, ...]
    loss_weights: tuple[float, ...]
    of_sample: np.ndarray  # (cache samples,) source index
    of_unit: Optional[np.ndarray] = None  # (units,) source index; None for concat (a packed row may mix)
    draws: Optional[np.ndarray] = None  # (sources,) units per epoch; None: every unit once (concat)


class Units:
    """The dataset as indexable training units; `unit(i)` gives a list of pieces (one packed row)."""

    def __init__(
        self, cache: TokenCache, rows: list[list[Piece]], pairs: bool = False, desirable: Optional[np.ndarray] = None
    ):
        self.cache, self.rows, self.pairs, self.desirable = cache, rows, pairs, desirable
        self.margins: Optional[np.ndarray] = None  # reward-model pairs: each pair's margin
        self.sources: Optional[UnitSources] = None

    def __len__(self) -> int:
        return len(self.rows)

    def length(self, index: int) -> int:
        return sum(p.end - p.start for p in self.rows[index])


def sample_pieces(cache: TokenCache, index: int) -> Piece:
    return Piece(int(cache.offsets[index]), int(cache.offsets[index + 1]))


def pretraining_blocks(
    cache: TokenCache, cutoff_len: int, first_doc: int = 0, end_doc: Optional[int] = None
) -> list[list[Piece]]:
    """The document stream (documents first_doc .. end_doc - 1, default all) cut into blocks; each block
    lists its document pieces."""
    begin = int(cache.offsets[first_doc])
    total = int(cache.offsets[len(cache) if end_doc is None else end_doc])
    starts = cache.offsets[:-1]
    blocks = []
    for block_start in range(begin, total, cutoff_len):
        block_end = min(block_start + cutoff_len, total)
        first = int(np.searchsorted(starts, block_start, side="right")) - 1
        pieces, position = [], block_start
        doc = first
        while position < block_end:
            doc_end = int(cache.offsets[doc + 1])
            end = min(doc_end, block_end)
            pieces.append(Piece(position, end))
            position, doc = end, doc + 1
        blocks.append(pieces)
    return blocks


def packed_rows(lengths: np.ndarray, cutoff_len: int, seed: int) -> list[list[int]]:
    """Greedy packing in a seeded order: each sample goes to the first open row it fits in (a few
    rows kept open so small samples fill gaps); samples never split."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[int] = []  # indices into rows, newest last
    for index in order:
        n = int(lengths[index])
        for slot, row in enumerate(open_rows):
            if room[row] >= n:
                rows[row].append(int(index))
                room[row] -= n
                if room[row] == 0:
                    open_rows.pop(slot)
                break
        else:
            rows.append([int(index)])
            room.append(cutoff_len - n)
            open_rows.append(len(rows) - 1)
            if len(open_rows) > 8:
                open_rows.pop(0)
    return rows


def build_units(cache: TokenCache, reading: StageReading, cutoff_len: int, packing: bool, seed: int) -> Units:
    if reading.documents:
        return Units(cache, pretraining_blocks(cache, cutoff_len))
    if reading.pairs:
        units = Units(
            cache,
            [[sample_pieces(cache, 2 * i), sample_pieces(cache, 2 * i + 1)] for i in range(len(cache) // 2)],
            pairs=True,
            desirable=cache.desirable if reading.labelled else None,
        )
        units.margins = cache.margins if reading.margins else None
        return units
    if packing:
        return Units(
            cache, [[sample_pieces(cache, i) for i in row] for row in packed_rows(cache.lengths, cutoff_len, seed)]
        )
    return Units(cache, [[sample_pieces(cache, i)] for i in range(len(cache))])


def collate(units: Units, indices: list[int], pad_id: int, packing: bool) -> dict:
    """One batch of tensors for the given unit indices (see the module docstring)."""
    if units.pairs:
        rows = [[units.rows[i][0]] for i in indices] + [[units.rows[i][1]] for i in indices]
        batch = _collate_rows(units.cache, rows, pad_id, segments=False)
        batch["num_pairs"] = len(indices)
        batch["unit_indices"] = torch.tensor(indices, dtype=torch.long)  # finds the pairs' cached reference log-probs
        if units.desirable is not None:
            batch["desirable"] = torch.from_numpy(units.desirable[indices])
        if units.margins is not None:
            batch["margin"] = torch.from_numpy(units.margins[indices]).float()
        return batch
    batch = _collate_rows(units.cache, [units.rows[i] for i in indices], pad_id, segments=packing)
    if units.sources is not None:
        batch["source_ids"] = _source_ids(units, [units.rows[i] for i in indices], batch["input_ids"].shape)
        batch["source_names"] = units.sources.names
        batch["source_loss_weights"] = torch.tensor(units.sources.loss_weights, dtype=torch.float32)
    return batch


def _source_ids(units: Units, rows: list[list[Piece]], shape) -> torch.Tensor:
    """Each token's source (-1 on padding), laid out as _collate_rows lays out the pieces."""
    offsets, of_sample = units.cache.offsets, units.sources.of_sample
    source_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        column = 0
        for piece in row:
            sample = int(np.searchsorted(offsets, piece.start, side="right")) - 1
            source_ids[r, column : column + piece.end - piece.start] = int(of_sample[sample])
            column += piece.end - piece.start
    return source_ids


def _collate_rows(cache: TokenCache, rows: list[list[Piece]], pad_id: int, segments: bool) -> dict:
    width = max(sum(p.end - p.start for p in row) for row in rows)
    batch_size = len(rows)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch_size, width), dtype=torch.long)
    segment_ids = torch.full((batch_size, width), -1, dtype=torch.long)
    num_tokens = 0
    for r, row in enumerate(rows):
        column = 0
        for s, piece in enumerate(row):
            n = piece.end - piece.start
            ids = torch.from_numpy(cache.ids[piece.start : piece.end].astype(np.int64))
            mask = torch.from_numpy(cache.mask[piece.start : piece.end].astype(np.bool_))
            input_ids[r, column : column + n] = ids
            labels[r, column : column + n] = ids.masked_fill(~mask, IGNORE_INDEX)
            segment_ids[r, column : column + n] = s
            if segments:
                position_ids[r, column : column + n] = torch.arange(n)
            column += n
        if not segments:
            position_ids[r, :column] = torch.arange(column)
        if column < width:  # padding continues its own positions (unused, kept in range)
            position_ids[r, column:] = torch.arange(width - column)
        num_tokens += column
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": num_tokens}
    if segments:
        # Padding gets a segment of its own, so it never joins a real sample's attention block.
        batch["segment_ids"] = segment_ids.masked_fill(segment_ids < 0, 1 << 20)
    return batch


def unit_order(
    num_units: int, epoch: int, seed: int, lengths: Optional[np.ndarray] = None, group: int = 0
) -> np.ndarray:
    """The order of units in an epoch: a permutation seeded by seed + epoch; with `lengths`, units of
    similar length are brought together inside windows of `group` units (less padding)."""
    order = np.random.default_rng(seed + epoch).permutation(num_units)
    if lengths is None or group <= 1:
        return order
    windows = [order[i : i + group * 50] for i in range(0, num_units, group * 50)]
    grouped = np.concatenate([w[np.argsort(-lengths[w], kind="stable")] for w in windows])
    batches = [grouped[i : i + group] for i in range(0, num_units, group)]
    shuffle = np.random.default_rng(seed + epoch + 7919).permutation(len(batches))
    return np.concatenate([batches[i] for i in shuffle])
