"""The reward-model stage (training_stage rm): the loss and metrics against the closed form computed from
transformers' AutoModelForSequenceClassification scores of the same weights on the conversations as
transformers' apply_chat_template renders them; the margin field; exact resume; 2 DDP processes =
1 process accumulating 2; ZeRO-3 on 2 CPU ranks = 1 process; the saved model scores in transformers
as ours; a run through the CLI on the demo pairs learns."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_dpo import train_records
from tiny import make_tiny_model, max_weight_difference, one_process_and_two

import bumblecore
from bumblecore.args import DataArgs
from bumblecore.cli import main
from bumblecore.data.dataset import dataset_units
from bumblecore.data.formats import read_samples
from bumblecore.data.loader import eval_batches
from bumblecore.data.sources import DataError
from bumblecore.model.reward import load_reward_model
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import load_tokenizer
from bumblecore.train.reward import RewardStage

REPO = Path(__file__).resolve().parents[2]
DEMO = Path(bumblecore.__file__).parent / "demo_data"
TOKENIZER = DEMO / "tokenizer"
MARGINS = [0.0, 0.5, -1.25, 2.0]  # given to the records in turn (the first: no field at all)


def with_margin(record: dict, i: int) -> dict:
    return {**record, "margin": MARGINS[i % 4]} if i % 4 else record


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_data")
    lines = [json.loads(line) for line in (DEMO / "dpo_train.jsonl").read_text(encoding="utf-8").splitlines()]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:64]), encoding="utf-8")
    (root / "margins.jsonl").write_text(
        "".join(json.dumps(with_margin(r, i)) + "\n" for i, r in enumerate(lines[:8])), encoding="utf-8"
    )
    evals = (DEMO / "dpo_eval.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    (root / "eval.jsonl").write_text("\n".join(evals) + "\n", encoding="utf-8")
    # TRL's records: a prompt of messages (a system turn and history) with chosen / rejected messages
    trl = [
        {
            "prompt": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": f"And an animal number {i}?"},
            ],
            "chosen": [{"role": "assistant", "content": "bee" * (1 + i % 3)}],
            "rejected": [{"role": "assistant", "content": f"stone {i} and more words"}],
        }
        for i in range(6)
    ]
    (root / "trl.jsonl").write_text("".join(json.dumps(with_margin(r, i)) + "\n" for i, r in enumerate(trl)))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """lm: a tiny Qwen2 causal LM (init std 0.2, so a slip shows); rm: the reward model built from it and
    saved in the HF layout; start: a causal LM with the usual 0.02 init, for training runs."""
    root = tmp_path_factory.mktemp("rm_models")
    tokenizer = load_tokenizer(TOKENIZER)
    for name, seed, std in (("lm", 0, 0.2), ("start", 2, 0.02)):
        make_tiny_model(768, seed, initializer_range=std, attention_bias=True).save_pretrained(root / name)
        tokenizer.save_pretrained(str(root / name))
    torch.manual_seed(5)
    load_reward_model(root / "lm", pad_token_id=tokenizer.pad_token_id).save_pretrained(root / "rm")
    tokenizer.save_pretrained(str(root / "rm"))
    return root


def pairs_batch(file, tmp_path):
    tokenizer = load_tokenizer(TOKENIZER)
    data = DataArgs(dataset_path=str(file), cutoff_len=256, cache_dir=str(tmp_path / "cache"), packing=False)
    _, units = dataset_units(data, recipe_for("rm").reading, 42, tokenizer, data.dataset_path, progress=False)
    return eval_batches(units, len(units), tokenizer.pad_token_id, packing=False)[0], tokenizer


# ---------------------------------------------------------------------------- the oracle


def transformers_scores(model_dir, file):
    """Each pair's (r_chosen, r_rejected, margin): transformers' scores (fp32, as ours) of the whole conversations, rendered
    by the tokenizer's apply_chat_template, one unpadded row at a time, and the rendered ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs, rows = [], []
    for record, sample in zip(
        [json.loads(line) for line in Path(file).read_text().splitlines()],
        read_samples(str(file), recipe_for("rm").reading),
    ):
        scores = []
        for reply in (sample.chosen, sample.rejected):
            text = tokenizer.apply_chat_template(sample.conversation.messages + [reply], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            rows.append(ids)
            with torch.no_grad():
                scores.append(float(hf(torch.tensor([ids])).logits[0, 0]))
        pairs.append((*scores, float(record.get("margin", 0.0))))
    return pairs, rows


def closed_form(pairs, use_margin: bool, center: float) -> dict:
    """TRL RewardTrainer's loss (the mean over pairs) and the metrics' means and stds, in Python floats."""
    n = len(pairs)
    losses = [
        -math.log(1 / (1 + math.exp(-(c - r - (m if use_margin else 0.0))))) + center * (c + r) ** 2
        for c, r, m in pairs
    ]

    def std(values):
        mean = sum(values) / n
        return math.sqrt(sum((v - mean) ** 2 for v in values) / n)

    chosen, rejected = [c for c, _, _ in pairs], [r for _, r, _ in pairs]
    return {
        "loss": sum(losses) / n,
        "rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected)) / n,
        "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / n,
        "rewards/chosen": sum(chosen) / n,
        "rewards/rejected": sum(rejected) / n,
        "rewards/chosen_std": std(chosen),
        "rewards/rejected_std": std(rejected),
    }


@pytest.mark.parametrize("center", [0.0, 0.3])
@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("dataset", ["margins.jsonl", "trl.jsonl"])
def test_loss_and_metrics_equal_the_closed_form_from_transformers(dataset, use_margin, center, data, models, tmp_path):
    file = data / dataset
    batch, _ = pairs_batch(file, tmp_path)
    pairs, rendered = transformers_scores(models / "rm", file)
    n = len(pairs)
    # each row is the whole conversation as apply_chat_template renders it (its trailing newline too)
    ids = batch["input_ids"]
    lengths = [len(rendered[2 * i]) for i in range(n)] + [len(rendered[2 * i + 1]) for i in range(n)]
    order = rendered[0::2] + rendered[1::2]
    assert [ids[row, :length].tolist() for row, length in enumerate(lengths)] == order
    assert batch["margin"].tolist() == [m for _, _, m in pairs] and any(m != 0 for _, _, m in pairs)
    if not use_margin:
        del batch["margin"]

    model = load_reward_model(models / "rm")
    stage = RewardStage(model.pad_token_id, center)
    total, metrics = stage.loss(model, batch)
    assert stage.count(batch) == n
    record = stage.finish_record({"loss": float(total.detach()) / n, **{k: float(v) / n for k, v in metrics.items()}})
    expected = closed_form(pairs, use_margin, center)
    assert set(record) == set(expected)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert min(abs(c - r) for c, r, _ in pairs) > 1e-3  # the formulas are exercised away from ties


def test_a_margin_that_is_not_a_number_names_file_line_and_field(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (data / "train.jsonl").read_text().splitlines()[:3]
    lines[2] = json.dumps({**json.loads(lines[2]), "margin": "high"})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r'bad\.jsonl line 3: field "margin" must be a number'):
        list(read_samples(str(bad), recipe_for("rm").reading))


# ---------------------------------------------------------------------------- runs


def run(output_dir, model, data, **keys):
    config = {
        "training_stage": "rm",
        "model_name_or_path": str(model),
        "dataset_path": str(data / "train.jsonl"),
        "output_dir": str(output_dir),
        "cutoff_len": 128,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_model_precision": "fp32",
        "save_steps": 2,
        "warmup_ratio": 0.0,
        "cache_dir": str(Path(output_dir).parent / "cache"),
        **keys,
    }
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_rm_on_demo_pairs_learns_and_saves_what_transformers_scores(tmp_path, models, data, capsys):
    out = tmp_path / "rm"
    capsys.readouterr()
    history = run(
        out,
        models / "start",
        data,
        max_steps=16,
        save_steps=8,
        eval_steps=8,
        learning_rate=3e-3,
        train_micro_batch_size_per_gpu=8,
        gradient_accumulation_steps=1,
        center_rewards_coefficient=0.01,
        eval_dataset_path=str(data / "eval.jsonl"),
    )
    records = train_records(history)
    for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "rewards/chosen_std"):
        assert key in records[-1], key
    first, last = sum(r["loss"] for r in records[:4]) / 4, sum(r["loss"] for r in records[-4:]) / 4
    assert last < first, (first, last)
    evaluations = [r for r in history if "eval/loss" in r]
    assert [r["step"] for r in evaluations] == [0, 8, 16] and "eval/rewards/rejected_std" in evaluations[-1]
    printed = capsys.readouterr()
    assert "eval step 16/16: loss" in printed.out + printed.err and "rewards/accuracies" in printed.out + printed.err

    # the final model and the checkpoints are transformers reward models with our scores
    from transformers import AutoModelForSequenceClassification

    batch, tokenizer = pairs_batch(data / "eval.jsonl", tmp_path)
    for directory in (out, out / "checkpoint-8"):
        config = json.loads((directory / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForSequenceClassification"]
        assert config["pad_token_id"] == tokenizer.pad_token_id
        theirs = AutoModelForSequenceClassification.from_pretrained(directory).eval()
        ours = load_reward_model(directory)
        mask = (batch["input_ids"] != tokenizer.pad_token_id).long()
        with torch.no_grad():
            expected = theirs(input_ids=batch["input_ids"], attention_mask=mask).logits[:, 0]
            torch.testing.assert_close(ours.rewards(batch["input_ids"]), expected, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer_config.json").is_file()
    for command in (["generate", "--prompt", "hi"], ["serve"]):  # chat loads as generate does
        capsys.readouterr()
        with pytest.raises(SystemExit):  # one clear line, not a crash
            main([*command, "--model_path", str(out)])
        assert "a reward model" in capsys.readouterr().err


def test_rm_resume_is_exact(tmp_path, models, data):
    keys = dict(max_steps=6, save_steps=3, save_total_limit=5, dataset_path=str(data / "margins.jsonl"))
    straight = run(tmp_path / "a", models / "start", data, **keys)
    resumed_dir = tmp_path / "c"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", resumed_dir / "checkpoint-3")
    history = run(resumed_dir, models / "start", data, **keys, resume_from_checkpoint="latest")
    assert [r["step"] for r in history] == [4, 5, 6]
    for key in ("loss", "rewards/margins", "rewards/chosen_std"):
        assert [r[key] for r in history] == [r[key] for r in train_records(straight)[3:]], key
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (resumed_dir / "model.safetensors").read_bytes()


def test_a_family_bumblebee_does_not_implement_trains_through_transformers(tmp_path, data):
    import transformers
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=768, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
    )  # fmt: skip
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path / "phi3")
    tokenizer = load_tokenizer(TOKENIZER)
    tokenizer.save_pretrained(str(tmp_path / "phi3"))
    history = run(tmp_path / "out", tmp_path / "phi3", data, max_steps=2, gradient_accumulation_steps=1)
    assert all(math.isfinite(r["loss"]) for r in history)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        "Phi3ForSequenceClassification"
    ]
    batch, _ = pairs_batch(data / "eval.jsonl", tmp_path)
    with torch.no_grad():
        theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()(batch["input_ids"])
        ours = load_reward_model(tmp_path / "out").rewards(batch["input_ids"])
    torch.testing.assert_close(ours, theirs.logits[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_ddp_processes_equal_one_accumulating_two(tmp_path, models, data):
    config = {
        "training_stage": "rm",
        "model_name_or_path": str(models / "start"),
        "dataset_path": str(data / "margins.jsonl"),
        "cutoff_len": 128,
        "max_steps": 3,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "train_model_precision": "fp32",
        "save_steps": 100,
        "center_rewards_coefficient": 0.1,
        "cache_dir": str(tmp_path / "cache"),
    }
    one, two = one_process_and_two(config, tmp_path)
    for a, b in zip(one, two):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen_std", "rewards/rejected_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_zero3_on_two_cpu_ranks_equals_one_process(tmp_path, models, data):
    config = tmp_path / "z3.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "training_stage": "rm",
                "model_name_or_path": str(models / "start"),
                "dataset_path": str(data / "margins.jsonl"),
                "cutoff_len": 128,
                "max_steps": 2,
                "learning_rate": 5e-3,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1,
                "train_model_precision": "fp32",
                "accelerator": "cpu",
                "save_steps": 100,
                "cache_dir": str(tmp_path / "cache"),
            }
        )
    )
    main(
        ["train", "--config", str(config), "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"]
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    zero3 = str(REPO / "configs" / "deepspeed" / "ds_z3_config.json")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port,
         str(REPO / "bumblecore" / "__main__.py"), "train", "--config", str(config),
         "--output_dir", str(tmp_path / "zero3"), "--deepspeed_config_path", zero3],
        capture_output=True, text=True, timeout=400, cwd=tmp_path, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ZeRO-3" in result.stdout + result.stderr
    assert max_weight_difference(tmp_path / "one", tmp_path / "zero3") < 1e-4
    config_json = json.loads((tmp_path / "zero3" / "config.json").read_text())
    assert config_json["architectures"] == ["Qwen2ForSequenceClassification"] and config_json["pad_token_id"] == 0


def test_memory_plan_counts_no_lm_head_and_no_logits(tmp_path):
    """The plan of an rm run: dpo's (the same rows) less the LM head's weights, gradients and optimizer
    states, and less the chunked cross-entropy's logits (a reward model has one score per token)."""
    from types import SimpleNamespace

    from bumblecore.args import TrainArgs
    from bumblecore.train.memory import Workload
    from bumblecore.train.setup import memory_plan

    make_tiny_model(768, 0, tie_word_embeddings=False).save_pretrained(tmp_path / "untied")
    fabric = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    plans = {}
    for stage in ("dpo", "rm"):
        run = TrainArgs.from_flat(
            training_stage=stage, model_name_or_path=str(tmp_path / "untied"), cutoff_len=64, pref_loss="simpo"
        )
        plans[stage] = memory_plan(fabric, run, None, recipe_for(stage), 1, runtime=0)
    head = 768 * 64 - 64  # the untied LM head's weights, less the score head's (1 x hidden)
    dpo, rm = plans["dpo"], plans["rm"]
    assert (dpo.parameters - rm.parameters, dpo.gradients - rm.gradients) == (4 * head, 4 * head)
    assert dpo.optimizer - rm.optimizer == 8 * head
    raw = json.loads((tmp_path / "untied" / "config.json").read_text())
    logits = Workload.from_config(raw, micro_batch_size=2, sequence_length=64).loss_chunks()
    assert logits > 0 and sum(dpo.transient.values()) - sum(rm.transient.values()) >= logits


def test_packing_is_said_to_be_ignored_for_reward_models():
    """Each side's score is read at its own row's last token: a run asking for packing is told it is off."""
    from types import SimpleNamespace

    from bumblecore.args import PreferenceArgs
    from bumblecore.recipes import recipe_for

    rm = recipe_for("rm")
    packed = SimpleNamespace(preference=PreferenceArgs(), data=SimpleNamespace(packing=True))
    assert any("packing true is ignored" in note for note in rm.notes(packed))
    assert rm.notes(SimpleNamespace(preference=PreferenceArgs(), data=SimpleNamespace(packing=False))) == []
