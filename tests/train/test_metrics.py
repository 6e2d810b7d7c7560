"""Evaluation metrics aggregated across ranks (torchmetrics): an eval set split unevenly over 2
processes (DeepSpeed ZeRO-3 for SFT, DDP for DPO) gives the 1-process values, tokens-weighted (SFT eval loss) and pairs-weighted (DPO
rewards), and not the mean of per-rank means (computed here as the wrong answer)."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from tiny import train_on_two_processes

import bumblecore
from bumblecore.args import TrainArgs
from bumblecore.cli import main
from bumblecore.data.dataset import dataset_units
from bumblecore.data.loader import eval_batches
from bumblecore.model.bumblebee import Bumblebee
from bumblecore.model.config import BumblebeeConfig
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import load_tokenizer
from bumblecore.train.dpo import ModelReference, PreferenceStage
from bumblecore.train.metrics import EvalAggregate, ExactMatch, RatioOfSums, exact_match
from bumblecore.train.sft import LanguageModelingStage

DEMO = Path(bumblecore.__file__).parent / "demo_data"
ZERO3 = str(Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "ds_z3_config.json")
BETA = 0.5


def test_ratio_of_sums_and_exact_match():
    metric = RatioOfSums()
    metric.update(torch.tensor(6.0), 2)
    metric.update(torch.tensor(1.0), 8)
    assert float(metric.compute()) == pytest.approx(0.7)  # (6 + 1) / (2 + 8), not (3 + 0.125) / 2
    aggregate = EvalAggregate("cpu")
    assert aggregate.compute(["rewards/margins"]) == {
        "loss": 0.0,
        "rewards/margins": 0.0,
    }  # an empty share joins with zeros
    matches = ExactMatch()
    matches.update([" yes", "two", "no"], ["yes", "three", "no\n"])
    matches.update(["one"], ["one"])
    assert float(matches.compute()) == pytest.approx(0.75)
    assert exact_match(["a", "b"], ["a", "c"]) == 0.5
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        exact_match(["a", "b"], ["a"])


def save_model(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    # A wide init: peaked predictions make per-token losses differ, so the two weightings differ clearly.
    config = BumblebeeConfig(
        vocab_size=768,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.5,
    )
    Bumblebee(config).save_pretrained(directory)
    load_tokenizer(DEMO / "tokenizer").save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    # 5 rows: rank 0 gets rows 0, 2, 4 and rank 1 rows 1, 3 (the long answers), so shares differ in rows and tokens.
    sft = [
        {"instruction": f"Question {i}?", "input": "", "output": answer}
        for i, answer in enumerate(
            [
                "yes",
                "one two three four five six seven eight nine ten eleven twelve",
                "no",
                "a longer answer with many more words than the others have in them",
                "zero",
            ]
        )
    ]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft), encoding="utf-8")
    pairs = open(DEMO / "dpo_eval.jsonl", encoding="utf-8").read().splitlines()[:5]
    (root / "dpo.jsonl").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    return root, save_model(root / "policy", 1), save_model(root / "reference", 2)


def run_one_and_two(root: Path, name: str, keys: dict, *two_processes: str) -> tuple[dict, dict]:
    """Step-0 evaluation of the same run on 1 process and on 2 (`--devices 2`, plus `two_processes` flags)."""
    config = root / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "max_steps": 1,
                "eval_steps": 1,
                "cutoff_len": 64,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1,
                "train_model_precision": "fp32",
                "accelerator": "cpu",
                "save_steps": 100,
                "packing": False,
                **keys,
            }
        )
    )
    main(
        [
            "train",
            "--config",
            str(config),
            "--output_dir",
            str(root / f"{name}_one"),
            "--gradient_accumulation_steps",
            "2",
        ]
    )
    train_on_two_processes(config, root / f"{name}_two", *two_processes, cwd=root, timeout=180)
    first = [
        next(
            json.loads(line)
            for line in (root / f"{name}_{n}" / "metrics.jsonl").read_text().splitlines()
            if '"eval/loss"' in line
        )
        for n in ("one", "two")
    ]
    assert first[0]["step"] == first[1]["step"] == 0
    return first[0], first[1]


def per_rank_sums(keys: dict, root: Path, stage, model) -> list[dict]:
    """Each rank's eval sums, as the engine's strided eval share of 2 ranks gives them."""
    run = TrainArgs.from_flat(**{**keys, "cutoff_len": 64, "packing": False, "cache_dir": str(root / "oracle_cache")})
    tokenizer = load_tokenizer(run.model.model_name_or_path)
    _, units = dataset_units(
        run.data,
        recipe_for(run.model.training_stage).reading,
        run.optimization.seed,
        tokenizer,
        run.data.eval_dataset_path,
        progress=False,
    )
    shares = []
    with torch.no_grad():
        for rank in (0, 1):
            sums = {"count": 0}
            for batch in eval_batches(units, 2, tokenizer.pad_token_id or 0, False, world_size=2, rank=rank):
                loss, metrics = stage.loss(model, batch)
                sums["count"] += stage.count(batch)
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            shares.append(sums)
    assert shares[0]["count"] != shares[1]["count"]
    return shares


def check(one: dict, two: dict, shares: list[dict], keys: list[str]) -> None:
    for key in keys:
        pooled = sum(s[key] for s in shares) / sum(s["count"] for s in shares)
        mean_of_means = sum(s[key] / s["count"] for s in shares) / 2
        assert one[f"eval/{key}"] == pytest.approx(pooled, abs=1e-5), key
        assert two[f"eval/{key}"] == pytest.approx(one[f"eval/{key}"], abs=1e-5), key
        assert abs(two[f"eval/{key}"] - mean_of_means) > 1e-3, f"{key}: indistinguishable from a mean of per-rank means"


@pytest.mark.slow
def test_sft_eval_loss_over_two_zero3_processes_equals_one_process(setup):
    """Under DeepSpeed ZeRO-3 (gloo on CPU): the metric syncs over DeepSpeed's process group, and the rank
    with fewer eval batches runs extra forwards so the other's parameter gathers are not left waiting."""
    root, policy, _ = setup
    keys = {
        "training_stage": "sft",
        "model_name_or_path": str(policy),
        "dataset_path": str(root / "sft.jsonl"),
        "eval_dataset_path": str(root / "sft.jsonl"),
    }
    one, two = run_one_and_two(root, "sft", keys, "--deepspeed_config_path", ZERO3)
    model = Bumblebee.from_pretrained(policy).eval()
    check(one, two, per_rank_sums(keys, root, LanguageModelingStage(), model), ["loss"])
    assert two["eval/perplexity"] == pytest.approx(math.exp(one["eval/loss"]), rel=1e-5)


@pytest.mark.slow
def test_dpo_eval_rewards_over_two_ddp_processes_equal_one_process(setup):
    root, policy, reference = setup
    keys = {
        "training_stage": "dpo",
        "model_name_or_path": str(policy),
        "ref_model_path": str(reference),
        "dataset_path": str(root / "dpo.jsonl"),
        "eval_dataset_path": str(root / "dpo.jsonl"),
        "pref_beta": BETA,
    }
    one, two = run_one_and_two(root, "dpo", keys)
    stage = PreferenceStage(beta=BETA, reference=ModelReference(Bumblebee.from_pretrained(reference).eval()))
    shares = per_rank_sums(keys, root, stage, Bumblebee.from_pretrained(policy).eval())
    check(one, two, shares, ["loss", "rewards/margins", "rewards/chosen", "rewards/accuracies", "logps/chosen"])


def test_eval_of_several_loss_terms_adds_each_terms_own_mean():
    """Two eval batches of a stage with two terms: eval loss = sum over terms of (its sums / its units)."""
    from bumblecore.train.metrics import EvalAggregate

    aggregate = EvalAggregate(torch.device("cpu"))
    aggregate.update({"a": torch.tensor(3.0), "b": torch.tensor(10.0)}, {"a": 2, "b": 5}, {"m": torch.tensor(4.0)})
    aggregate.update({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, {"a": 2, "b": 1}, {"m": torch.tensor(2.0)})
    values = aggregate.compute()
    assert values["loss"] == pytest.approx((3 + 1) / (2 + 2) + (10 + 2) / (5 + 1))
    assert values["m"] == pytest.approx((4 + 2) / (2 + 2))  # plain metrics go by the first term's units
