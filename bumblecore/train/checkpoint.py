"""Checkpoint directories: written under a temporary name and renamed when complete, rotated,
found again for `resume_from_checkpoint: latest`.

A checkpoint holds two things: at its root the model in Hugging Face format (or the peft adapter),
so other tools load it as is; and `training_state/`, everything needed to continue exactly
(optimiser, scheduler, data position, RNG states, step). `trainer_state.json` is written last and
marks the directory complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

PREFIX = "checkpoint-"
COMPLETE_MARKER = "trainer_state.json"
STATE_DIR = "training_state"


def complete_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint-<step> under output_dir, oldest first."""
    found = []
    root = Path(output_dir)
    if not root.is_dir():
        return found
    for path in root.iterdir():
        match = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
        if match and path.is_dir() and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_dir(output_dir, resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """`latest` -> the newest complete checkpoint of output_dir (None if there is none yet); a path -> itself, checked."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).is_file() or not (path / STATE_DIR).exists():
        raise ValueError(f"resume_from_checkpoint {path} is not a complete checkpoint (no {COMPLETE_MARKER} / {STATE_DIR})")
    return path


def read_trainer_state(checkpoint_dir) -> dict:
    return json.loads((Path(checkpoint_dir) / COMPLETE_MARKER).read_text(encoding="utf-8"))


def save_checkpoint(
    output_dir,
    name: str,
    write_contents: Callable[[Path], None],
    trainer_state: dict,
    is_rank_zero: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write `output_dir/name` atomically. Every rank calls this (sharded states are written by all);
    `write_contents(tmp_dir)` fills the directory, then rank 0 marks it complete and renames it."""
    root = Path(output_dir)
    final, tmp = root / name, root / f".{name}.tmp"
    if is_rank_zero:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash: never trusted
        tmp.mkdir()
    barrier()
    write_contents(tmp)
    barrier()
    if is_rank_zero:
        (tmp / COMPLETE_MARKER).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            old = root / f".{name}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    barrier()
    return final


def rotate_checkpoints(output_dir, save_total_limit: Optional[int], keep: tuple[Path, ...] = ()) -> list[Path]:
    """Delete the oldest checkpoint-<step> dirs beyond save_total_limit (None or <= 0 keeps all)."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    candidates = [path for _, path in complete_checkpoints(output_dir) if path not in keep]
    doomed = candidates[: max(0, len(candidates) - save_total_limit)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def rng_state() -> dict:
    # numpy's state as plain values and a tensor, so checkpoints load with torch.load(weights_only=True).
    name, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
