"""KTO: the loss and metrics against the closed form computed from transformers' log-probs (fp64), the
data formats and their errors, the KL rows, r = 0 on the first step, exact resume, DDP = accumulation."""

import json
import math
import shutil
from pathlib import Path
from statistics import mean

import pytest
import torch
import yaml
from test_dpo import run as dpo_run
from test_dpo import train_records, transformers_logps
from tiny import (
    assert_evaluations_printed,
    make_tiny_model,
    max_weight_difference,
    tiny_run_keys,
    train_on_two_processes,
)

import bumblecore
from bumblecore.args import DataArgs, TrainArgs
from bumblecore.chat.format import encode_preference
from bumblecore.cli import main
from bumblecore.data.dataset import dataset_units
from bumblecore.data.formats import read_samples
from bumblecore.data.loader import eval_batches
from bumblecore.data.sources import DataError
from bumblecore.model.bumblebee import Bumblebee
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import load_tokenizer
from bumblecore.train.dpo import ModelReference
from bumblecore.train.kto import KTOStage

DEMO = Path(bumblecore.__file__).parent / "demo_data"
TOKENIZER = DEMO / "tokenizer"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """unpaired.jsonl: Alpaca records of the demo's pairs, each with one reply and its label;
    pairs.jsonl: the demo's preference pairs (each one desirable and one undesirable example)."""
    root = tmp_path_factory.mktemp("kto_data")
    pairs = [json.loads(line) for line in (DEMO / "dpo_train.jsonl").read_text(encoding="utf-8").splitlines()[:32]]
    write_jsonl(root / "pairs.jsonl", pairs)
    unpaired = [
        {
            "instruction": p["instruction"],
            "input": p["input"],
            "output": p["chosen"] if i % 3 else p["rejected"],
            "label": bool(i % 3),
        }
        for i, p in enumerate(pairs)
    ]
    write_jsonl(root / "unpaired.jsonl", unpaired)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto_models")
    tokenizer = load_tokenizer(TOKENIZER)
    # wide init (0.2) for the formula tests, so that a slip shows; the usual 0.02 for training runs
    for name, seed, std in (("policy", 0, 0.2), ("reference", 1, 0.2), ("start", 2, 0.02)):
        make_tiny_model(768, seed, initializer_range=std, attention_bias=True).save_pretrained(root / name)
        tokenizer.save_pretrained(str(root / name))
    return root


def examples_batch(data_file, tmp_path, n):
    tokenizer = load_tokenizer(TOKENIZER)
    data = DataArgs(dataset_path=str(data_file), cutoff_len=256, cache_dir=str(tmp_path / "cache"), packing=False)
    _, units = dataset_units(data, recipe_for("kto").reading, 42, tokenizer, data.dataset_path, progress=False)
    return eval_batches(units, n, tokenizer.pad_token_id, packing=False)[0], units


# ---------------------------------------------------------------------------- the oracle


def closed_form(examples, models, beta, desirable_weight, undesirable_weight, policy_name, reference_name):
    """The micro-batch's summed loss and metrics from the definitions of the KTO issue, in Python floats."""
    tokenizer = load_tokenizer(TOKENIZER)

    def logp(name, sample, reply):
        c = sample.conversation
        return sum(transformers_logps(models / name, *encode_preference(tokenizer, c.messages, reply, c.tools)))

    r = [logp(policy_name, s, s.completion) - logp(reference_name, s, s.completion) for s in examples]
    kl = [logp(policy_name, s, s.kl_completion) - logp(reference_name, s, s.kl_completion) for s in examples]
    z = max(0.0, sum(kl) / len(kl))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses = [
        desirable_weight * (1 - sigmoid(beta * (ri - z)))
        if s.desirable
        else undesirable_weight * (1 - sigmoid(beta * (z - ri)))
        for s, ri in zip(examples, r)
    ]
    policy = [logp(policy_name, s, s.completion) for s in examples]
    return {
        "loss": sum(losses),
        "kl": z * len(examples),
        "share/desirable": float(sum(s.desirable for s in examples)),
        "rewards/chosen": mean(beta * ri for s, ri in zip(examples, r) if s.desirable),
        "rewards/rejected": mean(beta * ri for s, ri in zip(examples, r) if not s.desirable),
        "logps/chosen": mean(p for s, p in zip(examples, policy) if s.desirable),
        "logps/rejected": mean(p for s, p in zip(examples, policy) if not s.desirable),
    }


@pytest.mark.parametrize("dataset", ["unpaired", "pairs"])
def test_loss_and_metrics_equal_the_closed_form(dataset, data, models, tmp_path):
    beta, wd, wu, n = 0.5, 1.0, 1.33, 6
    file = data / f"{dataset}.jsonl"
    batch, _ = examples_batch(file, tmp_path, n)
    examples = list(read_samples(str(file), recipe_for("kto").reading))[:n]
    assert {s.desirable for s in examples} == {True, False}
    # The roles that give z > 0 (the mean over the KL rows flips sign with them): z is not clamped away.
    names = ("policy", "reference")
    expected = closed_form(examples, models, beta, wd, wu, *names)
    if expected["kl"] == 0:
        names = names[::-1]
        expected = closed_form(examples, models, beta, wd, wu, *names)
    assert expected["kl"] > 0

    stage = KTOStage(beta, wd, wu, ModelReference(Bumblebee.from_pretrained(models / names[1])))
    total, metrics = stage.loss(Bumblebee.from_pretrained(models / names[0]), batch)
    assert stage.count(batch) == n
    assert float(total.detach()) == pytest.approx(expected["loss"], rel=1e-4)
    for key in ("kl", "share/desirable"):
        assert float(metrics[key]) == pytest.approx(expected[key], rel=1e-4), key
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):  # means of their own
        total, count = metrics[key]
        assert float(total) / float(count) == pytest.approx(expected[key], rel=1e-4), key


def test_the_kl_rows_gradient_is_zero(data, models, tmp_path):
    """z is detached: the loss's gradient equals the one computed with z given as a constant."""
    batch, _ = examples_batch(data / "unpaired.jsonl", tmp_path, 4)
    reference = ModelReference(Bumblebee.from_pretrained(models / "reference"))
    policy = Bumblebee.from_pretrained(models / "policy")
    total, _ = KTOStage(0.5, reference=reference).loss(policy, batch)
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in policy.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


# ---------------------------------------------------------------------------- data


def test_every_format_reads_as_labelled_examples_with_kl_rows(tmp_path):
    user = {"role": "user", "content": "Name a colour."}
    records = [
        ("alpaca.jsonl", {"instruction": "Name a colour.", "output": "red", "label": True}),
        ("completion.jsonl", {"instruction": "Name a colour.", "completion": "red", "label": False}),
        (
            "sharegpt.jsonl",
            {
                "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}],
                "label": True,
            },
        ),
        ("messages.jsonl", {"messages": [user, {"role": "assistant", "content": "red"}], "label": False}),
        ("trl_strings.jsonl", {"prompt": "Name a colour.", "completion": "red", "label": True}),
        (
            "trl_messages.jsonl",
            {"prompt": [user], "completion": [{"role": "assistant", "content": "red"}], "label": True},
        ),
    ]
    for name, record in records:
        other = {**record, "label": not record["label"]}
        samples = list(read_samples(str(write_jsonl(tmp_path / name, [record, other])), recipe_for("kto").reading))
        assert [s.kind for s in samples] == ["labelled", "labelled"], name
        assert samples[0].conversation.messages[-1] == user, name
        assert samples[0].completion == {"role": "assistant", "content": "red"}, name
        assert [s.desirable for s in samples] == [record["label"], not record["label"]], name


def test_pairs_split_and_kl_rows_take_the_next_records_completion(tmp_path):
    records = [{"instruction": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(3)]
    samples = list(read_samples(str(write_jsonl(tmp_path / "p.jsonl", records)), recipe_for("kto").reading))
    assert [(s.completion["content"], s.desirable) for s in samples] == [
        ("good0", True),
        ("bad0", False),
        ("good1", True),
        ("bad1", False),
        ("good2", True),
        ("bad2", False),
    ]
    # the next record's first completion; the last record's is the first record's
    assert [s.kl_completion["content"] for s in samples] == ["good1", "good1", "good2", "good2", "good0", "good0"]
    assert [s.conversation.messages[-1]["content"] for s in samples[::2]] == ["q0", "q1", "q2"]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "q", "output": "a"}, r'line 1: missing field "label"'),
        ({"instruction": "q", "output": "a", "label": "yes"}, r'line 1: field "label" must be true or false, got str'),
        ({"instruction": "q", "output": "a", "label": 1}, r'field "label" must be true or false, got int'),
        ({"instruction": "q", "label": True}, r'line 1: missing field "output" \(or "completion"\)'),
        ({"prompt": "q", "completion": "", "label": True}, r'line 1: field "completion" is empty'),
        (
            {"messages": [{"role": "user", "content": "q"}], "label": True},
            r'line 1: field "messages" must end on an assistant message',
        ),
        (
            {"prompt": "q", "completion": [{"role": "user", "content": "a"}], "label": True},
            r'field "completion" message 1 has role "user"; expected assistant',
        ),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    file = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=message) as caught:
        list(read_samples(str(file), recipe_for("kto").reading))
    assert str(file) in str(caught.value)


def test_the_cache_keeps_labels_and_kl_rows(data, tmp_path):
    batch, units = examples_batch(data / "unpaired.jsonl", tmp_path, 8)
    assert len(units) == 32 and units.desirable.tolist() == [bool(i % 3) for i in range(32)]
    assert batch["desirable"].tolist() == [bool(i % 3) for i in range(8)]
    assert batch["input_ids"].shape[0] == 16  # 8 examples, then their 8 KL rows


def test_inspect_data_shows_each_example_and_its_kl_row(tmp_path, capsys):
    records = [{"instruction": f"q{i}", "output": f"a{i}", "label": i == 0} for i in range(2)]
    file = write_jsonl(tmp_path / "k.jsonl", records)
    main(
        ["inspect_data", "--training_stage", "kto", "--model_name_or_path", str(TOKENIZER), "--dataset_path", str(file)]
    )
    out = capsys.readouterr().out
    assert "line 1 (desirable)" in out and "line 2 (undesirable)" in out and out.count("(KL row)") == 2
    assert "[[a1<|im_end|>]]" in out.split("line 1 (KL row)")[1].split("=====")[1]  # the next record's completion


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"pref_loss": "ipo"}, "pref_loss ipo is a DPO-family loss"),
        ({"sft_weight": 0.1}, "sft_weight 0.1 is for training_stage dpo"),
        ({"kto_undesirable_weight": 0.0}, "kto_undesirable_weight must be > 0"),
    ],
)
def test_keys_of_other_losses_are_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        TrainArgs.from_flat(training_stage="kto", **keys)


def test_packing_defaults_off():
    assert TrainArgs.from_flat(training_stage="kto").data.packing is False


# ---------------------------------------------------------------------------- end to end


def run(output_dir, model, data, **keys):
    """A KTO run through the command line, on the unpaired records unless told otherwise (test_dpo's run)."""
    return dpo_run(
        output_dir, model, data, **{"training_stage": "kto", "dataset_path": str(data / "unpaired.jsonl"), **keys}
    )


@pytest.mark.parametrize("finetuning_type,precompute", [("full", None), ("full", False), ("lora", None)])
def test_first_step_with_policy_equal_reference_has_r_zero(tmp_path, models, data, finetuning_type, precompute):
    keys = {"max_steps": 1, "save_steps": 100, "finetuning_type": finetuning_type}
    keys |= {"kto_desirable_weight": 2.0, "kto_undesirable_weight": 0.5}
    if precompute is not None:
        keys["precompute_ref_log_probs"] = precompute
    first = train_records(run(tmp_path / "out", models / "policy", data, **keys))[0]
    for key in ("rewards/chosen", "rewards/rejected", "kl"):
        assert first[key] == pytest.approx(0.0, abs=1e-6), key
    share = first["share/desirable"]
    assert 0 < share < 1
    # r = z = 0: every example's loss is half its weight
    assert first["loss"] == pytest.approx(0.5 * (2.0 * share + 0.5 * (1 - share)), abs=1e-6)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_kto_resume_is_exact(tmp_path, models, data, finetuning_type):
    keys = dict(finetuning_type=finetuning_type, max_steps=6, save_steps=3, save_total_limit=5)
    straight = run(tmp_path / "a", models / "start", data, **keys)
    resumed_dir = tmp_path / "c"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", resumed_dir / "checkpoint-3")
    history = run(resumed_dir, models / "start", data, **keys, resume_from_checkpoint="latest")
    assert [r["step"] for r in history] == [4, 5, 6]
    for key in ("loss", "kl", "rewards/chosen", "logps/rejected"):
        assert [r[key] for r in history] == [r[key] for r in train_records(straight)[3:]], key
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (resumed_dir / weights).read_bytes()


def test_kto_learns_on_pairs_and_evaluates(tmp_path, models, data, capsys):
    capsys.readouterr()
    history = run(
        tmp_path / "kto",
        models / "start",
        data,
        dataset_path=str(data / "pairs.jsonl"),
        eval_dataset_path=str(data / "pairs.jsonl"),
        max_steps=24,
        save_steps=24,
        eval_steps=24,
        learning_rate=3e-3,
        train_micro_batch_size_per_gpu=8,
        gradient_accumulation_steps=1,
    )
    evaluations = [r for r in history if "eval/loss" in r]
    assert [r["step"] for r in evaluations] == [0, 24] and evaluations[-1]["eval/loss"] < evaluations[0]["eval/loss"]
    printed = capsys.readouterr()
    assert_evaluations_printed(printed.out + printed.err, history, headline=("rewards/chosen", "rewards/rejected"))
    last = evaluations[-1]
    assert last["eval/rewards/chosen"] > last["eval/rewards/rejected"]  # each the mean over its own examples
    assert last["eval/share/desirable"] == 0.5 and "eval/kl" in last and "eval/perplexity" not in last


@pytest.mark.slow
def test_kto_ddp_equals_one_process_accumulating(tmp_path, models, data):
    """2 gloo processes, one micro-batch each, end with the weights of 1 process accumulating 2: z is per
    micro-batch and the loss is normalised by the examples of the whole step."""
    config = tiny_run_keys(
        training_stage="kto",
        model_name_or_path=str(models / "start"),
        dataset_path=str(data / "unpaired.jsonl"),
        accelerator="cpu",
        pref_beta=0.5,
        kto_undesirable_weight=1.5,
    )
    file = tmp_path / "kto.yaml"
    file.write_text(yaml.safe_dump(config))
    one = ["--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"]
    main(["train", "--config", str(file), *one, "--cache_dir", str(tmp_path / "cache_one")])
    train_on_two_processes(file, tmp_path / "two", "--cache_dir", str(tmp_path / "cache_two"), cwd=tmp_path)
    worst = max_weight_difference(tmp_path / "one", tmp_path / "two")
    assert worst < 1e-5, f"max weight difference {worst}"
    losses = [
        [r["loss"] for r in train_records(json.loads(x) for x in (tmp_path / d / "metrics.jsonl").open())]
        for d in ("one", "two")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
