"""BumbleCore: hand-written, fast LLM training end to end."""

__version__ = "0.1.0"
__all__ = ["Bumblebee", "BumblebeeConfig", "load_tokenizer", "__version__"]

# Imported on first use, so `bumblecore --help` does not pay for torch and transformers.
_LAZY = {
    "Bumblebee": "bumblecore.model.bumblebee",
    "BumblebeeConfig": "bumblecore.model.config",
    "load_tokenizer": "bumblecore.tokenizer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bumblecore' has no attribute {name!r}")
