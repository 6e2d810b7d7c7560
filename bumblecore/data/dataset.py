"""A run's datasets as training units: its sources (a mixture's, or one path), tokenized into the token
cache and arranged as the stage's reading says; and the run's tokenizer."""

from __future__ import annotations

from bumblecore.args import DataArgs, ModelArgs
from bumblecore.chat.format import chat_format
from bumblecore.chat.templates import prepare_tokenizer
from bumblecore.data.cache import TokenCache, build_cache
from bumblecore.data.dataset_spec import run_sources
from bumblecore.data.formats import StageReading
from bumblecore.data.mixture import all_paths, mixture_units
from bumblecore.data.packing import Units
from bumblecore.data.sources import DataError, data_files
from bumblecore.tokenizer import load_tokenizer


def dataset_units(
    data: DataArgs,
    reading: StageReading,
    seed: int,
    tokenizer,
    paths,
    progress: bool = True,
    label: str = "dataset_path",
) -> tuple[TokenCache, Units]:
    """Validate, tokenize (or reuse the cache) and arrange `paths` (the value of the key `label`: one path,
    a list, or a mixture's mapping) into training units, as the stage's `reading` says; several sources are a
    mixture (data/mixture.py). Data that gives no sample at all is an error that says which files and
    lines, and why."""
    sources = run_sources(data, paths, label)
    paths = all_paths(sources)
    cache = build_cache(
        paths, tokenizer, reading, data.cutoff_len, data.cache_dir, data.skip_bad_records, progress=progress
    )
    strategy = data.mix_strategy if label == "dataset_path" else "concat"  # eval data: every record once
    units = mixture_units(cache, sources, reading, data.cutoff_len, bool(data.packing), seed, strategy)
    if len(units) == 0:
        shown = ", ".join(str(f) for f in data_files(paths))
        raise DataError(f"{label} {shown}: no usable samples: {cache.summary.why_nothing()}")
    return cache, units


def run_tokenizer(model: ModelArgs, chat: bool):
    """The run's tokenizer (from the model dir) with its chat template (`chat_template`, else its own) and
    any `new_special_tokens`, checked when the stage trains conversations (`chat`).
    `tokenizer.bumblecore_added_tokens` lists the tokens added here (their embedding rows are grown and trained)."""
    tokenizer = load_tokenizer(model.model_name_or_path, trust_remote_code=model.trust_remote_code)
    tokenizer.bumblecore_added_tokens = prepare_tokenizer(
        tokenizer, model.chat_template, model.new_special_tokens, model.resize_vocab, model.model_name_or_path, chat
    )
    if chat:
        chat_format(tokenizer).check_trainable(model.model_name_or_path)
    return tokenizer
