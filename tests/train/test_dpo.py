"""DPO: the loss family against closed forms computed from transformers' log-probs, the references
(adapter-disabled, frozen, cached), ln 2 at the first step, exact resume, and what a run writes."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny import assert_evaluations_printed, make_tiny_model, one_process_and_two

import bumblecore
from bumblecore.args import DataArgs, TrainArgs
from bumblecore.chat.format import encode_preference
from bumblecore.cli import main
from bumblecore.data.dataset import dataset_units
from bumblecore.data.formats import read_samples
from bumblecore.data.loader import eval_batches
from bumblecore.model.bumblebee import Bumblebee
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import load_tokenizer
from bumblecore.train.dpo import (
    AdapterDisabledReference,
    ModelReference,
    PreferenceStage,
    compute_reference_logps,
    reference_cache_file,
)

DEMO = Path(bumblecore.__file__).parent / "demo_data"
TOKENIZER = DEMO / "tokenizer"


def tiny_model(seed: int, init_std: float = 0.2) -> Bumblebee:
    return make_tiny_model(768, seed, initializer_range=init_std, attention_bias=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_data")
    lines = open(DEMO / "dpo_train.jsonl", encoding="utf-8").read().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:64]) + "\n", encoding="utf-8")
    (root / "eval.jsonl").write_text(
        "\n".join(open(DEMO / "dpo_eval.jsonl", encoding="utf-8").read().splitlines()[:32]) + "\n"
    )
    # ShareGPT preference records with a system turn and history (multi-turn prompt), as the original's format
    records = [
        {
            "conversations": [
                {"from": "system", "value": "Answer in one word."},
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": f"And an animal number {i}?"},
            ],
            "chosen": {"from": "gpt", "value": "bee" * (1 + i % 3)},
            "rejected": {"from": "gpt", "value": f"stone {i} and more words"},
        }
        for i in range(6)
    ]
    (root / "sharegpt.json").write_text(json.dumps(records), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_models")
    tokenizer = load_tokenizer(TOKENIZER)
    # wide init (0.2) for the formula tests, so that a slip shows; the usual 0.02 for training runs
    for name, seed, std in (("policy", 0, 0.2), ("reference", 1, 0.2), ("start", 2, 0.02)):
        tiny_model(seed, std).save_pretrained(root / name)
        tokenizer.save_pretrained(str(root / name))
    return root


def pairs_batch(data_file, tmp_path, n=None):
    tokenizer = load_tokenizer(TOKENIZER)
    data = DataArgs(dataset_path=str(data_file), cutoff_len=256, cache_dir=str(tmp_path / "cache"), packing=False)
    _, units = dataset_units(data, recipe_for("dpo").reading, 42, tokenizer, data.dataset_path, progress=False)
    batch = eval_batches(units, n or len(units), tokenizer.pad_token_id, packing=False)[0]
    return batch, units


# ---------------------------------------------------------------------------- the oracle


def transformers_logps(model_dir, ids, mask):
    """Summed log-probs of the trained tokens, and the per-token ones, from transformers' logits."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    return [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]


def closed_form(policy_tokens, reference_tokens, beta, loss_type, eps, sft_weight, ld_alpha):
    """One pair's loss and rewards, from the definitions of the DPO issue, in plain Python floats."""
    (pw, pl), (rw, rl) = policy_tokens, reference_tokens
    shared = min(len(pw), len(pl))

    def ld(tokens):
        return sum(tokens[:shared]) + ld_alpha * sum(tokens[shared:])

    policy_w, policy_l = ld(pw), ld(pl)
    ref_w, ref_l = sum(rw), sum(rl)
    logsigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    if loss_type == "ipo":
        h = (policy_w / len(pw) - ref_w / len(rw)) - (policy_l / len(pl) - ref_l / len(rl))
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        h = (policy_w - ref_w) - (policy_l - ref_l)
        loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    loss += sft_weight * (-sum(pw) / len(pw))
    chosen, rejected = beta * (policy_w - ref_w), beta * (policy_l - ref_l)
    return {
        "loss": loss,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": float(chosen > rejected),
        "logps/chosen": policy_w,
        "logps/rejected": policy_l,
    }


CASES = {
    "sigmoid": dict(loss_type="sigmoid", eps=0.0, sft_weight=0.0, ld_alpha=1.0),
    "cdpo": dict(loss_type="sigmoid", eps=0.25, sft_weight=0.0, ld_alpha=1.0),
    "sft_weight": dict(loss_type="sigmoid", eps=0.0, sft_weight=0.7, ld_alpha=1.0),
    "ld_dpo": dict(loss_type="sigmoid", eps=0.0, sft_weight=0.0, ld_alpha=0.3),
    "ipo": dict(loss_type="ipo", eps=0.0, sft_weight=0.0, ld_alpha=1.0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dataset", ["alpaca", "sharegpt"])
def test_loss_and_metrics_equal_the_closed_forms(case, dataset, data, models, tmp_path):
    settings, beta = CASES[case], 0.5
    file = data / ("train.jsonl" if dataset == "alpaca" else "sharegpt.json")
    batch, _ = pairs_batch(file, tmp_path, n=6)
    tokenizer = load_tokenizer(TOKENIZER)
    samples = list(read_samples(str(file), recipe_for("dpo").reading))[:6]

    expected = []
    for sample in samples:
        c = sample.conversation
        tokens = {}
        for name in ("policy", "reference"):
            tokens[name] = [
                transformers_logps(models / name, *encode_preference(tokenizer, c.messages, reply, c.tools))
                for reply in (sample.chosen, sample.rejected)
            ]
        expected.append(closed_form(tokens["policy"], tokens["reference"], beta, **settings))

    policy = Bumblebee.from_pretrained(models / "policy")
    reference = ModelReference(Bumblebee.from_pretrained(models / "reference"))
    stage = PreferenceStage(
        beta, settings["loss_type"], settings["eps"], settings["sft_weight"], settings["ld_alpha"], reference
    )
    total, metrics = stage.loss(policy, batch)
    assert stage.count(batch) == 6
    assert float(total) == pytest.approx(sum(e["loss"] for e in expected), rel=1e-4, abs=1e-5)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert float(metrics[key]) == pytest.approx(sum(e[key] for e in expected), rel=1e-4, abs=1e-5), key
    if settings["sft_weight"]:
        assert "loss/sft" in metrics and float(metrics["loss/dpo"]) < float(total)
    # the pairs are not trivially equal: the formulas are exercised with h != 0
    assert 0 < sum(e["rewards/accuracies"] for e in expected) or any(abs(e["rewards/margins"]) > 1e-3 for e in expected)


def test_cached_reference_equals_live_and_is_reused(data, models, tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    _, units = pairs_batch(data / "train.jsonl", tmp_path)
    reference = ModelReference(Bumblebee.from_pretrained(models / "reference"))
    table = compute_reference_logps(fabric, reference, units, batch_size=5, pad_id=0)
    assert table.shape == (len(units), 2)
    for batch in eval_batches(units, 7, 0, packing=False):  # other batch widths than the table's
        live = reference.logps(batch)
        n = batch["num_pairs"]
        rows = torch.from_numpy(table)[batch["unit_indices"]]
        cached = torch.cat([rows[:, 0], rows[:, 1]])
        torch.testing.assert_close(cached.float(), live, atol=1e-4, rtol=1e-5)
        assert live[:n].shape == (n,)
    a = reference_cache_file(units, models / "reference", "fp32")
    assert a == reference_cache_file(units, models / "reference", "fp32")
    assert (
        a
        != reference_cache_file(units, models / "policy", "fp32")
        != reference_cache_file(units, models / "reference", "bf16")
    )


def test_adapter_disabled_reference_equals_the_base(data, models, tmp_path):
    from peft import LoraConfig, get_peft_model

    batch, _ = pairs_batch(data / "train.jsonl", tmp_path, n=4)
    base = Bumblebee.from_pretrained(models / "policy")
    expected = ModelReference(Bumblebee.from_pretrained(models / "policy")).logps(batch)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # a trained adapter: B != 0, so the adapter really changes the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.train()
    reference = AdapterDisabledReference(peft_model)
    torch.testing.assert_close(reference.logps(batch), expected, atol=1e-5, rtol=1e-5)
    assert peft_model.training  # restored after the reference forward
    with torch.no_grad():
        from bumblecore.train.dpo import response_token_logps

        adapted = response_token_logps(peft_model.eval(), batch)[0].sum(-1)
    assert (adapted - expected).abs().max() > 1e-3


# ---------------------------------------------------------------------------- end to end


def run(output_dir, model, data, **keys):
    config = {
        "training_stage": "dpo",
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
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "pref_beta": 0.5,
        "cache_dir": str(Path(output_dir).parent / "cache"),
        **keys,
    }
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_records(history):
    return [r for r in history if "loss" in r]


@pytest.mark.parametrize("finetuning_type,precompute", [("full", None), ("full", False), ("lora", None)])
def test_first_step_loss_is_ln2(tmp_path, models, data, finetuning_type, precompute):
    keys = {"max_steps": 1, "save_steps": 100, "finetuning_type": finetuning_type}
    if precompute is not None:
        keys["precompute_ref_log_probs"] = precompute
    first = train_records(run(tmp_path / "out", models / "policy", data, **keys))[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "finetuning_type,loss", [("full", {}), ("lora", {}), ("lora", {"pref_loss": "simpo", "pref_beta": 2.0})]
)
def test_dpo_resume_is_exact(tmp_path, models, data, finetuning_type, loss):
    keys = dict(finetuning_type=finetuning_type, max_steps=6, save_steps=3, save_total_limit=5, **loss)
    straight = run(tmp_path / "a", models / "policy", data, **keys)
    resumed_dir = tmp_path / "c"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", resumed_dir / "checkpoint-3")
    history = run(resumed_dir, models / "policy", data, **keys, resume_from_checkpoint="latest")
    assert [r["step"] for r in history] == [4, 5, 6]
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert [r[key] for r in history] == [r[key] for r in train_records(straight)[3:]], key
    weights = "adapter_model.safetensors" if finetuning_type == "lora" else "model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (resumed_dir / weights).read_bytes()


def test_dpo_on_demo_preferences_learns_and_writes_its_outputs(tmp_path, models, data, capsys):
    out = tmp_path / "dpo"
    capsys.readouterr()
    history = run(
        out,
        models / "start",
        data,
        max_steps=24,
        save_steps=12,
        eval_steps=12,
        learning_rate=3e-3,
        train_micro_batch_size_per_gpu=8,
        gradient_accumulation_steps=1,
        sft_weight=0.1,
        eval_dataset_path=str(data / "eval.jsonl"),
        use_tensorboard=True,
    )
    record = train_records(history)[-1]
    for key in (
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_sec",
        "loss/dpo",
        "loss/sft",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert key in record, key
    evaluations = [r for r in history if "eval/loss" in r]
    assert [r["step"] for r in evaluations] == [0, 12, 24]
    printed = capsys.readouterr()
    assert_evaluations_printed(printed.out + printed.err, history, headline=("rewards/accuracies", "rewards/margins"))
    assert evaluations[0]["eval/rewards/accuracies"] == 0.0 and evaluations[-1]["eval/rewards/accuracies"] > 0.5
    assert evaluations[-1]["eval/rewards/margins"] > 0 and evaluations[-1]["eval/loss/dpo"] < math.log(2)
    for name in (
        "training_loss.png",
        "rewards_accuracies.png",
        "rewards_margins.png",
        "rewards_chosen.png",
        "rewards_rejected.png",
        "model.safetensors",
        "training_args.yaml",
    ):
        assert (out / name).exists(), name
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(out / "checkpoint-12")
    assert type(policy).__name__ == "Qwen2ForCausalLM"


def test_ref_model_path_names_another_reference(tmp_path, models, data):
    """The same start with another reference: the first loss is the closed form over that reference, not ln 2."""
    from bumblecore.data.loader import BatchLoader

    _, units = pairs_batch(data / "train.jsonl", tmp_path)
    step0 = BatchLoader(units, 4, 1, seed=42).micro_batches(0)[0]  # the run's first batch
    policy = Bumblebee.from_pretrained(models / "policy")
    stage = PreferenceStage(0.5, reference=ModelReference(Bumblebee.from_pretrained(models / "reference")))
    expected = float(stage.loss(policy, step0)[0]) / 4
    for precompute in (True, False):
        first = train_records(
            run(
                tmp_path / f"out{precompute}",
                models / "policy",
                data,
                max_steps=1,
                save_steps=100,
                train_micro_batch_size_per_gpu=4,
                gradient_accumulation_steps=1,
                ref_model_path=str(models / "reference"),
                precompute_ref_log_probs=precompute,
            )
        )[0]
        assert first["loss"] == pytest.approx(expected, abs=1e-5)
        assert abs(first["loss"] - math.log(2)) > 1e-3


# ---------------------------------------------------------------------------- reference-free: ORPO, SimPO


def reference_free_closed_form(chosen_tokens, rejected_tokens, beta, loss_type, gamma, sft_weight=0.0):
    """One pair's ORPO or SimPO loss and metrics from the papers' definitions, in Python floats (fp64)."""
    mw, ml = sum(chosen_tokens) / len(chosen_tokens), sum(rejected_tokens) / len(rejected_tokens)
    logsigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    if loss_type == "orpo":
        odds = lambda m: math.exp(m) / (1 - math.exp(m))  # noqa: E731
        chosen, rejected = math.log(odds(mw)), math.log(odds(ml))
        terms = {"loss/nll": -mw, "loss/orpo": -logsigmoid(chosen - rejected)}
        loss = -mw + beta * terms["loss/orpo"]
    else:
        chosen, rejected = beta * mw, beta * ml
        loss = -logsigmoid(chosen - rejected - gamma)
        terms = {"loss/simpo": loss, **({"loss/sft": -mw} if sft_weight else {})}
        loss += sft_weight * -mw
    return {
        "loss": loss,
        **terms,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": float(chosen > rejected),
        "logps/chosen": sum(chosen_tokens),
        "logps/rejected": sum(rejected_tokens),
    }


@pytest.fixture(scope="module")
def policy_pair_tokens(data, models):
    """Per-token log-probs of the policy on the six ShareGPT pairs (chosen, rejected), from transformers in fp64."""
    tokenizer = load_tokenizer(TOKENIZER)
    pairs = []
    for sample in list(read_samples(str(data / "sharegpt.json"), recipe_for("dpo").reading))[:6]:
        c = sample.conversation
        pairs.append(
            [
                transformers_logps(models / "policy", *encode_preference(tokenizer, c.messages, reply, c.tools))
                for reply in (sample.chosen, sample.rejected)
            ]
        )
    return pairs


@pytest.mark.parametrize(
    "loss_type,beta,gamma,sft_weight", [("orpo", 0.25, 0.0, 0.0), ("simpo", 2.0, 0.5, 0.0), ("simpo", 2.5, 1.4, 0.3)]
)
def test_reference_free_losses_equal_the_closed_forms(
    loss_type, beta, gamma, sft_weight, data, models, policy_pair_tokens, tmp_path
):
    batch, _ = pairs_batch(data / "sharegpt.json", tmp_path, n=6)
    expected = [
        reference_free_closed_form(chosen, rejected, beta, loss_type, gamma, sft_weight)
        for chosen, rejected in policy_pair_tokens
    ]

    stage = PreferenceStage(beta, loss_type, sft_weight=sft_weight, simpo_gamma=gamma)
    total, metrics = stage.loss(Bumblebee.from_pretrained(models / "policy"), batch)
    assert float(total.detach()) == pytest.approx(sum(e["loss"] for e in expected), rel=1e-4)
    for key in metrics:
        assert float(metrics[key]) == pytest.approx(sum(e[key] for e in expected), rel=1e-4, abs=1e-6), key
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(metrics)
    assert any(abs(e["rewards/margins"]) > 1e-2 for e in expected)  # h != 0: the formulas are exercised


def test_orpo_log_odds_are_stable_near_probability_one():
    """fp32 mean log-probs near 0 (where 1 - exp(m) cancels) and far below it, against fp64 closed forms."""
    from bumblecore.train.losses import reference_free_loss

    chosen = torch.tensor([-1e-5, -3e-3, -0.3, -0.69, -0.7, -2.0, -40.0])
    rejected = torch.tensor([-0.5, -1e-4, -0.69315, -5.0, -1e-6, -0.01, -80.0])
    loss, lw, ll = reference_free_loss(chosen, rejected, 0.1, "orpo")
    for i, (mw, ml) in enumerate(zip(chosen.double().tolist(), rejected.double().tolist())):
        expected_w, expected_l = (m - math.log(-math.expm1(m)) for m in (mw, ml))
        # abs: near p = 1/2 the log odds are ~0, the difference of two ~ln 2 terms (fp32 resolves 6e-8)
        assert float(lw[i]) == pytest.approx(expected_w, rel=1e-4, abs=1e-6)
        assert float(ll[i]) == pytest.approx(expected_l, rel=1e-4, abs=1e-6)
        assert float(loss[i]) == pytest.approx(-mw + 0.1 * math.log1p(math.exp(-(expected_w - expected_l))), rel=1e-4)
    assert torch.isfinite(reference_free_loss(torch.zeros(1), torch.zeros(1), 0.1, "orpo")[0]).all()  # p = 1


@pytest.mark.parametrize(
    "keys",
    [{"ref_model_path": "checkpoints/sft_full"}, {"dpo_label_smoothing": 0.1}, {"ld_alpha": 0.5}, {"sft_weight": 0.1}],
)
def test_reference_free_losses_refuse_reference_keys(keys):
    losses = ["orpo"] if "sft_weight" in keys else ["orpo", "simpo"]
    for loss in losses:
        with pytest.raises(ValueError, match=next(iter(keys)) if "sft_weight" not in keys else "NLL"):
            TrainArgs.from_flat(training_stage="dpo", pref_loss=loss, **keys)
    TrainArgs.from_flat(training_stage="dpo", pref_loss="simpo", sft_weight=0.1)  # SimPO + an SFT term is fine
    TrainArgs.from_flat(training_stage="sft", pref_loss="orpo", ref_model_path="x")  # only a dpo run reads them


def no_references(monkeypatch):
    import bumblecore.train.dpo as dpo

    def refuse(*args, **kwargs):
        raise AssertionError("a reference-free loss built a reference")

    for name in ("ModelReference", "AdapterDisabledReference", "compute_reference_logps", "cached_reference_logps"):
        monkeypatch.setattr(dpo, name, refuse)


def four_pairs(tmp_path, data):
    file = tmp_path / "four.jsonl"
    file.write_text("\n".join((data / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    return str(file)


def test_orpo_learns_without_a_reference_and_resumes_exactly(tmp_path, models, data, monkeypatch, capsys):
    no_references(monkeypatch)
    keys = dict(
        pref_loss="orpo",
        dataset_path=four_pairs(tmp_path, data),
        max_steps=4,
        save_steps=2,
        save_total_limit=5,
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=1,
        precompute_ref_log_probs=False,
    )
    straight = train_records(run(tmp_path / "a", models / "start", data, **keys))
    banner = capsys.readouterr().out
    assert "no reference model" in banner and "frozen reference" not in banner
    assert "precompute_ref_log_probs False is ignored" in banner
    assert not list((tmp_path / "cache").rglob("reference_logps-*"))
    losses = [r["loss"] for r in straight]
    assert losses[-1] < losses[0] - 0.1, losses
    assert losses[0] == pytest.approx(straight[0]["loss/nll"] + 0.5 * straight[0]["loss/orpo"], rel=1e-6)
    resumed_dir = tmp_path / "c"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed_dir / "checkpoint-2")
    history = run(resumed_dir, models / "start", data, **keys, resume_from_checkpoint="latest")
    assert [r["step"] for r in history] == [3, 4]
    for key in ("loss", "loss/orpo", "rewards/margins", "logps/chosen"):
        assert [r[key] for r in history] == [r[key] for r in straight[2:]], key
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (resumed_dir / "model.safetensors").read_bytes()


def test_simpo_lora_learns_without_a_reference(tmp_path, models, data, monkeypatch, capsys):
    no_references(monkeypatch)
    history = train_records(
        run(
            tmp_path / "s",
            models / "start",
            data,
            pref_loss="simpo",
            pref_beta=2.0,
            simpo_gamma=0.5,
            finetuning_type="lora",
            dataset_path=four_pairs(tmp_path, data),
            max_steps=4,
            save_steps=100,
            train_micro_batch_size_per_gpu=4,
            gradient_accumulation_steps=1,
        )
    )
    banner = capsys.readouterr().out
    assert "simpo loss, beta 2.0, gamma 0.5" in banner and "no reference model" in banner
    assert not list((tmp_path / "cache").rglob("reference_logps-*"))
    losses = [r["loss"] for r in history]
    assert losses[-1] < losses[0], losses
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]


# ---------------------------------------------------------------------------- an SFT source beside the pairs


def sft_source(tmp_path):
    lines = (DEMO / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "chat.jsonl"


@pytest.mark.parametrize("stage,finetuning_type", [("dpo", "full"), ("dpo", "lora"), ("kto", "lora")])
def test_an_sft_source_beside_the_pairs_is_a_loss_term_of_its_own(
    tmp_path, models, data, capsys, stage, finetuning_type
):
    """A mixture {pairs, chat (loss weight 0.5)}: at the first step (policy = reference) the DPO term is
    ln 2 (KTO's: 0.5, half of each example's weight 1), so the loss is that plus 0.5 x the chat source's
    own mean over its tokens."""
    mixture = {
        "pairs": {"path": str(data / "train.jsonl")},
        "chat": {"path": str(sft_source(tmp_path)), "loss_weight": 0.5},
    }
    keys = dict(finetuning_type=finetuning_type, max_steps=3, save_steps=100, dataset_path=mixture, learning_rate=1e-3)
    history = train_records(run(tmp_path / "out", models / "policy", data, training_stage=stage, **keys))
    banner = capsys.readouterr().out
    assert "beside the pairs: SFT source chat" in banner and "loss weight 0.5" in banner
    first = history[0]
    start = math.log(2) if stage == "dpo" else 0.5
    if stage == "dpo":
        assert first["loss/dpo"] == pytest.approx(start, abs=1e-6)
    assert first["loss"] == pytest.approx(start + 0.5 * first["loss/chat"], rel=1e-6)
    assert all("loss/chat" in r and r["loss/chat"] > 0 for r in history)


def test_an_sft_source_at_loss_weight_zero_leaves_the_dpo_run_as_it_was(tmp_path, models, data):
    """Its term adds a zero gradient: the weights are those of the pairs alone, bit for bit; at 0.5 they move."""
    keys = dict(finetuning_type="lora", max_steps=2, save_steps=100)
    run(tmp_path / "plain", models / "policy", data, **keys)
    weights = "adapter_model.safetensors"
    for weight in (0.0, 0.5):
        mixture = {
            "pairs": str(data / "train.jsonl"),
            "chat": {"path": str(sft_source(tmp_path)), "loss_weight": weight},
        }
        run(tmp_path / f"w{weight}", models / "policy", data, **keys, dataset_path=mixture)
        same = (tmp_path / "plain" / weights).read_bytes() == (tmp_path / f"w{weight}" / weights).read_bytes()
        assert same == (weight == 0.0), weight


def test_pairs_beside_sft_sources_take_no_weights(tmp_path, models, data, capsys):
    mixture = {
        "pairs": {"path": str(data / "train.jsonl"), "loss_weight": 2.0},
        "chat": {"path": str(sft_source(tmp_path)), "loss_weight": 0.5},
    }
    with pytest.raises(SystemExit):
        run(tmp_path / "out", models / "policy", data, dataset_path=mixture, max_steps=1)
    assert "the preference sources are one dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_an_sft_source_beside_pairs_over_two_processes_equals_accumulation(tmp_path, models, data):
    keys = {
        "training_stage": "dpo",
        "model_name_or_path": str(models / "start"),
        "dataset_path": {
            "pairs": {"path": str(data / "train.jsonl")},
            "chat": {"path": str(sft_source(tmp_path)), "loss_weight": 0.3},
        },
        "cutoff_len": 128,
        "max_steps": 3,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "train_model_precision": "fp32",
        "save_steps": 100,
        "pref_beta": 0.5,
    }
    for one, two in zip(*one_process_and_two(keys, tmp_path), strict=True):
        for key in ("loss", "loss/dpo", "loss/chat"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key
