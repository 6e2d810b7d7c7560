"""GRPO as a stage: the prompt reader, rollouts that are the generation engine's own samples, the
log-probs they are trained against, and whole runs (fields reaching a user's reward, KL zero at the
start, resume exact within a round, DDP equal to accumulation, a reward the policy learns)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny import assert_evaluations_printed, make_tiny_model, one_process_and_two, write_tiny_checkpoint

from bumblecore.args import GRPOArgs
from bumblecore.cli import main
from bumblecore.data.prompts import read_prompts, tokenize_prompts
from bumblecore.data.sources import DataError
from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.train.grpo import RolloutLoader, completion_seed, completion_token_logps
from bumblecore.train.rewards import load_reward_functions

QUESTIONS = [
    ("How many animals are in: cat swan key", "two"),
    ("How many colours are in: red blue lamp", "two"),
    ("How many words are in: duck green crow", "three"),
    ("How many places are in: valley cup", "one"),
    ("How many animals are in: mole", "one"),
    ("How many colours are in: stone leaf", "zero"),
    ("How many words are in: cat", "one"),
    ("How many places are in: river forest meadow", "three"),
]

# A reward of the user's: shorter completions score higher; it also records the fields it was given.
USER_REWARDS = """
import json, os

def brevity(prompts, completions, answer, **fields):
    with open(os.environ["GRPO_FIELDS_LOG"], "a") as log:
        log.write(json.dumps({"answer": answer, "prompt": prompts[0][-1]["content"], "n": len(completions)}) + "\\n")
    return [-float(len(c)) for c in completions]
"""


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    write_jsonl(root / "prompts.jsonl", [{"instruction": q, "answer": a} for q, a in QUESTIONS])
    write_tiny_checkpoint(root / "model")
    (root / "rewards.py").write_text(USER_REWARDS)
    return root


# ---------------------------------------------------------------------------- prompts


def test_every_prompt_format_keeps_its_other_fields(tmp_path):
    files = {
        "alpaca": {"instruction": "Count", "input": "a b", "output": "two", "answer": "two"},
        "sharegpt": {"conversations": [{"from": "human", "value": "Count: a b"}], "answer": "two", "id": 7},
        "messages": {"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]},
        "trl": {"prompt": "Count: a b", "answer": "two"},
        "trl_messages": {"prompt": [{"role": "user", "content": "Count: a b"}], "tests": ["x"]},
    }
    got = {name: read_prompts(write_jsonl(tmp_path / f"{name}.jsonl", [record]))[0] for name, record in files.items()}
    assert got["alpaca"].messages == [{"role": "user", "content": "Count\na b"}]
    assert got["alpaca"].fields == {"output": "two", "answer": "two"}  # the answer is not in the prompt
    assert got["sharegpt"].messages == [{"role": "user", "content": "Count: a b"}]
    assert got["sharegpt"].fields == {"answer": "two", "id": 7}
    assert [m["role"] for m in got["messages"].messages] == ["system", "user"] and got["messages"].fields == {}
    assert got["trl"].messages == got["trl_messages"].messages == [{"role": "user", "content": "Count: a b"}]
    assert got["trl_messages"].fields == {"tests": ["x"]}


HUMAN = {"from": "human", "value": "a"}
USER = {"role": "user", "content": "a"}


@pytest.mark.parametrize(
    "good,bad,message",
    [
        ({"conversations": [HUMAN]}, {"conversations": [HUMAN, {"from": "gpt", "value": "b"}]}, "end on a user turn"),
        ({"messages": [USER]}, {"messages": [USER, {"role": "assistant", "content": "b"}]}, "end on a user"),
        ({"prompt": "a"}, {"prompt": "  "}, 'field "prompt" is empty'),
        ({"instruction": "a"}, {"question": "a"}, "a GRPO prompt needs"),
        ({"instruction": "a"}, {"prompt": "a"}, "a prompt record in a file of alpaca records"),
    ],
)
def test_a_bad_prompt_names_file_line_and_field(tmp_path, good, bad, message):
    file = write_jsonl(tmp_path / "p.jsonl", [good, bad])
    with pytest.raises(DataError, match=message) as err:
        read_prompts(file)
    assert f"{file} line 2" in str(err.value)
    assert len(read_prompts(file, skip_bad_records=True)) == 1


# ---------------------------------------------------------------------------- rollouts


def make_loader(setup, demo_tok, model, **grpo):
    prompts, _ = tokenize_prompts(read_prompts(setup / "prompts.jsonl"), demo_tok, 128)
    args = GRPOArgs(**{"num_generations": 4, "max_completion_length": 6, **grpo})
    loader = RolloutLoader(
        prompts, demo_tok, args, load_reward_functions(["exact_match"]), 4, 2, 1, 0, 11, 0, [demo_tok.eos_token_id]
    )
    loader.bind(model)
    return loader


def test_rollouts_are_the_generation_engines_samples_for_their_seeds(setup, demo_tok):
    model = make_tiny_model(768)
    loader = make_loader(setup, demo_tok, model, num_iterations=2, temperature=0.7, top_p=0.9)
    rollouts = loader.roll_out(3)
    positions = [p for p, _ in loader.round_prompts(3)]
    assert len(rollouts["completion_ids"]) == 8 and len(positions) == 2
    for row, ids in enumerate(rollouts["completion_ids"]):
        params = SamplingParams(
            max_new_tokens=6,
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            seed=completion_seed(11, 3, positions[row // 4], row % 4),
        )
        alone = GenerationEngine(model, demo_tok, max_batch_size=1, eos_token_ids=[demo_tok.eos_token_id])
        assert alone.generate([rollouts["prompt_ids"][row]], params)[0]["token_ids"] == ids, row
    groups = [rollouts["completion_ids"][i : i + 4] for i in (0, 4)]
    assert all(len({tuple(c) for c in group}) > 1 for group in groups)  # each completion its own seed
    assert rollouts["prompt_ids"][0] == rollouts["prompt_ids"][3] != rollouts["prompt_ids"][4]


def test_lora_rollouts_sample_from_the_adapted_policy(setup, demo_tok):
    """With LoRA the rollouts come from base + adapter: the same tokens as the merged model gives for
    the same seeds (and not the base's)."""
    import copy

    from bumblecore.model.lora import apply_lora

    policy = apply_lora(make_tiny_model(768), 4, 8, 0.0)
    torch.manual_seed(5)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)
    merged = copy.deepcopy(policy).merge_and_unload()
    adapted = make_loader(setup, demo_tok, policy).roll_out(0)["completion_ids"]
    assert make_loader(setup, demo_tok, merged).roll_out(0)["completion_ids"] == adapted
    assert make_loader(setup, demo_tok, make_tiny_model(768)).roll_out(0)["completion_ids"] != adapted


def test_old_log_probs_are_the_samplers_and_the_batch_targets_only_completions(setup, demo_tok):
    model = make_tiny_model(768)
    loader = make_loader(setup, demo_tok, model, num_iterations=2, temperature=0.7)
    rollouts = loader.roll_out(0)
    # Each old log-prob is log softmax(logits / temperature) of the sampled token, position by position.
    for row in (0, 5):
        prompt, completion = rollouts["prompt_ids"][row], rollouts["completion_ids"][row]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion]))[0].float() / 0.7
        expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(completion)[:, None])
        torch.testing.assert_close(rollouts["old_logps"][row], expected[:, 0], atol=1e-5, rtol=1e-5)
    batch = loader.micro_batches(0)[1]
    assert batch["input_ids"].shape[0] == 4
    with torch.no_grad():
        logps, mask = completion_token_logps(model, batch, 0.7)
    assert int(mask.sum()) == sum(len(c) for c in rollouts["completion_ids"][4:8])
    torch.testing.assert_close(logps[mask], batch["old_logps"][mask], atol=1e-5, rtol=1e-5)
    assert (batch["old_logps"][~mask] == 0).all()
    # advantages: centred within each group of 4
    assert rollouts["advantages"].view(-1, 4).sum(1).abs().max() < 1e-5


def test_a_group_that_does_not_fit_one_process_is_refused(setup, demo_tok):
    with pytest.raises(ValueError, match="multiple of num_generations 3"):
        make_loader(setup, demo_tok, make_tiny_model(768), num_generations=3)


# ---------------------------------------------------------------------------- runs


def config(setup, output_dir, **keys):
    return {
        "training_stage": "grpo",
        "model_name_or_path": str(setup / "model"),
        "dataset_path": str(setup / "prompts.jsonl"),
        "output_dir": str(output_dir),
        "cutoff_len": 64,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.0,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "train_model_precision": "fp32",
        "save_steps": 100,
        "num_generations": 4,
        "max_completion_length": 6,
        "reward_functions": ["exact_match", f"{setup / 'rewards.py'}:brevity"],
        "reward_weights": [1.0, 0.1],
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        **keys,
    }


def run(setup, output_dir, monkeypatch, **keys):
    monkeypatch.setenv("GRPO_FIELDS_LOG", str(Path(output_dir).parent / f"{Path(output_dir).name}.fields"))
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config(setup, output_dir, **keys)))
    main(["train", "--config", str(file)])
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_a_run_logs_its_rewards_and_starts_with_zero_kl(setup, tmp_path, monkeypatch, finetuning_type):
    history = run(setup, tmp_path / "out", monkeypatch, finetuning_type=finetuning_type, beta=0.1, max_steps=2)
    first = history[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before any update
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)  # ratio 1: -mean advantage, centred per group
    assert first["clip_ratio"] == 0.0
    assert 1 <= first["completions/mean_length"] <= 6 and 0 <= first["frac_reward_zero_std"] <= 1
    assert first["reward"] == pytest.approx(first["rewards/exact_match/mean"] + 0.1 * first["rewards/brevity/mean"])
    assert history[1]["kl"] > 0
    calls = [json.loads(line) for line in (tmp_path / "out.fields").read_text().splitlines()]
    answers = dict(QUESTIONS)
    assert calls and all(call["n"] == 8 for call in calls)  # one call per round and process: 2 prompts x 4
    for call in calls:  # the record's answer field, beside its prompt, completion by completion
        assert call["answer"][0] == answers[call["prompt"]] and len(set(call["answer"][:4])) == 1


def test_evaluation_scores_the_policys_greedy_answers(setup, tmp_path, monkeypatch, demo_tok, capsys):
    capsys.readouterr()
    history = run(
        setup,
        tmp_path / "eval",
        monkeypatch,
        finetuning_type="full",
        eval_dataset_path=str(setup / "prompts.jsonl"),
        eval_steps=2,
        max_steps=2,
    )
    evaluations = [r for r in history if "eval/reward" in r]
    assert [r["step"] for r in evaluations] == [0, 2]
    printed = capsys.readouterr()
    assert_evaluations_printed(printed.out + printed.err, history, headline=("reward",))
    # step 0: the starting model's greedy answers, generated and scored here independently
    from bumblecore.inference.loading import load_for_inference

    model, tokenizer, eos = load_for_inference(str(setup / "model"), dtype="float32")
    prompts, _ = tokenize_prompts(read_prompts(setup / "prompts.jsonl"), tokenizer, 64)
    engine = GenerationEngine(model, tokenizer, max_batch_size=8, eos_token_ids=eos)
    texts = [r["text"] for r in engine.generate([p.ids for p in prompts], SamplingParams(max_new_tokens=6))]
    start = evaluations[0]
    assert start["eval/rewards/brevity/mean"] == pytest.approx(-sum(map(len, texts)) / len(texts), abs=1e-5)
    assert start["eval/loss"] == 0.0 and 0 <= start["eval/rewards/exact_match/mean"] <= 1
    assert start["eval/reward"] == pytest.approx(
        start["eval/rewards/exact_match/mean"] + 0.1 * start["eval/rewards/brevity/mean"], abs=1e-5
    )


@pytest.mark.parametrize("at", [1, 2])
def test_resume_within_and_between_rounds_is_exact(setup, tmp_path, monkeypatch, at):
    keys = dict(finetuning_type="lora", max_steps=4, save_steps=1, save_total_limit=5, num_iterations=2, beta=0.05)
    straight = run(setup, tmp_path / "a", monkeypatch, **keys)
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copytree(tmp_path / "a" / f"checkpoint-{at}", resumed / f"checkpoint-{at}")
    history = run(setup, resumed, monkeypatch, **keys, resume_from_checkpoint="latest")
    assert [r["step"] for r in history] == list(range(at + 1, 5))
    for key in ("loss", "kl", "reward", "clip_ratio", "completions/mean_length"):
        assert [r[key] for r in history] == [r[key] for r in straight[at:]], key
    weights = "adapter_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (resumed / weights).read_bytes()


def test_the_policy_learns_a_users_reward(setup, tmp_path, monkeypatch):
    """Brevity alone, on a random model: the completions' text gets shorter (-19 -> -3 characters when written)."""
    history = run(
        setup,
        tmp_path / "learn",
        monkeypatch,
        finetuning_type="full",
        reward_functions=[f"{setup / 'rewards.py'}:brevity"],
        reward_weights=None,
        max_steps=30,
        learning_rate=2e-2,
        loss_type="dapo",
    )
    rewards = [r["rewards/brevity/mean"] for r in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 5, rewards


@pytest.mark.slow
def test_grpo_ddp_equals_one_process_accumulating(setup, tmp_path, monkeypatch):
    """2 gloo processes, each generating for its own prompts, end with the weights of 1 process that
    accumulates 2 micro-batches: the same prompts and seeds, whatever the layout."""
    monkeypatch.setenv("GRPO_FIELDS_LOG", str(tmp_path / "fields"))
    keys = config(setup, tmp_path / "unused", finetuning_type="full", max_steps=3, num_iterations=2, beta=0.05)
    del keys["output_dir"]
    for one, two in zip(*one_process_and_two(keys, tmp_path), strict=True):
        for key in ("loss", "reward", "kl", "completions/mean_length"):
            assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-6), key
