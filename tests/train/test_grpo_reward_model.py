"""GRPO from reward models (reward_models beside reward_functions) and RLOO: the rewards the stage uses
are the reward model's scores of the chat-rendered prompt + completion (transformers as the oracle),
weighted after the functions in TRL's order; a run with a reward model learns it."""

import json
from pathlib import Path

import pytest
import yaml
from tiny import make_tiny_model, transformers_rewards, write_tiny_checkpoint, write_tiny_reward_model

from bumblecore.args import GRPOArgs
from bumblecore.cli import main
from bumblecore.data.prompts import read_prompts, tokenize_prompts
from bumblecore.inference.scoring import RewardScorer, reward_model_parameters
from bumblecore.train.grpo import RolloutLoader
from bumblecore.train.rewards import RewardFunction, load_reward_functions, reward_names

QUESTIONS = [
    ("How many animals are in: cat swan key", "two"),
    ("How many colours are in: red blue lamp", "two"),
    ("How many words are in: duck green crow", "three"),
    ("How many places are in: valley cup", "one"),
]


# A reward model whose template is not the policy's ChatML: it must read its own rendering.
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_rm")
    lines = "".join(json.dumps({"instruction": q, "answer": a}) + "\n" for q, a in QUESTIONS)
    (root / "prompts.jsonl").write_text(lines, encoding="utf-8")
    write_tiny_checkpoint(root / "model")
    write_tiny_reward_model(root / "rm", seed=1)
    write_tiny_reward_model(root / "plain_rm", seed=2, chat_template=PLAIN_TEMPLATE)
    return root


def test_the_rewards_are_the_reward_models_scores_of_the_rendered_completions(setup, demo_tok):
    seen = {}

    def length(prompts, completions, **fields):  # a function beside the model; it records what it was given
        seen.update(prompts=prompts, completions=completions)
        return [float(len(c)) for c in completions]

    scorers = [
        RewardScorer(str(setup / name), dtype="float32", device="cpu", batch_size=3) for name in ("rm", "plain_rm")
    ]
    functions = [RewardFunction("length", length, 0.5)] + load_reward_functions([], [2.0, -1.0], scorers)
    assert reward_names(functions) == ["length", "rm", "plain_rm"]
    prompts, _ = tokenize_prompts(read_prompts(setup / "prompts.jsonl"), demo_tok, 128)
    args = GRPOArgs(num_generations=4, max_completion_length=6, advantage="rloo")
    loader = RolloutLoader(prompts, demo_tok, args, functions, 4, 2, 1, 0, 11, 0, [demo_tok.eos_token_id])
    loader.bind(make_tiny_model(768))
    rollouts = loader.roll_out(0)
    conversations = [p + [{"role": "assistant", "content": c}] for p, c in zip(seen["prompts"], seen["completions"])]
    expected = transformers_rewards(setup / "rm", conversations)
    plain = transformers_rewards(setup / "plain_rm", conversations)  # rendered "user: ...\nassistant: ...\n"
    assert len(expected) == 8 and len(set(seen["completions"])) > 1
    assert rollouts["reward_table"][:, 1].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert rollouts["reward_table"][:, 2].tolist() == pytest.approx(plain, rel=1e-5, abs=1e-5)
    total = [0.5 * len(c) + 2.0 * e - p for c, e, p in zip(seen["completions"], expected, plain)]
    assert rollouts["rewards"].tolist() == pytest.approx(total, rel=1e-5, abs=1e-5)
    group = rollouts["rewards"][:4].double()
    assert rollouts["advantages"][0].item() == pytest.approx((group[0] - group[1:].mean()).item(), rel=1e-5)


def test_reward_weights_count_functions_then_models():
    GRPOArgs(reward_models=["rm"], reward_weights=[1.0])  # reward_functions unset: the model alone scores
    assert GRPOArgs(reward_models=["rm"]).reward_function_specs == []
    assert GRPOArgs().reward_function_specs == ["exact_match"]
    with pytest.raises(ValueError, match="reward_weights has 1 values for 1 reward_functions and 1 reward_models"):
        GRPOArgs(reward_functions=["exact_match"], reward_models=["rm"], reward_weights=[1.0])
    with pytest.raises(ValueError, match="advantage 'ppo' is not one of grpo, rloo"):
        GRPOArgs(advantage="ppo")


def run(setup, output_dir, **keys):
    config = {
        "training_stage": "grpo",
        "finetuning_type": "full",
        "model_name_or_path": str(setup / "model"),
        "dataset_path": str(setup / "prompts.jsonl"),
        "output_dir": str(output_dir),
        "cutoff_len": 64,
        "learning_rate": 2e-2,
        "warmup_ratio": 0.0,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_model_precision": "fp32",
        "save_steps": 1000,
        "num_generations": 4,
        "max_completion_length": 6,
        "reward_models": [str(setup / "rm")],
        **keys,
    }
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_the_policy_learns_the_reward_models_preference(setup, tmp_path, advantage):
    history = run(setup, tmp_path / "learn", max_steps=20, loss_type="dapo", advantage=advantage)
    rewards = [r["rewards/rm/mean"] for r in history]
    assert [r["reward"] for r in history] == pytest.approx(rewards)  # the model alone scores, weight 1
    assert not [key for key in history[0] if key.startswith("rewards/") and "/rm/" not in key]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.5, rewards


def test_the_memory_plan_holds_each_reward_model(setup):
    from transformers import AutoModelForSequenceClassification

    from bumblecore.args import TrainArgs
    from bumblecore.recipes import recipe_for

    rm = AutoModelForSequenceClassification.from_pretrained(str(setup / "rm"))
    size = sum(p.numel() for p in rm.parameters())
    assert reward_model_parameters(setup / "rm") == size
    keys = dict(training_stage="grpo", model_name_or_path=str(setup / "model"), reward_models=[str(setup / "rm")] * 2)
    assert recipe_for("grpo").frozen_copy(TrainArgs.from_flat(**keys), 1000, 1000) == 2 * size
    with_reference = TrainArgs.from_flat(**keys, beta=0.1, finetuning_type="full")
    assert recipe_for("grpo").frozen_copy(with_reference, 1000, 1000) == 1000 + 2 * size
