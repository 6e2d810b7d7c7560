"""Hugging Face checkpoint layout: config.json, (sharded) safetensors, generation_config.json.

A model is saved in the HF family that expresses it exactly: `qwen2` (qkv bias, RMSNorm: the
presets), `qwen3` (per-head q/k RMSNorm), `llama` (no bias, RMSNorm), `mistral` (Llama's layout with
a sliding window, or read as mistral), else `bumblebee` (e.g. LayerNorm), which only bumblecore loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional, Union

import torch

from bumblecore.model.config import BumblebeeConfig
from bumblecore.model.hf_config import (
    config_to_hf_dict,
    hf_model_type,
)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# ---------------------------------------------------------------------------- weights


def _weight_files(path: Path) -> list[Path]:
    index = path / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err})") from err
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return files
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FileNotFoundError(f"{path}: no model.safetensors, {SAFE_INDEX} or pytorch_model.bin")


def _file_tensors(file: Path) -> Iterator[tuple[str, tuple, Callable[[], torch.Tensor]]]:
    """(name, shape, load) for each tensor of one weight file; safetensors are read lazily, one tensor
    when `load()` is called, so a rank that only needs names and shapes reads no data."""
    if file.suffix == ".bin":
        for name, tensor in torch.load(file, map_location="cpu", weights_only=True).items():
            yield name, tuple(tensor.shape), (lambda t=tensor: t)
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                yield name, shape, (lambda n=name: handle.get_tensor(n))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupt?): {err}") from err


def iter_checkpoint(
    path, config: BumblebeeConfig, expected_shapes: dict[str, tuple]
) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """Every weight of a checkpoint directory as (name, load), shard file by shard file, checked
    against the model's names and shapes; a missing tensor is an error once all files are read."""
    path = Path(path)
    seen = set()
    for file in _weight_files(path):
        for name, shape, load in _file_tensors(file):
            if name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight"):
                continue  # recomputed / tied: not real parameters
            if name not in expected_shapes:
                raise ValueError(f"{file}: unexpected tensor {name!r} for a {hf_model_type(config)} model")
            if shape != tuple(expected_shapes[name]):
                raise ValueError(
                    f"{path}: tensor {name!r} has shape {shape}, config.json implies {tuple(expected_shapes[name])}"
                )
            seen.add(name)
            yield name, load
    missing = sorted(set(expected_shapes) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s): {shown}")


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple]:
    """The checkpoint tensors a model needs, name -> shape (ZeRO-3 partitioned weights keep theirs in ds_shape)."""
    shapes = {
        name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters(remove_duplicate=False)
    }
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def parse_size(size: Union[int, str]) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (the units transformers uses)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {size!r}; write e.g. 5GB or 500MiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(number * powers[unit])


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it,
    and setting it briefly would race with files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write_text(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


# safetensors orders a file's tensors by dtype (widest alignment first, in this order) then by name.
_SAFETENSORS_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
    torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_DTYPE_RANK = {name: len(_SAFETENSORS_DTYPES) - i for i, name in enumerate(_SAFETENSORS_DTYPES.values())}


class SafetensorsShards:
    """Writes (sharded) safetensors files one tensor at a time, from their names, shapes and dtypes
    known up front: the files are laid out byte for byte as safetensors' own `save_file` lays out the
    same tensors (header, order, offsets), but no file's tensors are ever held together in memory.

    Shards split the tensors in the given order past `max_shard_size`, as save_pretrained always has.
    Each file is written under a temporary name and renamed by `finish`."""

    def __init__(self, path: Path, layout: dict[str, tuple[tuple, torch.dtype]], max_shard_size):
        self.path = path
        limit = parse_size(max_shard_size)
        shards: list[dict] = [{}]
        shard_bytes = 0
        for name, (shape, dtype) in layout.items():
            size = _numel(shape) * _itemsize(dtype)
            if shards[-1] and shard_bytes + size > limit:
                shards.append({})
                shard_bytes = 0
            shards[-1][name] = (shape, dtype)
            shard_bytes += size
        self.names = (
            [SAFE_WEIGHTS]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        self.shards = shards
        self.total_size = sum(_numel(s) * _itemsize(d) for s, d in layout.values())
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (file index, byte offset, bytes)
        self.files = []
        for index, (shard, name) in enumerate(zip(shards, self.names)):
            header, offsets = _safetensors_header(shard)
            fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.", suffix=".tmp")
            handle = os.fdopen(fd, "wb")
            handle.write(len(header).to_bytes(8, "little") + header)
            start = 8 + len(header)
            handle.truncate(start + sum(end - begin for begin, end in offsets.values()))
            self.files.append((handle, tmp))
            for tensor_name, (begin, end) in offsets.items():
                self.where[tensor_name] = (index, start + begin, end - begin)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, offset, size = self.where.pop(name)
        data = tensor.detach().contiguous().cpu()
        raw = data.view(-1).view(torch.uint8).numpy() if data.numel() else b""
        if len(raw) != size:
            raise ValueError(f"{name}: {len(raw)} bytes, the layout said {size}")
        handle = self.files[index][0]
        handle.seek(offset)
        handle.write(memoryview(raw) if data.numel() else raw)

    def finish(self) -> None:
        if self.where:
            raise ValueError(f"tensors never written: {', '.join(sorted(self.where))}")
        for (handle, tmp), name in zip(self.files, self.names):
            handle.close()
            os.chmod(
                tmp, 0o666 & ~current_umask()
            )  # mkstemp's 0600 would hide the weights from other users and containers
            os.replace(tmp, self.path / name)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {k: name for shard, name in zip(self.shards, self.names) for k in shard},
            }
            _atomic_write_text(self.path / SAFE_INDEX, json.dumps(index, indent=2))
        elif (self.path / SAFE_INDEX).exists():
            (self.path / SAFE_INDEX).unlink()
        for stale in self.path.glob("model-*-of-*.safetensors"):
            if stale.name not in self.names:
                stale.unlink()

    def abort(self) -> None:
        for handle, tmp in self.files:
            handle.close()
            Path(tmp).unlink(missing_ok=True)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _safetensors_header(shard: dict) -> tuple[bytes, dict]:
    """safetensors' header for these tensors (JSON, no spaces, padded with spaces to 8 bytes) and each
    tensor's (begin, end) in the data that follows."""
    order = sorted(shard, key=lambda name: (-_DTYPE_RANK[_SAFETENSORS_DTYPES[shard[name][1]]], name))
    entries, offsets, position = {"__metadata__": {"format": "pt"}}, {}, 0
    for name in order:
        shape, dtype = shard[name]
        size = _numel(shape) * _itemsize(dtype)
        offsets[name] = (position, position + size)
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": [int(s) for s in shape],
            "data_offsets": [position, position + size],
        }
        position += size
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return header + b" " * (-len(header) % 8), offsets


def save_pretrained(
    model: torch.nn.Module,
    path,
    max_shard_size: Union[int, str] = "5GB",
    state_dict=None,
    stream: Optional[tuple[dict, Iterator]] = None,
    config_dict: Optional[Callable[[torch.dtype], dict]] = None,
) -> None:
    """Write config.json, generation_config.json and safetensors (sharded past `max_shard_size`).
    `config_dict(dtype)`: config.json's contents, when not the causal LM's (a reward model's, model/reward.py).

    The weights are the model's, or `state_dict`'s, or `stream`'s: (layout {name: (shape, dtype)},
    an iterator of (name, tensor)), written one tensor at a time as the iterator makes them (a ZeRO-3
    export gathers each weight only while it is written). Each file is written under a temporary name
    and renamed, so a crash never leaves a half file under a real name; weight files of an earlier save
    that this one does not reuse are removed.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    if stream is None:
        state = state_dict if state_dict is not None else model.state_dict()
        layout = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        stream = (layout, iter(state.items()))
    layout, tensors = stream
    if config.tie_word_embeddings:
        layout = {k: v for k, v in layout.items() if k != "lm_head.weight"}
    dtype = next(iter(layout.values()))[1]
    writer = SafetensorsShards(path, layout, max_shard_size)
    try:
        for name, tensor in tensors:
            if name in layout:
                writer.write(name, tensor)
        writer.finish()
    except BaseException:
        writer.abort()
        raise

    hf_config = config_dict(dtype) if config_dict is not None else config_to_hf_dict(config, dtype)
    _atomic_write_text(path / "config.json", json.dumps(hf_config, indent=2) + "\n")
    write_generation_config(path, config)


def write_generation_config(path, config: BumblebeeConfig, eos_token_ids: Optional[list[int]] = None) -> None:
    """generation_config.json; keeps an existing file's sampling defaults."""
    file = Path(path) / "generation_config.json"
    existing = {}
    if file.is_file():
        try:
            existing = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            existing = {}
    eos = eos_token_ids if eos_token_ids is not None else existing.get("eos_token_id", config.eos_token_id)
    generation = {
        **existing,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
    }
    generation.setdefault("do_sample", False)
    generation = {k: v for k, v in generation.items() if v is not None}
    _atomic_write_text(file, json.dumps(generation, indent=2) + "\n")


def replace_directory(staging: Path, target: Path) -> None:
    """Move a complete `staging` directory to `target`, replacing an existing `target` whole."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = staging.with_name(staging.name + ".old")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old)
