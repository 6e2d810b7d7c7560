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

from bumblecore.model.bumblebee import Bumblebee
from bumblecore.model.config import ACTIVATIONS, ROPE_TYPES, BumblebeeConfig

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "bumblebee")
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "bumblebee": "BumblebeeForCausalLM",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# config.json keys that map 1:1 onto BumblebeeConfig fields.
_SHARED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "hidden_act",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Keys we write or interpret ourselves; anything else read from config.json is carried in `extra`.
_HANDLED_KEYS = set(_SHARED_KEYS) | {
    "model_type",
    "architectures",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "norm_type",
    "attn_implementation",
    "torch_dtype",
    "dtype",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "transformers_version",
    "use_cache",
    "attention_dropout",
    "pretraining_tp",
    "_name_or_path",
    "qk_norm",
    "family",
}


# ---------------------------------------------------------------------------- config.json


def config_from_hf_dict(raw: dict, source: str = "config.json") -> BumblebeeConfig:
    """Translate a transformers 4 or 5 config.json (qwen2, qwen3, llama, mistral or bumblebee) into a BumblebeeConfig."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not a Bumblebee family (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "other architectures train through transformers' AutoModelForCausalLM"
        )
    missing = unsupported_features(raw)
    if missing:
        raise ValueError(f"{source}: {'; '.join(missing)} (not implemented by Bumblebee)")

    fields = {k: raw[k] for k in _SHARED_KEYS if k in raw}
    # transformers 5 keeps RoPE settings in `rope_parameters`; transformers 4 at top level.
    rope = dict(raw.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
    fields["rope_theta"] = float(theta)
    fields["rope_scaling"] = scaling
    fields["attention_bias"] = {"qwen2": True}.get(model_type, raw.get("attention_bias", model_type == "bumblebee"))
    fields["qk_norm"] = model_type == "qwen3" or bool(raw.get("qk_norm", False))
    fields["sliding_window"], fields["layer_types"] = _read_window(model_type, raw, source)
    fields["family"] = model_type if model_type != "bumblebee" else None
    fields["norm_type"] = raw.get("norm_type", "rmsnorm")
    fields["attn_implementation"] = raw.get("attn_implementation", "sdpa")
    fields["torch_dtype"] = raw.get("torch_dtype", raw.get("dtype"))
    if "num_key_value_heads" not in fields or fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    fields["extra"] = {k: v for k, v in raw.items() if k not in _HANDLED_KEYS}
    try:
        return BumblebeeConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err


def unsupported_features(raw: dict) -> list[str]:
    """What a config.json of a Bumblebee family asks for that Bumblebee does not implement (empty: none)."""
    model_type = raw.get("model_type")
    found = []
    if raw.get("mlp_bias"):
        found.append("mlp_bias=true is not supported")
    if model_type in ("llama", "qwen3", "mistral") and raw.get("attention_bias"):
        found.append(f"{model_type} attention_bias=true (bias on o_proj too) is not supported")
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        found.append(f"rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if raw.get("hidden_act", "silu") not in ACTIVATIONS:
        found.append(f"hidden_act {raw['hidden_act']!r} is not supported")
    return found


def bumblebee_expresses(model_dir) -> bool:
    """Whether Bumblebee runs this model directory natively: a family it implements, with no feature it
    lacks (`unsupported_features`). Anything else goes through transformers (model/transformers_family.py);
    our own `bumblebee` type always loads here, and fails there with the reason if it cannot."""
    raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") == "bumblebee":
        return True
    return raw.get("model_type") in SUPPORTED_MODEL_TYPES and not unsupported_features(raw)


def _read_window(model_type: str, raw: dict, source: str) -> tuple:
    """(sliding_window, layer_types) as transformers reads them for this family."""
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if model_type == "mistral":
        return window, None  # Mistral slides every layer when sliding_window is set (it ignores layer_types)
    if model_type in ("llama",):
        return None, None
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window"):
            return None, None  # transformers drops the window unless use_sliding_window
        if window is None:
            raise ValueError(f"{source}: use_sliding_window=true needs sliding_window")
        if layer_types is None:  # older files: layers from max_window_layers on slide
            first = raw.get("max_window_layers", raw.get("num_hidden_layers"))
            layer_types = [
                "sliding_attention" if i >= first else "full_attention" for i in range(raw["num_hidden_layers"])
            ]
        return window, layer_types
    return window, layer_types


def _slides_everywhere(config: BumblebeeConfig) -> bool:
    return config.sliding_window is not None and all(
        config.layer_window(i) is not None for i in range(config.num_hidden_layers)
    )


def hf_model_type(config: BumblebeeConfig) -> str:
    """The HF family that expresses this config exactly (the one it was read as, while it still does)."""
    if config.norm_type != "rmsnorm":
        return "bumblebee"
    if config.qk_norm:
        return "bumblebee" if config.attention_bias else "qwen3"
    if config.attention_bias:
        return "qwen2"
    if config.sliding_window is None or all(config.layer_window(i) is None for i in range(config.num_hidden_layers)):
        return "mistral" if config.family == "mistral" else "llama"
    # Some layers slide, no bias: Mistral when all do; otherwise only our own format says which.
    return "mistral" if _slides_everywhere(config) else "bumblebee"


def _window_keys(config: BumblebeeConfig) -> dict:
    """Qwen2/Qwen3's sliding-window keys: use_sliding_window, sliding_window, max_window_layers, layer_types."""
    layers = config.num_hidden_layers
    types = ["sliding_attention" if config.layer_window(i) is not None else "full_attention" for i in range(layers)]
    if "sliding_attention" not in types:
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=layers, layer_types=types)
    # max_window_layers for transformers versions that read it instead of layer_types; exact when the
    # sliding layers are the last ones (the only pattern it can say), layer_types says any pattern.
    first = types.index("sliding_attention")
    return dict(
        use_sliding_window=True, sliding_window=config.sliding_window, max_window_layers=first, layer_types=types
    )


def config_to_hf_dict(config: BumblebeeConfig, dtype: Optional[torch.dtype] = None) -> dict:
    model_type = hf_model_type(config)
    out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type}
    out.update({k: getattr(config, k) for k in _SHARED_KEYS})
    # transformers 4 layout (top-level rope_theta / rope_scaling); transformers 5 reads it too.
    out["rope_theta"] = config.rope_theta
    out["rope_scaling"] = config.rope_scaling
    out["attention_dropout"] = 0.0
    out["use_cache"] = True
    if model_type in ("qwen2", "qwen3"):
        out.update(_window_keys(config))
        if model_type == "qwen3":
            out.update(attention_bias=False, head_dim=config.head_dim)
    elif model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type == "mistral":
        out.update(sliding_window=config.sliding_window, head_dim=config.head_dim)
    else:
        out.update(
            attention_bias=config.attention_bias,
            norm_type=config.norm_type,
            qk_norm=config.qk_norm,
            sliding_window=config.sliding_window,
            layer_types=config.layer_types,
        )
    if config.attn_implementation != "sdpa":
        out["attn_implementation"] = config.attn_implementation
    name = dtype_name(dtype) if dtype is not None else config.torch_dtype
    if name:
        out["torch_dtype"] = name
    for key, value in config.extra.items():
        out.setdefault(key, value)
    return out


def read_config(path: Union[str, Path]) -> BumblebeeConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err
    return config_from_hf_dict(raw, source=str(config_file))


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def resolve_dtype(dtype: Union[str, torch.dtype, None], config: BumblebeeConfig) -> torch.dtype:
    """A requested dtype, or the checkpoint's ("auto" or None), or fp32 when neither says."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = config.torch_dtype or "float32"
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return DTYPES[name]


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


def expected_tensors(model: Bumblebee) -> dict[str, tuple]:
    """The checkpoint tensors a model needs, name -> shape (ZeRO-3 partitioned weights keep theirs in ds_shape)."""
    shapes = {
        name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters(remove_duplicate=False)
    }
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def load_pretrained(path, dtype=None, device=None) -> Bumblebee:
    """Load a HF-layout directory of a Bumblebee, Qwen2 or Llama model, tensor by tensor straight into
    `dtype` on `device` (the host never holds a second copy)."""
    path = Path(path)
    config = read_config(path)
    target_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = Bumblebee(config)
    state = {
        name: load().to(device=device or "cpu", dtype=target_dtype)
        for name, load in iter_checkpoint(path, config, expected_tensors(model))
    }
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    config.torch_dtype = dtype_name(target_dtype)
    return model


def load_model(model_dir, dtype: str = "auto", device=None, trust_remote_code: bool = False):
    """A full model directory of any causal-LM family as a plain torch module: Bumblebee for the families
    it implements (`bumblebee_expresses`), else transformers' own class."""
    if bumblebee_expresses(model_dir):
        return load_pretrained(model_dir, dtype=resolve_dtype(dtype, read_config(model_dir)), device=device)
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype in (None, "auto") else DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return model.to(device) if device is not None else model


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
    model: Bumblebee,
    path,
    max_shard_size: Union[int, str] = "5GB",
    state_dict=None,
    stream: Optional[tuple[dict, Iterator]] = None,
) -> None:
    """Write config.json, generation_config.json and safetensors (sharded past `max_shard_size`).

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

    _atomic_write_text(path / "config.json", json.dumps(config_to_hf_dict(config, dtype), indent=2) + "\n")
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
