"""Which base an adapter belongs to: base_fingerprint.json beside every adapter we save (the base's
architecture and a checksum of its weights), checked before an adapter is attached or merged."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from bumblecore.model.hf_config import SHAPE_KEYS

# An adapter only means something on the exact weights it was trained on, but peft records its base as a
# path, and a path can come to hold another model (a later run writing the same output_dir). Beside the
# adapter, base_fingerprint.json records what that base was: its architecture and a checksum of its weights.

FINGERPRINT_FILE = "base_fingerprint.json"
# The config fields that decide the weights' shapes and what they compute.
BASE_CONFIG_KEYS = (
    "model_type",
    *SHAPE_KEYS,
    "hidden_act",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
)
SAMPLE_BYTES = 1024  # per window
SAMPLE_WINDOWS = 8  # windows per tensor (or per non-safetensors file, times 16)


def _sampled_windows(file: Path, size: int):
    """(offset, length) of the byte ranges a weights checksum reads. For safetensors: the header (every
    tensor's name, dtype, shape and offsets), then each tensor whole when small, else SAMPLE_WINDOWS
    windows spread evenly over it, so a base re-initialised or retrained in the same shapes differs
    even if only one tensor changed. Other files: windows spread over the whole file."""
    if file.suffix != ".safetensors":
        count = SAMPLE_WINDOWS * 16
        yield from _spread(0, size, count)
        return
    with open(file, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    yield 0, 8 + header_length
    for name in sorted(k for k in header if k != "__metadata__"):
        begin, end = header[name]["data_offsets"]
        yield from _spread(8 + header_length + begin, end - begin, SAMPLE_WINDOWS)


def _spread(start: int, length: int, count: int):
    if length <= count * SAMPLE_BYTES:
        yield start, length
        return
    step = (length - SAMPLE_BYTES) // (count - 1)
    for i in range(count):
        yield start + i * step, SAMPLE_BYTES


def weights_checksum(model_dir) -> str:
    """A SHA-256 over the weight files' names and sizes and sampled bytes of every tensor: reads about
    8 KiB per tensor, whatever the model's size (SmolLM2-135M: a few milliseconds)."""
    import hashlib

    from bumblecore.model.hf_io import _weight_files

    digest = hashlib.sha256()
    for file in _weight_files(Path(model_dir)):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for offset, length in _sampled_windows(file, size):
                handle.seek(offset)
                digest.update(handle.read(length))
    return "sha256:" + digest.hexdigest()


def _base_config(model_dir) -> dict:
    raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    raw = {**raw.get("text_config", {}), **raw}
    return {key: raw[key] for key in BASE_CONFIG_KEYS if key in raw}


def base_fingerprint(model_dir) -> dict:
    """What base_fingerprint.json records of a base model directory."""
    return {
        "base_model_name_or_path": str(Path(model_dir).resolve()),
        "config": _base_config(model_dir),
        "weights": weights_checksum(model_dir),
    }


def fingerprint_difference(recorded: dict, model_dir) -> Optional[str]:
    """None when `model_dir` is the base `recorded` describes; else what differs, in a few words."""
    config = _base_config(model_dir)
    changed = [
        f"{key} {recorded['config'].get(key)!r} -> {config.get(key)!r}"
        for key in sorted(set(recorded.get("config", {})) | set(config))
        if recorded.get("config", {}).get(key) != config.get(key)
    ]
    if changed:
        return f"its config differs ({', '.join(changed)})"
    if recorded.get("weights") != weights_checksum(model_dir):
        return "its weights differ (same shapes: another initialisation or training)"
    return None


def read_base_fingerprint(adapter_dir) -> Optional[dict]:
    file = Path(adapter_dir) / FINGERPRINT_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is unreadable ({type(err).__name__}); it records the adapter's base") from None


def check_adapter_base(adapter_dir, base_dir, ignore_base_mismatch: bool = False, notes=None) -> None:
    """Refuse `base_dir` under the adapter unless it is the base the adapter was trained on (or the user
    forces it). An adapter saved before base fingerprints existed is used with a note."""
    recorded = read_base_fingerprint(adapter_dir)
    say = notes.append if notes is not None else lambda line: print(f"note: {line}", file=sys.stderr, flush=True)
    if recorded is None:
        say(
            f"{adapter_dir} has no {FINGERPRINT_FILE} (saved before adapters recorded their base): "
            f"cannot check that {base_dir} is the base it was trained on"
        )
        return
    difference = fingerprint_difference(recorded, base_dir)
    if difference is None:
        return
    if ignore_base_mismatch:
        say(f"ignore_base_mismatch: applying {adapter_dir} to {base_dir}, although {difference} from its own base")
        return
    raise ValueError(
        f"the LoRA adapter {adapter_dir} was trained on another base than {base_dir}: {difference}; "
        f"{trained_where(recorded, base_dir)}. Give its own base with --base_model_path, or pass "
        f"--ignore_base_mismatch to apply it to {base_dir} anyway"
    )


def trained_where(recorded: dict, base_dir) -> str:
    """Where the adapter's own base was, as its base_fingerprint.json says."""
    trained_on = recorded.get("base_model_name_or_path", "?")
    if Path(trained_on).resolve() == Path(base_dir).resolve():
        return f"{base_dir} was rewritten after the adapter was trained on it (its {FINGERPRINT_FILE} says so)"
    return f"it was trained on {trained_on} (its {FINGERPRINT_FILE} says so)"


def adapter_base_dir(adapter_dir, base_model_path: Optional[str] = None, ignore_base_mismatch: bool = False) -> Path:
    """The base model directory to put an adapter on: `base_model_path` when given, else the one the
    adapter names (base_model_name_or_path); checked to be a model directory and the adapter's base."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (expected a peft LoRA adapter directory)")
    if base_model_path:
        if not (Path(base_model_path) / "config.json").is_file():
            raise FileNotFoundError(f"base_model_path {base_model_path} is not a model directory (no config.json)")
        base = base_model_path
    else:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise FileNotFoundError(
                f"{config_file}: base_model_name_or_path {base!r} is not a model directory; give the base with "
                "base_model_path"
            )
    check_adapter_base(adapter_dir, base, ignore_base_mismatch)
    return Path(base)
