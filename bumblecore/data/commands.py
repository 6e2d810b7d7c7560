"""`bumblecore prepare_data` and `bumblecore inspect_data`: both read the same config file as `train`.

The data layer sees only the data group (DataArgs) and what it truly needs beside it: the stage
(formats and trained targets), the seed (which samples share a packed row) and the tokenizer."""

from __future__ import annotations

import json
import sys

from bumblecore.args import TrainArgs
from bumblecore.chat.format import encode_conversation, encode_document, encode_preference
from bumblecore.data.dataset import dataset_units, run_tokenizer
from bumblecore.data.dataset_spec import run_sources
from bumblecore.data.formats import ReadReport, read_samples
from bumblecore.data.mixture import all_paths, source_records, source_report
from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.recipes import recipe_for


def _require_data(run: TrainArgs) -> None:
    if not run.model.model_name_or_path:
        raise ValueError("model_name_or_path is required (its tokenizer tokenizes the data)")
    if not run.data.dataset_path:
        raise ValueError("dataset_path is required")


def prepare_data(run: TrainArgs) -> None:
    """Tokenize the run's datasets into the token cache ahead of training (train reuses it).

    Takes the same config file as `bumblecore train`; keys it does not use are ignored. Validates
    every record first, then streams: memory stays flat as the corpus grows.
    """
    _require_data(run)
    recipe, data = recipe_for(run.model.training_stage), run.data
    tokenizer = run_tokenizer(run.model, recipe.chat)
    if recipe.reading is None:  # prompts: nothing to cache
        show_prompts(run, tokenizer, 0)
        return
    for label, key, paths in (
        ("train", "dataset_path", data.dataset_path),
        ("eval", "eval_dataset_path", data.eval_dataset_path),
    ):
        if not paths:
            continue
        cache, units = dataset_units(data, recipe.reading, run.optimization.seed, tokenizer, paths, label=key)
        summary = cache.summary
        print(f"{label}: {summary.describe()}")
        print(
            f"{label}: {len(units)} training units ({'packed rows' if data.packing else 'rows'} of <= {data.cutoff_len} tokens) "
            f"in {cache.directory}"
        )
        sources = run_sources(data, paths, key)
        for line in source_report(units, sources, source_records(cache, sources)):
            print(f"{label}:{line}")
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


def inspect_data(run: TrainArgs, num_samples: int = 3, format: str = "text") -> None:
    """Validate the whole dataset, then show how the first samples are tokenized and which tokens are trained.

    Takes the same config file as `bumblecore train`; keys it does not use are ignored.

    Args:
        num_samples: how many samples to show.
        format: text (trained spans marked [[like this]]) or json (one line per sample:
            {"input_ids": [...], "labels": [...]}, labels aligned with input_ids, -100 where not trained).
    """
    if format not in ("text", "json"):
        raise ValueError(f"format {format!r} is not supported; choose text or json")
    _require_data(run)
    recipe, data = recipe_for(run.model.training_stage), run.data
    tokenizer = run_tokenizer(run.model, recipe.chat)
    if recipe.reading is None:  # prompts: nothing to cache
        show_prompts(run, tokenizer, num_samples, format)
        return
    report = ReadReport()
    shown = []
    paths = all_paths(run_sources(data, data.dataset_path))
    for sample in read_samples(paths, recipe.reading, data.skip_bad_records, report):
        if len(shown) < num_samples:
            shown.append(sample)
    for sample in shown:
        c = sample.conversation
        if sample.kind == "text":
            entries = [("document", encode_document(tokenizer, sample.text), None)]
        elif sample.kind == "conversation":
            entries = [("conversation", *encode_conversation(tokenizer, c.messages, c.tools))]
        elif sample.kind == "labelled":
            label = "desirable" if sample.desirable else "undesirable"
            entries = [
                (name, *encode_preference(tokenizer, c.messages, reply, c.tools))
                for name, reply in ((label, sample.completion), ("KL row", sample.kl_completion))
            ]
        else:
            entries = [
                (name, *encode_preference(tokenizer, c.messages, reply, c.tools))
                for name, reply in (("chosen", sample.chosen), ("rejected", sample.rejected))
            ]
        for name, ids, mask in entries:
            if mask is None:
                mask = [True] * len(ids)
            ids, mask = ids[: data.cutoff_len], mask[: data.cutoff_len]
            if format == "json":
                labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
                print(json.dumps({"input_ids": ids, "labels": labels}))
            else:
                print(f"===== {sample.where} ({name}): {len(ids)} tokens, {sum(mask)} trained =====")
                print(_marked_text(tokenizer, ids, mask))
    if format == "text":
        print(f"validated {report.records} records; {len(report.skipped)} bad records skipped", file=sys.stderr)
        for message in report.skipped[:10]:
            print(f"  skipped: {message}", file=sys.stderr)


def show_prompts(run: TrainArgs, tokenizer, num_samples: int, format: str = "text") -> None:
    """GRPO's data: prompts (validated, rendered as the rollouts see them) and the fields the rewards get.
    Nothing is cached: the completions come from the policy during training."""
    from bumblecore.data.prompts import prompt_paths, read_prompts, tokenize_prompts

    report = ReadReport()
    prompts = read_prompts(prompt_paths(run.data, run.data.dataset_path), run.data.skip_bad_records, report)
    kept, too_long = tokenize_prompts(prompts, tokenizer, run.data.cutoff_len)
    for prompt in kept[:num_samples]:
        if format == "json":
            print(json.dumps({"input_ids": prompt.ids, "fields": prompt.fields}, ensure_ascii=False))
        else:
            print(f"===== {prompt.where}: {len(prompt.ids)} prompt tokens; fields {json.dumps(prompt.fields)} =====")
            print(tokenizer.decode(prompt.ids))
    print(
        f"grpo: {len(kept)} prompts of {report.records} records ({too_long} longer than cutoff_len "
        f"{run.data.cutoff_len}, {len(report.skipped)} bad records skipped); nothing to cache: the "
        "completions are sampled from the policy while it trains",
        file=sys.stderr,
    )
    for message in report.skipped[:10]:
        print(f"  skipped: {message}", file=sys.stderr)
