"""Checkpoint directories: written under a temporary name and renamed when complete, rotated,
found again for `resume_from_checkpoint: latest`.

A checkpoint holds two things: at its root the model in Hugging Face format (or the peft adapter),
so other tools load it as is; and `training_state/`, everything needed to continue exactly
(optimiser, scheduler, data position, RNG states, step). `trainer_state.json` is written last and
marks the directory complete; it also holds the size and SHA-256 of every other file of the
checkpoint (DeepSpeed's shards included), checked before a resume trusts the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import torch

PREFIX = "checkpoint-"
COMPLETE_MARKER = "trainer_state.json"
STATE_DIR = "training_state"


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files do not match the checksums written with it (or cannot be read)."""


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


def resolve_resume_dir(
    output_dir, resume_from_checkpoint: Optional[str], notes: Optional[list] = None
) -> Optional[Path]:
    """`latest` -> the newest intact checkpoint of output_dir (None if there is none yet; each damaged
    newer one skipped is said in `notes`); a path -> itself, checked complete and intact."""
    notes = notes if notes is not None else []
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = complete_checkpoints(output_dir)
        damaged = []
        for _, path in reversed(found):
            problem = checkpoint_problem(path, notes)
            if problem is None:
                return path
            damaged.append(f"{path}: {problem}")
            notes.append(f"skipped damaged {path.name}: {problem}")
        if damaged:
            raise DamagedCheckpoint(
                f"resume_from_checkpoint latest: every checkpoint in {output_dir} is damaged: " + "; ".join(damaged)
            )
        return None
    path = Path(resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).is_file() or not (path / STATE_DIR).exists():
        raise ValueError(
            f"resume_from_checkpoint {path} is not a complete checkpoint (no {COMPLETE_MARKER} / {STATE_DIR})"
        )
    problem = checkpoint_problem(path, notes)
    if problem is not None:
        raise DamagedCheckpoint(f"resume_from_checkpoint {path} is damaged: {problem}")
    return path


def file_sha256(path: Path) -> str:
    from bumblecore.data.cache import hash_file_into

    digest = hashlib.sha256()
    hash_file_into(digest, path)
    return digest.hexdigest()


def checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint (relative, sorted), the completion marker excepted."""
    directory = Path(directory)
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER
    )


def checksums(directory: Path) -> dict:
    """{relative path: [size, sha256]} of every file of the checkpoint: computed once, at save."""
    directory = Path(directory)
    return {
        name: [(directory / name).stat().st_size, file_sha256(directory / name)] for name in checkpoint_files(directory)
    }


def checkpoint_problem(directory: Path, notes: Optional[list] = None) -> Optional[str]:
    """None when the checkpoint's files match the checksums in its trainer_state.json, else what is
    wrong, in a few words. Sizes are compared first, so a truncated file costs no hashing."""
    directory = Path(directory)
    try:
        state = read_trainer_state(directory)
    except (OSError, ValueError) as err:
        return f"{COMPLETE_MARKER} is unreadable ({type(err).__name__})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{COMPLETE_MARKER} does not describe a checkpoint"
    recorded = state.get("checksums")
    if recorded is None:  # written before checkpoints carried checksums: nothing to compare
        if notes is not None:
            notes.append(f"{directory.name} has no checksums (an older checkpoint); its files are not verified")
        return None
    for name, (size, _) in recorded.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were saved (truncated or replaced)"
    for name, (_, digest) in recorded.items():
        if file_sha256(directory / name) != digest:
            return f"{name} does not match its checksum (changed or corrupted since it was saved)"
    return None


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
    `write_contents(tmp_dir)` fills the directory, then rank 0 records every file's checksum in the
    completion marker and renames the directory. A save that fails (a full disk) leaves nothing behind."""
    root = Path(output_dir)
    final, tmp = root / name, root / f".{name}.tmp"
    if is_rank_zero:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash: never trusted
        tmp.mkdir()
    barrier()
    try:
        write_contents(tmp)
    except BaseException:
        if is_rank_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if is_rank_zero:
        try:
            marker = {**trainer_state, "checksums": checksums(tmp)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            old = root / f".{name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    barrier()
    return final


def remove_stale_temporaries(output_dir) -> list[Path]:
    """Checkpoint directories a killed or failed save left under their temporary names. Call on rank 0
    before any rank of the run saves: only rank 0 creates them, so none of them is being written."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    stale = []
    for path in root.iterdir():
        match = re.fullmatch(rf"\.({PREFIX}(?:\d+|last))\.(tmp|old)", path.name)
        if not match or not path.is_dir():
            continue
        final = root / match.group(1)
        if match.group(2) == "old" and not final.exists():
            os.replace(path, final)  # killed between the two renames of a re-save: the old one is whole
            continue
        shutil.rmtree(path, ignore_errors=True)
        stale.append(path)
    return stale


def in_place_checkpoint_io():
    """Fabric's checkpoint writer, minus its own atomic save: that one keeps a copy of the state in
    memory, writes it a second time through the system temp dir and leaves the file mode 0600. Our
    checkpoint directory is already written under a temporary name and renamed whole."""
    from lightning.fabric.plugins import TorchCheckpointIO

    class InPlaceCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:  # the usual mode under the umask (0644)
                torch.save(checkpoint, handle)

    return InPlaceCheckpointIO()


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
