"""What `bumblecore serve` runs with: its settings, and the model directory's layout and context
length, which both of its processes (HTTP and inference worker) read."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bumblecore.inference.sampling import SamplingArgs

DEFAULT_CONTEXT_CAP = 4096
# serve's defaults for requests that leave a field out: replies up to the end of the context, and
# sampling, as OpenAI does for a request without temperature.
SERVE_SAMPLING = SamplingArgs(max_new_tokens=None, do_sample=True)
# A chat's next turn reuses its history's keys and values (inference/prefix_cache.py). 256 MiB holds
# ~20k tokens of a 0.5B Qwen2 in bfloat16 (12 KiB a token), ~128k of the benchmark's small model.
DEFAULT_PREFIX_CACHE_MB = 256.0
# A reply's tokens go out at most every 20 ms (50 chunks a second, as smooth as a page can show):
# a model that decodes faster sends several tokens a chunk instead of one socket write per token,
# which at many streams costs the server more than the decode; a slower one sends each as it comes.
DEFAULT_STREAM_INTERVAL = 0.02


@dataclass
class ServeSettings:
    model_path: str
    model_name: str = "bumblebee"
    api_key: Optional[str] = None
    training_stage: str = "sft"
    system_prompt: Optional[str] = None
    max_batch_size: int = 16
    max_model_len: Optional[int] = None
    max_request_bytes: int = 1_000_000
    dtype: str = "auto"
    device_map: str = "auto"
    trust_remote_code: bool = False
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    """Host names served besides the loopback ones (a loopback server) or instead of any (others); "*": any."""
    allowed_origins: tuple[str, ...] = ()
    """Web origins (scheme://host[:port]) whose pages may call the API besides the server's own; "*": any."""
    header_timeout: float = 10.0
    """Seconds a connection may take to send a request's line and headers (or stay idle between requests)."""
    body_timeout: float = 30.0
    """Seconds a client may take to send a request's body."""
    stream_interval: float = DEFAULT_STREAM_INTERVAL
    """Seconds at least between two chunks of a reply: tokens generated meanwhile go out together."""
    sampling: SamplingArgs = SERVE_SAMPLING
    """Defaults for requests that leave a field out (the original's generation flags)."""
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB
    """MiB of KV cache kept from finished requests for later ones that start the same (a chat's history); 0: none."""
    chat_template: Optional[str] = None
    """A built-in template name or a .jinja file instead of the tokenizer's own."""
    base_model_path: Optional[str] = None
    """A LoRA adapter's base, instead of the one the adapter names."""
    ignore_base_mismatch: bool = False
    """Apply a LoRA adapter to a base other than the one it was trained on instead of refusing."""
    static_cache: bool = False
    """Decode every slot in one fixed-shape compiled step (inference/static_decode.py)."""


def model_dirs(model_path: str, base_model_path: Optional[str] = None) -> tuple[Path, Path]:
    """(directory with the model's config.json, directory with its tokenizer); a LoRA adapter's base
    (`base_model_path`, else the one it names) holds the config, and the tokenizer too unless the
    adapter saved one."""
    path = Path(model_path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        named = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        base = Path(base_model_path or named or "")
        return base, path if (path / "tokenizer_config.json").is_file() else base
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    return path, path


def context_length(model_path: str, max_model_len: Optional[int], base_model_path: Optional[str] = None) -> int:
    """Tokens per request (prompt + reply): --max_model_len, else the model's own, capped so the
    preallocated KV cache of every slot stays small."""
    config_dir, _ = model_dirs(model_path, base_model_path)
    config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    own = config.get("max_position_embeddings") or DEFAULT_CONTEXT_CAP
    return min(max_model_len, own) if max_model_len else min(own, DEFAULT_CONTEXT_CAP)
