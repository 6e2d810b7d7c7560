"""SFT sources beside a preference stage (dpo, kto): a mixture whose sources hold conversations as
well as pairs trains both in every step, each SFT source a loss term of its own.

    dataset_path:
      pairs: {path: dpo_train.jsonl}
      chat: {path: sft_train.jsonl, loss_weight: 0.2}

Each optimiser step takes its global batch of pairs (the stage's own loader, references attached)
and, from each SFT source, a global batch of as many rows from that source's own step-indexed
loader (its epochs run on independently). The loss is

    L = L_pref (the stage's loss over the step's pairs or examples) + sum_s w_s S_s / N_s

with S_s the summed token losses of source s in the step and N_s its target tokens (the engine's
loss terms, train/engine.py). `sft_weight` (an SFT term on the chosen responses) is another thing and
still available. Evaluation is the stage's own, on its eval pairs.
"""

from __future__ import annotations

from bumblecore.train.sft import LanguageModelingStage


class StepsWithSFT:
    """The stage's loader, each micro-batch carrying the same-index micro-batch of every SFT source."""

    def __init__(self, pairs, sources: dict):
        self.pairs, self.sources = pairs, sources

    def __getattr__(self, name):  # steps_per_epoch, global_size, total_steps ... of the pairs' loader
        return getattr(self.pairs, name)

    def micro_batches(self, step: int) -> list[dict]:
        beside = {name: loader.micro_batches(step) for name, loader in self.sources.items()}
        return [
            {**batch, "beside": {name: micro[i] for name, micro in beside.items()}}
            for i, batch in enumerate(self.pairs.micro_batches(step))
        ]


class WithSFT:
    """The preference stage plus one loss term per SFT source: count and loss by term, the stage's first."""

    def __init__(self, stage, weights: dict[str, float], main: str):
        self.stage, self.weights, self.main = stage, weights, main
        self.language_modeling = LanguageModelingStage()
        self.reports_perplexity = False
        self.headline_metrics = getattr(stage, "headline_metrics", ())  # evaluation runs the stage's own pairs
        self.summary = getattr(stage, "summary", "")

    def count(self, batch: dict):
        if "beside" not in batch:  # evaluation: the stage's own pairs
            return self.stage.count(batch)
        counts = {self.main: self.stage.count(batch)}
        counts.update({name: self.language_modeling.count(rows) for name, rows in batch["beside"].items()})
        return counts

    def loss(self, model, batch: dict):
        if "beside" not in batch:
            return self.stage.loss(model, batch)
        total, metrics = self.stage.loss(model, batch)
        terms = {self.main: total}
        for name, rows in batch["beside"].items():
            summed, _ = self.language_modeling.loss(model, rows)
            terms[name] = self.weights[name] * summed
            metrics[f"loss/{name}"] = (summed.detach(), self.language_modeling.count(rows))
        return terms, metrics


def split_sft_sources(sources) -> tuple[list, list]:
    """(preference sources, conversation sources) of a dpo/kto mixture, told by their first record."""
    from bumblecore.data.detect import detect_format
    from bumblecore.data.sources import data_files, iter_json_records

    pairs, conversations = [], []
    for source in sources:
        where, record = next(iter_json_records(data_files(list(source.paths))[0]), (None, None))
        # KTO's examples are conversations with a `label`: they belong to the stage
        conversation = (
            isinstance(record, dict)
            and "label" not in record
            and detect_format(record, where) in ("alpaca", "sharegpt", "messages")
        )
        (conversations if conversation else pairs).append(source)
    return pairs, conversations
