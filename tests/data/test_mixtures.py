"""Dataset mixtures (issue 21): named sources with sampling weights, per-source losses, loss weights.

Each check compares against a computation of its own: closed forms for the epoch's draws and the
weighted loss, each sample run alone for the per-source losses, and plain runs for the bitwise claims."""

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny import init_tiny_model_dir, make_tiny_model, one_process_and_two, tiny_run_keys, write_tiny_checkpoint

import bumblecore
from bumblecore.args import DataArgs, TrainArgs
from bumblecore.cli import main
from bumblecore.data.dataset import dataset_units
from bumblecore.data.loader import BatchLoader
from bumblecore.data.mixture import draws_per_epoch, interleaved_order, source_records, source_report
from bumblecore.data.packing import IGNORE_INDEX, collate
from bumblecore.recipes import recipe_for
from bumblecore.train.losses import chunked_cross_entropy, shift_targets
from bumblecore.train.monitor import plot_history
from bumblecore.train.sft import LanguageModelingStage

DEMO = Path(bumblecore.__file__).parent / "demo_data"


def lines_of(name: str, count: int, start: int = 0) -> str:
    return "\n".join((DEMO / name).read_text(encoding="utf-8").splitlines()[start : start + count]) + "\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small files of three formats: Alpaca tasks, ShareGPT chats, pretraining text."""
    root = tmp_path_factory.mktemp("mixture-data")
    (root / "tasks.jsonl").write_text(lines_of("sft_train.jsonl", 60))
    (root / "chat.jsonl").write_text(lines_of("sft_multiturn.jsonl", 20))
    (root / "text.jsonl").write_text(lines_of("pretrain.jsonl", 12))
    (root / "eval_tasks.jsonl").write_text(lines_of("sft_eval.jsonl", 8))
    return root


# ---------------------------------------------------------------------------- keys


def test_sources_are_named_and_bad_weights_are_refused_naming_the_key():
    sources = DataArgs(
        dataset_path=["d/math.jsonl", "d/chat/*.jsonl", "d/folder/"],
        dataset_weights=[3, 1, 0],
        dataset_loss_weights=[1, 0.5, 1],
        mix_strategy="interleave_under",
    ).sources()
    assert [(s.name, s.weight, s.loss_weight) for s in sources] == [
        ("math", 3.0, 1.0),
        ("chat", 1.0, 0.5),
        ("folder", 0.0, 1.0),
    ]
    mapped = DataArgs(dataset_path={"b": {"path": ["x.jsonl", "y.jsonl"], "loss_weight": 0.1}, "a": "z.jsonl"})
    assert [(s.name, s.paths, s.loss_weight) for s in mapped.sources()] == [
        ("a", ("z.jsonl",), 1.0),
        ("b", ("x.jsonl", "y.jsonl"), 0.1),
    ]
    same_stem = DataArgs(dataset_path=["data/en/train.jsonl", "data/zh/train.jsonl", "data/dev.jsonl"]).sources()
    assert [s.name for s in same_stem] == ["en/train", "zh/train", "dev"]
    two = ["a/x.jsonl", "b/y.jsonl"]
    refused = [
        (dict(dataset_path=["a/x.jsonl", "a/x.json"]), "two sources are named 'a/x'"),
        (dict(dataset_path=two, dataset_weights=[1], mix_strategy="interleave_over"), "dataset_weights has 1 weights"),
        (dict(dataset_path=two, dataset_weights=[1, -1], mix_strategy="interleave_over"), "dataset_weights: each"),
        (dict(dataset_path=two, dataset_weights=[1, math.nan], mix_strategy="interleave_over"), "dataset_weights"),
        (dict(dataset_path=two, dataset_weights=[math.inf, 1], mix_strategy="interleave_over"), "dataset_weights"),
        (dict(dataset_path=two, dataset_weights=[0, 0], mix_strategy="interleave_over"), "all zero"),
        (dict(dataset_path=two, dataset_loss_weights=[1, 2, 3]), "dataset_loss_weights has 3"),
        (dict(dataset_path=two, dataset_weights=[3, 1]), "need mix_strategy interleave"),
        (dict(dataset_path=two, mix_strategy="zip"), "mix_strategy 'zip'"),
        (dict(dataset_path={"a": {"path": "x", "weigth": 2}}), "dataset_path.a: expected"),
        (dict(dataset_path="x.jsonl", eval_dataset_path={"a": {"path": "x", "weight": 2}}), "eval_dataset_path.a"),
    ]
    for keys, message in refused:
        with pytest.raises(ValueError, match=message):
            DataArgs(**keys)


def test_mixture_keys_in_yaml_and_print_config(tmp_path, capsys):
    config = tmp_path / "mix.yaml"
    config.write_text(
        "dataset_path: [math.jsonl, chat.jsonl]\ndataset_weights: [3, 1]\nmix_strategy: interleave_under\n"
        "dataset_loss_weights: [1, 0.1]\n"
    )
    main(["train", "--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["dataset_path"] == ["math.jsonl", "chat.jsonl"]
    assert printed["dataset_weights"] == [3.0, 1.0] and printed["dataset_loss_weights"] == [1.0, 0.1]
    assert printed["mix_strategy"] == "interleave_under"
    run = TrainArgs.from_flat(**printed)
    assert [s.name for s in run.data.sources()] == ["math", "chat"]


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "sizes, weights, strategy, expected",
    [
        ((30, 50), (3, 1), "interleave_under", (30, 10)),  # 30 / 0.75 = 40 draws: the first source is used up
        ((30, 50), (3, 1), "interleave_over", (150, 50)),  # 50 / 0.25 = 200 draws: the last one is
        ((10, 10, 10), (1, 1, 1), "interleave_under", (10, 10, 10)),
        ((7, 100, 5), (1, 2, 0), "interleave_under", (7, 14, 0)),  # a zero weight is never drawn
        ((7, 9), (1, 1), "interleave_over", (9, 9)),
    ],
)
def test_draws_per_epoch_follow_the_weights(sizes, weights, strategy, expected):
    assert draws_per_epoch(sizes, weights, strategy).tolist() == list(expected)


def test_sampled_proportions_follow_the_weights_and_the_order_is_a_function_of_seed_and_epoch():
    unit_source = np.repeat([0, 1], [30, 50])
    draws = draws_per_epoch([30, 50], [3, 1], "interleave_over")
    order = interleaved_order(unit_source, draws, epoch=0, seed=42)
    assert Counter(unit_source[order].tolist()) == {0: 150, 1: 50}  # the epoch's exact counts
    # Oversampled: each unit of source 0 comes 5 times; source 1 is used up exactly once.
    assert set(Counter(order[unit_source[order] == 0].tolist()).values()) == {5}
    assert sorted(order[unit_source[order] == 1].tolist()) == list(range(30, 80))
    # Per global batch of 8, source 0's count is hypergeometric around 6: its mean over the first half of
    # the epoch stays within 3 standard errors, and the batches are not all alike.
    per_batch = [(unit_source[order[i : i + 8]] == 0).sum() for i in range(0, 100, 8)]
    sd = math.sqrt(8 * 0.75 * 0.25 * (200 - 8) / (200 - 1)) / math.sqrt(len(per_batch))
    assert abs(np.mean(per_batch) - 6) < 3 * sd and len(set(per_batch)) > 1
    # A pure function of (seed, epoch): recomputed anywhere (a resumed run) it is the same.
    assert np.array_equal(order, interleaved_order(unit_source, draws, epoch=0, seed=42))
    assert not np.array_equal(order, interleaved_order(unit_source, draws, epoch=1, seed=42))
    assert not np.array_equal(order, interleaved_order(unit_source, draws, epoch=0, seed=7))


def mixture_units(data_dir, demo_tok, tmp_path, stage="sft", packing=True, cutoff_len=256, **keys):
    data = DataArgs(cutoff_len=cutoff_len, packing=packing, cache_dir=str(tmp_path / "cache"), **keys)
    return dataset_units(data, recipe_for(stage).reading, 42, demo_tok, data.dataset_path, progress=False)


def test_loader_serves_the_interleaved_epoch_and_a_fresh_loader_resumes_it(data, demo_tok, tmp_path):
    cache, units = mixture_units(
        data,
        demo_tok,
        tmp_path,
        dataset_path=[str(data / "tasks.jsonl"), str(data / "chat.jsonl")],
        dataset_weights=[1, 1],
        mix_strategy="interleave_under",
    )
    sizes = np.bincount(units.sources.of_unit)
    loader = BatchLoader(units, micro_batch_size=2, accumulation=2, seed=42, pad_id=0, packing=True)
    epoch_units = 2 * min(sizes)
    assert loader.steps_per_epoch == math.ceil(epoch_units / 4)
    served = [i for step in range(loader.steps_per_epoch) for i in loader.global_indices(step)][:epoch_units]
    assert Counter(units.sources.of_unit[served].tolist()) == {0: min(sizes), 1: min(sizes)}
    late = BatchLoader(units, micro_batch_size=2, accumulation=2, seed=42, pad_id=0, packing=True)
    for step in (5, loader.steps_per_epoch + 1):  # mid-epoch and into the next one, asked for directly
        assert late.global_indices(step) == loader.global_indices(step)
        assert all(
            torch.equal(a["source_ids"], b["source_ids"]) and torch.equal(a["input_ids"], b["input_ids"])
            for a, b in zip(late.micro_batches(step), loader.micro_batches(step))
        )


def test_interleaved_pretraining_cuts_each_sources_own_stream_into_blocks(data, demo_tok, tmp_path):
    (tmp_path / "more.jsonl").write_text(lines_of("pretrain.jsonl", 20, start=100))
    cache, units = mixture_units(
        data,
        demo_tok,
        tmp_path,
        stage="pretrain",
        cutoff_len=32,
        dataset_path=[str(data / "text.jsonl"), str(tmp_path / "more.jsonl")],
        dataset_weights=[1, 1],
        mix_strategy="interleave_over",
    )
    info = units.sources
    for source in (0, 1):
        samples = np.flatnonzero(info.of_sample == source)
        own = cache.ids[cache.offsets[samples[0]] : cache.offsets[samples[-1] + 1]]
        rows = [units.rows[i] for i in np.flatnonzero(info.of_unit == source)]
        stream = np.concatenate([cache.ids[p.start : p.end] for row in rows for p in row])
        assert np.array_equal(stream, own) and all(sum(p.end - p.start for p in row) <= 32 for row in rows)
    assert info.draws.tolist() == [max(np.bincount(info.of_unit))] * 2  # over: the larger source once


# ---------------------------------------------------------------------------- losses


def sample_losses(model, ids, mask):
    """One sample alone (its own positions from 0): the sum and count of its target tokens' losses."""
    ids = torch.as_tensor(ids.astype(np.int64))[None]
    labels = ids.masked_fill(~torch.as_tensor(mask.astype(bool))[None], IGNORE_INDEX)
    logits = model(ids)
    targets = shift_targets(labels)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return float(losses[targets != IGNORE_INDEX].sum()), int((targets != IGNORE_INDEX).sum())


def test_per_source_losses_equal_each_sources_own_token_weighted_loss(data, demo_tok, tmp_path):
    # concat with packing: rows hold samples of all three sources (and formats) side by side.
    cache, units = mixture_units(
        data,
        demo_tok,
        tmp_path,
        dataset_path=[str(data / "tasks.jsonl"), str(data / "chat.jsonl"), str(data / "text.jsonl")],
        cutoff_len=128,
    )
    assert units.sources.names == ("tasks", "chat", "text")
    assert any(len({int(units.sources.of_sample[cache.offsets.searchsorted(p.start, "right") - 1]) for p in row}) > 1
               for row in units.rows)  # fmt: skip
    model = make_tiny_model(len(demo_tok), hidden_size=32, intermediate_size=64)
    rows = list(range(min(12, len(units))))
    batch = collate(units, rows, demo_tok.pad_token_id, packing=True)
    stage = LanguageModelingStage()
    with torch.no_grad():
        total, metrics = stage.loss(model, batch)
        expected = {name: [0.0, 0] for name in units.sources.names}
        for row in rows:
            for piece in units.rows[row]:
                sample = int(cache.offsets.searchsorted(piece.start, "right")) - 1
                loss_sum, count = sample_losses(model, *cache.sample(sample))
                name = units.sources.names[units.sources.of_sample[sample]]
                expected[name][0] += loss_sum
                expected[name][1] += count
    for name, (loss_sum, count) in expected.items():
        got_sum, got_count = metrics[f"loss/{name}"]
        assert int(got_count) == count > 0
        assert float(got_sum) / count == pytest.approx(loss_sum / count, rel=1e-5)
    assert stage.count(batch) == sum(c for _, c in expected.values())
    # Loss weights all 1: the optimised sum is chunked_cross_entropy's, bit for bit.
    plain = {k: v for k, v in batch.items() if not k.startswith("source")}
    with torch.no_grad():
        assert torch.equal(total, stage.loss(model, plain)[0])


def test_weighted_loss_equals_its_closed_form_on_a_fixed_batch(demo_tok):
    torch.manual_seed(0)
    model = make_tiny_model(len(demo_tok), hidden_size=32, intermediate_size=64)
    ids = torch.randint(0, len(demo_tok), (2, 12))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a prompt that is not trained
    sources = torch.tensor([[0] * 12, [1] * 5 + [2] * 7])
    segments = torch.tensor([[0] * 12, [0] * 5 + [1] * 7])
    weights = torch.tensor([0.1, 1.0, 2.5])
    batch = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.cat([torch.arange(12)[None], torch.cat([torch.arange(5), torch.arange(7)])[None]]),
        "segment_ids": segments,
        "source_ids": sources,
        "source_names": ("replay", "sft", "extra"),
        "source_loss_weights": weights,
    }
    stage = LanguageModelingStage()
    terms, metrics = stage.loss(model, batch)
    units = stage.count(batch)
    # Directly: every target token's loss, the source of the token it predicts, each source's mean.
    logits = model(ids, position_ids=batch["position_ids"], segment_ids=segments)
    targets = shift_targets(labels, segments)
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    trained = targets != IGNORE_INDEX
    target_source = torch.cat([sources[:, 1:], torch.full((2, 1), -1)], dim=1)
    of = [trained & (target_source == s) for s in range(3)]
    assert units == {name: int(of[s].sum()) for s, name in enumerate(batch["source_names"])}
    # The engine divides each term by its own units: L = sum_s w_s S_s / N_s.
    closed = sum(weights[s] * token_loss[of[s]].mean() for s in range(3))
    torch.testing.assert_close(sum(terms[n] / units[n] for n in units), closed, rtol=1e-5, atol=1e-6)
    for s, name in enumerate(batch["source_names"]):
        torch.testing.assert_close(metrics[f"loss/{name}"][0], token_loss[of[s]].sum())
        assert int(metrics[f"loss/{name}"][1]) == int(of[s].sum())
    # Every loss weight 1: one term, the plain token sum (the engine divides it by the step's N), bit for bit.
    plain_batch = {**batch, "source_loss_weights": torch.ones(3)}
    unweighted, _ = stage.loss(model, plain_batch)
    plain, n = chunked_cross_entropy(model(ids, position_ids=batch["position_ids"], segment_ids=segments,
                                           return_hidden_states=True), model.lm_head, targets)  # fmt: skip
    assert stage.count(plain_batch) == n == int(trained.sum()) and torch.equal(unweighted, plain)
    # Gradients follow the weights: a zero loss weight leaves a source's tokens out of the update.
    zero = stage.loss(model, {**batch, "source_loss_weights": torch.tensor([0.0, 1.0, 1.0])})[0]
    torch.testing.assert_close(zero["replay"], torch.zeros(()))
    torch.testing.assert_close(zero["sft"], token_loss[of[1]].sum())


def test_banner_lists_each_source_with_its_records_share_and_weights(data, demo_tok, tmp_path):
    paths = [str(data / "tasks.jsonl"), str(data / "text.jsonl")]
    data_args = DataArgs(dataset_path=paths, dataset_loss_weights=[1, 0.1], cutoff_len=128, packing=True,
                         cache_dir=str(tmp_path / "cache"))  # fmt: skip
    cache, units = dataset_units(data_args, recipe_for("sft").reading, 42, demo_tok, paths, progress=False)
    sources = data_args.sources()
    lines = source_report(units, sources, source_records(cache, sources))
    # Independently: the trained tokens of each file's samples, from the cache's masks.
    trained = [0, 0]
    for index in range(len(cache)):
        trained[int(cache.file_of_sample[index])] += int(cache.sample(index)[1].sum())
    share = trained[0] / sum(trained)
    assert lines[0].startswith("  source tasks: 60 records") and f"{share:.1%} of the trained tokens" in lines[0]
    assert "loss weight 0.1" in lines[1] and "source text: 12 records" in lines[1]


def test_text_in_an_sft_mixture_is_cut_into_cutoff_len_pieces(data, demo_tok, tmp_path):
    cache, units = mixture_units(
        data, demo_tok, tmp_path, dataset_path=[str(data / "text.jsonl")], dataset_loss_weights=[0.5], cutoff_len=32
    )
    documents = [json.loads(line)["text"] for line in (data / "text.jsonl").read_text().splitlines()]
    whole = sum(len(demo_tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents)
    assert int(cache.offsets[-1]) == whole and cache.lengths.max() == 32  # nothing cut away, no piece too long
    assert int(cache.mask.sum()) == whole  # every token trained


def test_per_source_curves_are_plotted(tmp_path):
    history = [
        {"step": 1, "loss": 2.0, "loss/a": 1.5, "loss/b": 3.0},
        {"step": 2, "loss": 1.8, "loss/a": 1.4},
        {"step": 2, "eval/loss": 1.9, "eval/loss/a": 1.6},
    ]
    written = plot_history(history, tmp_path)
    assert tmp_path / "loss_per_source.png" in written


def test_a_preference_losss_own_terms_are_no_sources(tmp_path):
    """DPO logs its loss's parts (loss/dpo, loss/sft with sft_weight) in every run: no per-source figure
    without a mixture; beside a mixture's SFT source the figure is drawn."""
    alone = [{"step": 1, "loss": 0.7, "loss/dpo": 0.69, "loss/sft": 2.0, "rewards/accuracies": 0.5}]
    assert tmp_path / "loss_per_source.png" not in plot_history(alone, tmp_path)
    assert (tmp_path / "rewards_accuracies.png").is_file()
    mixture = [{**alone[0], "loss/chat": 1.9}]
    assert tmp_path / "loss_per_source.png" in plot_history(mixture, tmp_path)


# ---------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture-model")
    init_tiny_model_dir(str(out))
    return out


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("mixture-sft-base"))


def train(output_dir, model, stage="pretrain", **keys):
    config = {
        "training_stage": stage,
        "model_name_or_path": str(model),
        "output_dir": str(output_dir),
        "cutoff_len": 64,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_model_precision": "fp32",
        "save_steps": 2,
        "warmup_ratio": 0.25,
        **keys,
    }
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(history):
    return [r["loss"] for r in history if "loss" in r]


@pytest.mark.slow
def test_one_source_mixture_and_a_concat_of_files_equal_the_plain_run_bitwise(tmp_path, data, base_model):
    text = data / "text.jsonl"
    plain = train(tmp_path / "plain", base_model, dataset_path=str(text))
    single = train(
        tmp_path / "single", base_model, dataset_path={"replay": {"path": str(text)}}, mix_strategy="interleave_over"
    )
    assert train_losses(single) == train_losses(plain)
    model = "model.safetensors"
    assert (tmp_path / "single" / model).read_bytes() == (tmp_path / "plain" / model).read_bytes()
    # The same documents as two sources of a concat mixture: the same run, now with a loss per source.
    lines = text.read_text().splitlines()
    (tmp_path / "first.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (tmp_path / "second.jsonl").write_text("\n".join(lines[5:]) + "\n")
    two = train(
        tmp_path / "two", base_model, dataset_path=[str(tmp_path / "first.jsonl"), str(tmp_path / "second.jsonl")]
    )
    assert train_losses(two) == train_losses(plain)
    assert (tmp_path / "two" / model).read_bytes() == (tmp_path / "plain" / model).read_bytes()
    assert all("loss/first" in r or "loss/second" in r for r in two if "loss" in r)


@pytest.mark.slow
def test_resume_mid_mixture_is_exact_and_eval_logs_each_source(tmp_path, data, sft_base):
    keys = dict(
        stage="sft",
        dataset_path={
            "tasks": {"path": str(data / "tasks.jsonl"), "weight": 3},
            "chat": {"path": str(data / "chat.jsonl")},
            "replay": {"path": str(data / "text.jsonl"), "loss_weight": 0.1},
        },
        eval_dataset_path=[str(data / "eval_tasks.jsonl"), str(data / "text.jsonl")],
        mix_strategy="interleave_under",
        cutoff_len=128,
        max_steps=6,
        save_steps=3,
        eval_steps=3,
        save_total_limit=5,
        use_tensorboard=True,
    )
    straight = train(tmp_path / "a", sft_base, **keys)
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = train(resumed_dir, sft_base, **keys, resume_from_checkpoint="latest")

    def after_step_3(history):  # every logged value but the wall-clock speed
        return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in history if r["step"] > 3]

    assert after_step_3(resumed) == after_step_3(straight)
    model = "model.safetensors"
    assert (tmp_path / "a" / model).read_bytes() == (resumed_dir / model).read_bytes()
    trained = [r for r in straight if "loss" in r]
    assert {k for r in trained for k in r if k.startswith("loss/")} == {"loss/tasks", "loss/chat", "loss/replay"}
    evaluated = [r for r in straight if "eval/loss" in r]
    assert all({"eval/loss/eval_tasks", "eval/loss/text"} <= set(r) for r in evaluated)
    assert (tmp_path / "a" / "loss_per_source.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "a" / "runs"))
    events.Reload()
    assert {"loss/tasks", "eval/loss/text", "train/loss"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_weighted_mixture_over_two_processes_equals_one_process_accumulating_two(tmp_path, data, sft_base):
    keys = tiny_run_keys(
        training_stage="sft",
        model_name_or_path=str(sft_base),
        dataset_path={
            "tasks": {"path": str(data / "tasks.jsonl"), "weight": 2},
            "replay": {"path": str(data / "text.jsonl"), "weight": 1, "loss_weight": 0.1},
        },
        mix_strategy="interleave_over",
    )
    records = one_process_and_two(keys, tmp_path)
    for one, two in zip(*records, strict=True):
        for key in ("loss", "loss/tasks", "loss/replay"):
            assert (key in one) == (key in two) and two.get(key, 0) == pytest.approx(one.get(key, 0), rel=1e-5)
