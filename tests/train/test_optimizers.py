"""`optim` (train/optimizers.py): which parameters Muon takes (closed form: the Muon recipe), each
optimizer trains the tiny model (the loss falls) and resumes exactly (a run resumed from its step-2
checkpoint equals the uninterrupted run, bitwise), what cannot work is refused before anything is
written, and (slow) DDP and ZeRO-2 equal one process."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tiny import DEMO_TOKENIZER, make_tiny_model, max_weight_difference, train_on_two_processes, write_tiny_checkpoint

from bumblecore.args import OptimizationArgs, TrainArgs
from bumblecore.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    file = tmp_path_factory.mktemp("data") / "sft.jsonl"
    lines = (DEMO_TOKENIZER.parent / "sft_train.jsonl").read_text().splitlines()[:64]
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return file


HIDDEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tied):
    """Muon: every decoder linear layer's weight; AdamW: the embedding, the head (tied or not), the norms.
    Both see the same groups (weight decay for matrices only) and the schedule's lr reaches both."""
    from bumblecore.train.optimizers import MuonWithAdamW, build_optimizer_for

    model = make_tiny_model(tie_word_embeddings=tied)
    optimizer = build_optimizer_for(model, OptimizationArgs(optim="muon", learning_rate=1e-3, weight_decay=0.1))
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}

    def owned(inner):
        return {names[id(p)] for g in inner.param_groups for p in g["params"]}

    muon, adamw = owned(optimizer.muon), owned(optimizer.adamw)
    assert muon == {n for n in names.values() if n.split(".")[-2] in HIDDEN and n.endswith(".weight")}
    assert any(n.endswith("q_proj.bias") for n in adamw)  # Qwen2's attention biases: AdamW's
    assert adamw == set(names.values()) - muon
    assert "model.embed_tokens.weight" in adamw and ("lm_head.weight" in adamw) != tied
    assert {(g["lr"], g["weight_decay"]) for g in optimizer.param_groups} == {(1e-3, 0.1), (1e-3, 0.0)}
    assert optimizer.muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    for group in optimizer.param_groups:  # what a schedule does, seen by the inner optimizers
        group["lr"] = 5e-4
    assert all(g["lr"] == 5e-4 for inner in (optimizer.muon, optimizer.adamw) for g in inner.param_groups)


def settings(output_dir, base, data, **keys) -> dict:
    return {
        "training_stage": "sft",
        "model_name_or_path": str(base),
        "dataset_path": str(data),
        "output_dir": str(output_dir),
        "cutoff_len": 128,
        "max_steps": 4,
        "save_steps": 2,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_model_precision": "fp32",
        "warmup_ratio": 0.0,
        **keys,
    }


def train(output_dir, base, data, **keys):
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(settings(output_dir, base, data, **keys)))
    main(["train", "--config", str(file)])
    return [json.loads(line)["loss"] for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


OPTIMIZERS = {
    "muon": dict(optim="muon"),
    "adafactor": dict(optim="adafactor"),
    "sgd": dict(optim="sgd", optim_kwargs={"momentum": 0.9}, learning_rate=0.1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_trains_and_resumes_exactly(tmp_path, base, sft_data, name):
    keys = OPTIMIZERS[name]
    straight = train(tmp_path / "a", base, sft_data, **keys)
    assert straight[-1] < straight[0] - 0.5
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed / "checkpoint-2")
    assert train(resumed, base, sft_data, **keys, resume_from_checkpoint="latest") == straight[2:]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()


def test_what_cannot_work_is_refused_before_anything_is_written(tmp_path, base, sft_data):
    from bumblecore.train.run import train as run_train

    def refused(name, **keys):
        return run_train(TrainArgs.from_flat(**settings(tmp_path / name, base, sft_data, **keys)))

    with pytest.raises(ValueError, match="optim adamw_8bit needs a CUDA GPU .* accelerator is cpu"):
        refused("bnb", optim="adamw_8bit", accelerator="cpu")
    zero2 = str(REPO / "configs" / "deepspeed" / "ds_z2_config.json")
    for name in ("muon", "adafactor"):
        with pytest.raises(ValueError, match=f"optim {name} with DeepSpeed .*flat 1-D slices"):
            refused(name, optim=name, deepspeed_config_path=zero2)
    with pytest.raises(ValueError, match="optim_kwargs .*'betas'.* for optim sgd"):
        refused("kwargs", optim="sgd", optim_kwargs={"betas": (0.9, 0.95)})
    with pytest.raises(ValueError, match="optim 'lion' is not one of adamw, muon, adafactor, sgd, adamw_8bit"):
        OptimizationArgs(optim="lion")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, strategy",
    [("muon", []), ("sgd", ["--deepspeed_config_path", str(REPO / "configs/deepspeed/ds_z2_config.json")])],
    ids=["muon-ddp", "sgd-zero2"],
)
def test_two_processes_equal_one(tmp_path, base, sft_data, name, strategy):
    """The same global batch: 1 process accumulating 2 micro-batches, 2 gloo ranks of 1 (DDP, or ZeRO-2 with
    SGD as DeepSpeed's client optimizer): the same losses and weights."""
    keys = dict(OPTIMIZERS[name], max_steps=3, save_steps=None, accelerator="cpu")
    one = train(tmp_path / "one", base, sft_data, **keys)
    config = yaml.safe_load((tmp_path / "one.yaml").read_text())
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({**config, "gradient_accumulation_steps": 1}))
    train_on_two_processes(tmp_path / "two.yaml", tmp_path / "two", *strategy, cwd=tmp_path)
    two = [json.loads(line)["loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert two == pytest.approx(one, abs=1e-5)
    assert max_weight_difference(tmp_path / "one", tmp_path / "two") < 1e-5
