"""What a data key names: `dataset_path` (or `eval_dataset_path`) and its weights as named sources.

A value is one path, a list of paths / globs / directories (one source each, named by its file stem),
or a mapping {name: {path, weight, loss_weight}}. DataArgs checks it when a run's settings are parsed,
so a bad mixture is an error naming the key before anything is read; data/mixture.py draws from the
sources. Nothing here opens a file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")


@dataclass(frozen=True)
class DataSource:
    """One source of a mixture: its name (loss/<name> in the metrics), its files and its weights."""

    name: str
    paths: tuple[str, ...]
    weight: float = 1.0
    loss_weight: float = 1.0


def _source_name(entry: str) -> str:
    path = Path(str(entry).rstrip("/\\"))
    if re.search(r"[*?\[]", path.name):  # a glob: named by its folder (data/math/*.jsonl -> math)
        path = path.parent
    return path.stem if path.suffix in (".json", ".jsonl") else path.name or "data"


def _weights(key: str, values, count: int, allow_zero: bool) -> list[float]:
    if values is None:
        return [1.0] * count
    if len(values) != count:
        raise ValueError(f"{key} has {len(values)} weights for {count} dataset_path entries; give one per entry")
    for value in values:
        if not (math.isfinite(value) and value >= 0) or (value == 0 and not allow_zero):
            raise ValueError(f"{key}: each weight must be a finite number >= 0, got {value}")
    if not any(values):
        raise ValueError(f"{key}: the weights are all zero")
    return [float(v) for v in values]


def data_sources(
    value, weights=None, loss_weights=None, mix_strategy: str = "concat", key: str = "dataset_path"
) -> list[DataSource]:
    """A data key's value (a path, a list of paths/globs, or {name: {path, weight, loss_weight}}) as
    named sources. Errors name the key and the entry."""
    if isinstance(value, dict):
        if weights is not None or loss_weights is not None:
            raise ValueError(f"{key} is a mapping: give weight / loss_weight inside it, not dataset_weights")
        entries = []
        # In name order: YAML round trips (jsonargparse, training_args.yaml) may reorder a mapping's keys.
        for name, spec in sorted(value.items()):
            spec = spec if isinstance(spec, dict) else {"path": spec}
            unknown = set(spec) - {"path", "weight", "loss_weight"}
            if unknown or "path" not in spec:
                raise ValueError(f"{key}.{name}: expected {{path, weight, loss_weight}}, got {sorted(spec)}")
            if key != "dataset_path" and "weight" in spec:
                raise ValueError(f"{key}.{name}: eval sources are evaluated whole; weight is for dataset_path")
            paths = spec["path"] if isinstance(spec["path"], list) else [spec["path"]]
            entries.append((str(name), paths, spec.get("weight", 1.0), spec.get("loss_weight", 1.0)))
        names = [e[0] for e in entries]
        sampling = _weights(f"{key} weight", [e[2] for e in entries], len(entries), allow_zero=True)
        loss = _weights(f"{key} loss_weight", [e[3] for e in entries], len(entries), allow_zero=True)
    else:
        paths = value if isinstance(value, list) else [value]
        names = [_source_name(p) for p in paths]
        # Files of one stem in different folders (en/train.jsonl, zh/train.jsonl) are named folder/stem.
        names = [f"{_source_name(Path(p).parent)}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
        entries = [(n, [p]) for n, p in zip(names, paths)]
        sampling = _weights("dataset_weights", weights, len(entries), allow_zero=True)
        loss = _weights("dataset_loss_weights", loss_weights, len(entries), allow_zero=True)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"{key}: two sources are named {duplicates[0]!r}; name them with the mapping form {{name: {{path: ...}}}}"
        )
    if mix_strategy == "concat" and (weights is not None or any(w != 1.0 for w in sampling)):
        raise ValueError(
            "dataset_weights need mix_strategy interleave_under or interleave_over (concat takes every record once)"
        )
    return [
        DataSource(name, tuple(str(p) for p in paths), w, lw)
        for (name, paths, *_), w, lw in zip(entries, sampling, loss)
    ]


def run_sources(data, paths, key: str = "dataset_path") -> list[DataSource]:
    """`paths` (the value of a run's data key, or part of it) as named sources: dataset_path's with the
    weights and mix_strategy of `data` (the run's DataArgs), another key's (eval_dataset_path) unweighted."""
    if key == "dataset_path":
        return data_sources(paths, data.dataset_weights, data.dataset_loss_weights, data.mix_strategy)
    return data_sources(paths, key=key)
