"""`bumblecore train` end to end on a tiny model: every stage, full and LoRA, outputs, exact resume,
a save killed midway, the original's keys, and a transformers model through the fallback path."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import assert_evaluations_printed, init_tiny_model_dir

import bumblecore
from bumblecore.args import TrainArgs, flat_defaults
from bumblecore.cli import main

DEMO = Path(bumblecore.__file__).parent / "demo_data"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, count in (
        ("pretrain.jsonl", 48),
        ("sft_train.jsonl", 96),
        ("sft_eval.jsonl", 16),
        ("sft_toolcall.jsonl", 8),
    ):
        lines = open(DEMO / name, encoding="utf-8").read().splitlines()[:count]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    init_tiny_model_dir(str(out))
    return out


def run(output_dir, model, dataset, stage="sft", **keys):
    config = {
        "training_stage": stage,
        "model_name_or_path": str(model),
        "dataset_path": str(dataset),
        "output_dir": str(output_dir),
        "cutoff_len": 128,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_model_precision": "fp32",
        "save_steps": 2,
        "warmup_ratio": 0.25,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        **keys,
    }
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, base_model, data):
    out = tmp_path_factory.mktemp("runs") / "pretrain"
    history = run(
        out,
        base_model,
        data / "pretrain.jsonl",
        stage="pretrain",
        eval_dataset_path=str(data / "pretrain.jsonl"),
        use_tensorboard=True,
        save_train_log=True,
    )
    return out, history


# Golden values: a change that moves these numbers changes training. Update only on purpose
# (last: the demo data and tokenizer were regenerated with counting tasks).
GOLDEN_PRETRAIN = [6.65309837, 6.66114643, 6.47684563, 6.31978906]
GOLDEN_SFT = [6.73473231, 6.74524562, 6.60801951, 6.17995135]


def test_pretrain_writes_everything_design_lists(pretrained):
    out, history = pretrained
    assert losses(history) == pytest.approx(GOLDEN_PRETRAIN, abs=1e-4)
    record = next(r for r in history if "loss" in r)
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_sec"} <= set(record)
    evaluations = [r for r in history if "eval/loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4] and all("eval/perplexity" in r for r in evaluations)
    assert evaluations[-1]["eval/loss"] < evaluations[0]["eval/loss"]
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "training_args.yaml",
        "training_loss.png",
        "logs/train.log",
    ):
        assert (out / name).exists(), name
    log = (out / "logs" / "train.log").read_text(encoding="utf-8")
    config_in_log = log[
        log.index("resolved configuration:\n") + len("resolved configuration:\n") : log.index(
            "\n", log.index("lora_rank:")
        )
    ]
    assert yaml.safe_load(config_in_log)["max_steps"] == 4 and log.index("resolved configuration") < log.index(
        '"step": 1,'
    )
    assert list((out / "runs").iterdir())  # TensorBoard events
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "model.safetensors").exists() and (out / "checkpoint-4" / "training_state").exists()
    resolved = yaml.safe_load((out / "training_args.yaml").read_text())
    assert (
        resolved["training_stage"] == "pretrain"
        and resolved["max_steps"] == 4
        and set(resolved) == set(flat_defaults())
    )
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    ours = bumblecore.Bumblebee.from_pretrained(out / "checkpoint-4")
    ids = torch.randint(0, 700, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4


def test_a_run_with_eval_data_ends_with_an_evaluation_and_prints_each_one(tmp_path, pretrained, data, capsys):
    """eval_steps 3 of 4 steps: evaluations at 0, 3 and at the end, equal to the scheduled evaluation at
    step 4 of the same run with eval_steps 2, which evaluates that step once; eval_at_end false: no end.
    Each evaluation is one line in the terminal, beside the progress bar."""
    base, keys = pretrained[0], dict(eval_dataset_path=str(data / "sft_eval.jsonl"), save_steps=100)
    capsys.readouterr()
    ends = run(tmp_path / "end", base, data / "sft_train.jsonl", eval_steps=3, **keys)
    printed = capsys.readouterr()
    scheduled = run(tmp_path / "scheduled", base, data / "sft_train.jsonl", eval_steps=2, **keys)
    without = run(tmp_path / "without", base, data / "sft_train.jsonl", eval_steps=3, eval_at_end=False, **keys)

    def evaluations(history):
        return [r for r in history if "eval/loss" in r]

    assert [r["step"] for r in evaluations(ends)] == [0, 3, 4]
    assert [r["step"] for r in evaluations(scheduled)] == [0, 2, 4]
    assert [r["step"] for r in evaluations(without)] == [0, 3]
    assert evaluations(ends)[-1] == evaluations(scheduled)[-1]
    assert losses(ends) == losses(scheduled) == losses(without)  # evaluating changes no training step
    assert_evaluations_printed(printed.out + printed.err, ends, headline=("perplexity",))


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_sft_and_continue_pretrain_full_and_lora(tmp_path, pretrained, data, finetuning_type):
    base = pretrained[0]
    sft = run(
        tmp_path / "sft",
        base,
        data / "sft_train.jsonl",
        finetuning_type=finetuning_type,
        eval_dataset_path=str(data / "sft_eval.jsonl"),
    )
    assert len(losses(sft)) == 4 and all(0 < l < 10 for l in losses(sft))
    cpt = run(
        tmp_path / "cpt", base, data / "pretrain.jsonl", stage="continue_pretrain", finetuning_type=finetuning_type
    )
    assert losses(cpt)[0] < GOLDEN_PRETRAIN[0] - 0.05  # starts from the pretrained weights, not from scratch
    if finetuning_type == "lora":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        adapter = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(base.resolve()) and adapter["r"] == 4
        assert not (tmp_path / "sft" / "model.safetensors").exists()
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "sft")
        assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    else:
        assert (tmp_path / "sft" / "model.safetensors").exists()


def test_sft_golden_losses_and_gradient_checkpointing(tmp_path, pretrained, data):
    base = pretrained[0]
    plain = losses(run(tmp_path / "plain", base, data / "sft_train.jsonl"))
    recomputed = losses(run(tmp_path / "gc", base, data / "sft_train.jsonl", enable_gradient_checkpointing=True))
    assert plain == pytest.approx(GOLDEN_SFT, abs=1e-4)
    assert recomputed == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_resume_gives_the_same_losses_and_bitwise_weights(tmp_path, pretrained, data, finetuning_type):
    base = pretrained[0]
    keys = dict(finetuning_type=finetuning_type, max_steps=6, save_steps=3, save_total_limit=5)
    straight = run(tmp_path / "a", base, data / "sft_train.jsonl", **keys)
    # A fresh output dir holding only the step-3 checkpoint of that run: resume must continue it exactly.
    resumed_dir = tmp_path / "c"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", resumed_dir / "checkpoint-3")
    history = run(resumed_dir, base, data / "sft_train.jsonl", **keys, resume_from_checkpoint="latest")
    assert [r["step"] for r in history] == [4, 5, 6]
    assert losses(history) == losses(straight)[3:]
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (resumed_dir / weights).read_bytes()


def cli_error(capsys, *args) -> str:
    """`bumblecore ARGS` run by the CLI's main in this process: it exits 1 with one line, no traceback."""
    with pytest.raises(SystemExit) as exit:
        main([*map(str, args)])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and "Traceback" not in err, err
    return err


def test_unknown_key_and_wrong_type_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training_stage: sft\nlearnig_rate: 1e-4\n")
    assert "unknown key 'learnig_rate' (did you mean 'learning_rate'?)" in cli_error(capsys, "train", "--config", bad)
    bad.write_text("training_stage: sft\nnum_epochs: lots\n")
    assert "'num_epochs' expects float" in cli_error(capsys, "train", "--config", bad)
    assert "--lr" in cli_error(capsys, "train", "--lr", "3")


def test_every_original_key_is_accepted(tmp_path, capsys):
    original = {
        "yaml_config": "x.yaml",
        "training_stage": "sft",
        "finetuning_type": "lora",
        "output_dir": "./output",
        "model_name_or_path": "m",
        "trust_remote_code": False,
        "tokenizer_use_fast": False,
        "dataset_path": "d.json",
        "cutoff_len": 1024,
        "num_epochs": 3.0,
        "learning_rate": 5e-5,
        "weight_decay": 0.01,
        "warmup_ratio": 0.1,
        "lr_scheduler_type": "cosine",
        "enable_gradient_checkpointing": False,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 8,
        "train_model_precision": "bf16",
        "deepspeed_config_path": None,
        "num_local_io_workers": None,
        "average_tokens_across_devices": False,
        "local_rank": -1,
        "save_steps": 500,
        "save_total_limit": 3,
        "save_last": False,
        "logging_steps": 1,
        "save_train_log": False,
        "use_tensorboard": False,
        "lora_rank": 64,
        "lora_alpha": 128,
        "lora_dropout": 0.1,
        "lora_target_modules": ["q_proj", "v_proj"],
        "pref_beta": 0.1,
        "label_smoothing": 0.1,
        "dpo_label_smoothing": 0.0,
        "sft_weight": 0.0,
        "ld_alpha": 1.0,
    }
    file = tmp_path / "original.yaml"
    file.write_text(yaml.safe_dump({k: v for k, v in original.items() if k != "dpo_label_smoothing"}))
    main(["train", "--config", str(file), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["dpo_label_smoothing"] == 0.1 and resolved["lora_target_modules"] == ["q_proj", "v_proj"]
    assert resolved["learning_rate"] == 5e-5 and resolved["average_tokens_across_devices"] is False
    assert resolved["report_to"] == []  # use_tensorboard: false removes the default tracker


KILL_DURING_SAVE = """
import os, signal, sys
import bumblecore.train.checkpoint as checkpoint
from bumblecore.cli import main
original = checkpoint.save_checkpoint
def dying(output_dir, name, write_contents, *args, **kwargs):
    if name == "checkpoint-4":
        def half(tmp):
            write_contents(tmp)
            os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
        return original(output_dir, name, half, *args, **kwargs)
    return original(output_dir, name, write_contents, *args, **kwargs)
checkpoint.save_checkpoint = dying
import bumblecore.train.run  # noqa: the exporter imports save_checkpoint from the module at call time
main(["train", "--config", sys.argv[1]])
"""


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, pretrained, data):
    base = pretrained[0]
    config = {
        "training_stage": "sft",
        "model_name_or_path": str(base),
        "dataset_path": str(data / "sft_train.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "cutoff_len": 128,
        "max_steps": 6,
        "save_steps": 2,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_model_precision": "fp32",
    }
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(file)], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "trainer_state.json").exists() and not (out / "checkpoint-4").exists()
    assert list(out.glob(".checkpoint-4.tmp"))  # the partial save is left under its temporary name only
    config["resume_from_checkpoint"] = "latest"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-6").exists() and not list(out.glob(".checkpoint-*.tmp"))


def test_partial_checkpoint_is_refused(tmp_path):
    broken = tmp_path / "checkpoint-9"
    broken.mkdir()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        from bumblecore.train.checkpoint import resolve_resume_dir

        resolve_resume_dir(tmp_path, str(broken))


def test_phi3_trains_through_the_transformers_fallback(tmp_path, data):
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    model_dir = tmp_path / "phi3"
    phi = AutoModelForCausalLM.from_config(
        Phi3Config(
            vocab_size=768,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            max_position_embeddings=256,
        )
    )
    phi.save_pretrained(model_dir)
    from bumblecore.tokenizer import load_tokenizer

    load_tokenizer(DEMO / "tokenizer").save_pretrained(model_dir)
    history = run(tmp_path / "out", model_dir, data / "sft_train.jsonl")
    assert len(losses(history)) == 4 and losses(history)[-1] < losses(history)[0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "Phi3ForCausalLM"


def test_resume_with_a_larger_max_steps_follows_the_new_schedule(tmp_path, pretrained, data):
    """A run of 2 steps resumed with max_steps 4: from the first resumed step the lr is the closed form
    of the 4-step schedule (linear, warmup ceil(0.25 x 4) = 1), not the 2-step one's (0 at step 3)."""
    base, peak = pretrained[0], 5e-3
    keys = dict(lr_scheduler_type="linear", learning_rate=peak, save_steps=2, gradient_accumulation_steps=1)
    first = run(tmp_path / "out", base, data / "sft_train.jsonl", max_steps=2, **keys)
    assert [r["lr"] for r in first] == pytest.approx([0.0, peak])  # warmup ceil(0.25 x 2) = 1: step 0 is 0
    history = run(
        tmp_path / "out", base, data / "sft_train.jsonl", max_steps=4, resume_from_checkpoint="latest", **keys
    )
    total, warmup = 4, 1
    closed_form = {s + 1: peak * (total - s) / (total - warmup) for s in (2, 3)}  # record step = 0-based step + 1
    assert {r["step"]: r["lr"] for r in history if r["step"] > 2} == pytest.approx(
        closed_form, abs=1e-8
    )  # metrics.jsonl keeps 8 decimals


def test_reduce_on_plateau_without_eval_data_is_refused_and_ignored_keys_are_said(base_model, data):
    from bumblecore.train.run import config_notes, train

    keys = {
        "model_name_or_path": str(base_model),
        "dataset_path": str(data / "sft_train.jsonl"),
        "lr_scheduler_type": "reduce_on_plateau",
    }
    with pytest.raises(ValueError, match="reduce_on_plateau .* needs eval_dataset_path"):
        train(TrainArgs.from_flat(**keys))
    assert config_notes(TrainArgs.from_flat(**keys)) == []
    assert (
        "num_local_io_workers 4 is accepted and ignored"
        in config_notes(TrainArgs.from_flat(**keys, num_local_io_workers=4))[0]
    )
