"""`bumblecore prepare_data` and `bumblecore inspect_data`: both read the same config file as `train`."""

from __future__ import annotations

import json
import sys

from bumblecore.data.cache import TokenCache, build_cache
from bumblecore.data.formats import DataError, ReadReport, data_files, read_samples
from bumblecore.data.packing import Units, build_units
from bumblecore.data.template import chat_format, encode_conversation, encode_document, encode_preference
from bumblecore.tokenizer import load_tokenizer
from bumblecore.train.config import TrainConfig


def dataset_units(config: TrainConfig, tokenizer, paths, progress: bool = True,
                  label: str = "dataset_path") -> tuple[TokenCache, Units]:
    """Validate, tokenize (or reuse the cache) and arrange `paths` into training units for this run.
    Data that gives no sample at all is an error that says which files and lines, and why."""
    cache = build_cache(paths, tokenizer, config.training_stage, config.cutoff_len, config.cache_dir,
                        config.skip_bad_records, progress=progress)
    units = build_units(cache, config.training_stage, config.cutoff_len, bool(config.packing), config.seed)
    if len(units) == 0:
        shown = ", ".join(str(f) for f in data_files(paths))
        raise DataError(f"{label} {shown}: no usable samples: {cache.summary.why_nothing()}")
    return cache, units


def run_tokenizer(config: TrainConfig):
    """The run's tokenizer (from the model dir) with its own chat template, checked for the chat stages."""
    tokenizer = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
    if config.training_stage in ("sft", "dpo"):
        chat_format(tokenizer).check_trainable(config.model_name_or_path)
    return tokenizer


def _require_data(config: TrainConfig) -> None:
    if not config.model_name_or_path:
        raise ValueError("model_name_or_path is required (its tokenizer tokenizes the data)")
    if not config.dataset_path:
        raise ValueError("dataset_path is required")


def prepare_data(config: TrainConfig) -> None:
    """Tokenize the run's datasets into the token cache ahead of training (train reuses it).

    Takes the same config file as `bumblecore train`; keys it does not use are ignored. Validates
    every record first, then streams: memory stays flat as the corpus grows.
    """
    _require_data(config)
    tokenizer = run_tokenizer(config)
    for label, paths in (("train", config.dataset_path), ("eval", config.eval_dataset_path)):
        if not paths:
            continue
        cache, units = dataset_units(config, tokenizer, paths)
        summary = cache.summary
        print(f"{label}: {summary.describe()}")
        print(f"{label}: {len(units)} training units ({'packed rows' if config.packing else 'rows'} of <= {config.cutoff_len} tokens) "
              f"in {cache.directory}")
        for example in summary.examples(limit=10):
            print(f"  {example}")


def _marked_text(tokenizer, ids: list[int], mask: list[bool]) -> str:
    """Decoded text with trained spans in [[...]], decoding whole spans so characters stay intact."""
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tokenizer.decode(ids[start:end])
            out.append(f"[[{text}]]" if mask[start] else text)
            start = end
    return "".join(out)


def inspect_data(config: TrainConfig, num_samples: int = 3, format: str = "text") -> None:
    """Validate the whole dataset, then show how the first samples are tokenized and which tokens are trained.

    Takes the same config file as `bumblecore train`; keys it does not use are ignored.

    Args:
        num_samples: how many samples to show.
        format: text (trained spans marked [[like this]]) or json (one line per sample:
            {"input_ids": [...], "labels": [...]}, labels aligned with input_ids, -100 where not trained).
    """
    if format not in ("text", "json"):
        raise ValueError(f"format {format!r} is not supported; choose text or json")
    _require_data(config)
    tokenizer = run_tokenizer(config)
    report = ReadReport()
    shown = []
    for sample in read_samples(config.dataset_path, config.training_stage, config.skip_bad_records, report):
        if len(shown) < num_samples:
            shown.append(sample)
    for sample in shown:
        c = sample.conversation
        if sample.kind == "text":
            entries = [("document", encode_document(tokenizer, sample.text), None)]
        elif sample.kind == "conversation":
            entries = [("conversation", *encode_conversation(tokenizer, c.messages, c.tools))]
        else:
            entries = [(name, *encode_preference(tokenizer, c.messages, reply, c.tools))
                       for name, reply in (("chosen", sample.chosen), ("rejected", sample.rejected))]
        for name, ids, mask in entries:
            if mask is None:
                mask = [True] * len(ids)
            ids, mask = ids[: config.cutoff_len], mask[: config.cutoff_len]
            if format == "json":
                labels = [i if m else -100 for i, m in zip(ids, mask)]
                print(json.dumps({"input_ids": ids, "labels": labels}))
            else:
                print(f"===== {sample.where} ({name}): {len(ids)} tokens, {sum(mask)} trained =====")
                print(_marked_text(tokenizer, ids, mask))
    if format == "text":
        print(f"validated {report.records} records; {len(report.skipped)} bad records skipped", file=sys.stderr)
        for message in report.skipped[:10]:
            print(f"  skipped: {message}", file=sys.stderr)
