"""`bumblecore demo`: the whole pipeline on the shipped demo data, on a CPU in minutes.

init a small model -> pretrain -> SFT (full) -> DPO (LoRA) -> merge -> evaluate -> sample answers.
Each stage's output directory is the next stage's model_name_or_path, as in docs/TUTORIAL.md; the
stage settings are the YAML files in bumblecore/demo_configs/ (package data, so an installed wheel
runs the demo too), passed through the same `train` as any run.

What is measured (demo_report.json), all on held-out data:
- pretrain: eval loss on pretrain_eval.jsonl before the first step and after the last;
- sft: exact match of greedy answers to the sft_eval.jsonl questions (word lists never seen in
  training), by the pretrained base (before) and the SFT model (after);
- dpo: eval rewards/accuracies of the DPO run, and the preferred rate (the share of dpo_eval pairs
  whose chosen answer the model gives a higher log-probability than the rejected one) of the SFT
  model (before) and of the merged DPO model (after);
- grpo (--with_grpo): exact match on the held-out count questions of sft_eval.jsonl by the merged
  DPO model (before) and by the GRPO model (after), and the training reward at the start and end;
- rlhf (--with_rlhf): a reward model trained on the preference pairs (training_stage rm, from the
  SFT model) and its held-out accuracy (the share of dpo_eval pairs whose chosen answer it scores
  above the rejected one); then GRPO from the SFT model with that reward model as the only reward,
  and, on the dpo_eval instructions, the reward model's mean score of the policy's greedy answers and
  the preferred rate (the share of answers the reward model scores at least as high as the pair's
  chosen answer) and the exact match of the chosen answer (which falls where the policy games the
  reward model) of the SFT model (before) and the GRPO policy (after), and the training reward.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

PACKAGE = Path(__file__).resolve().parent
DEMO_DATA = PACKAGE / "demo_data"
DEMO_CONFIGS = PACKAGE / "demo_configs"

# The demo model: Qwen2.5-shaped, ~3M parameters at the demo tokenizer's vocabulary (768).
MODEL_SHAPE = dict(
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=768,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=768,
)
# On a GPU the same pipeline with a wider, deeper model (~25M parameters), in bf16.
GPU_SHAPE = dict(MODEL_SHAPE, num_hidden_layers=8, hidden_size=512, intermediate_size=1536, num_attention_heads=8)
QUICK_SHAPE = dict(MODEL_SHAPE, num_hidden_layers=2, hidden_size=64, intermediate_size=128)


def stage_config(name: str, output_dir: Path, model: Path, device: str, quick: bool, **overrides) -> dict:
    """demo_configs/<name>.yaml with the demo's paths filled in (and, for --quick, a few steps only)."""
    file = DEMO_CONFIGS / f"{name}.yaml"
    config = yaml.safe_load(file.read_text(encoding="utf-8"))
    for key in ("dataset_path", "eval_dataset_path"):
        if isinstance(config.get(key), list):
            config[key] = [str(DEMO_DATA / name) for name in config[key]]
        elif key in config:
            config[key] = str(DEMO_DATA / config[key])
    # The demo owns its stage directories: a rerun (full or --quick) replaces the previous one's outputs.
    config.update(
        model_name_or_path=str(model),
        output_dir=str(output_dir / name),
        accelerator=device,
        cache_dir=str(output_dir / "token_cache"),
        overwrite_output_dir=True,
    )
    if device == "cuda":
        config["train_model_precision"] = "bf16"
    if quick:
        config.update(max_steps=4, save_steps=4, eval_steps=2)
    config.update(overrides)
    return config


def run_stage(config: dict) -> list[dict]:
    """Write the stage's flat config beside its output and train from it, parsed as `train --config` parses."""
    from bumblecore.cli import parse_arguments
    from bumblecore.train.run import train

    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    file = out.parent / f"{out.name}.yaml"
    file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    arguments, _ = parse_arguments("train", train, ["--config", str(file)])
    train(**arguments)
    return [
        json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()
    ]


# ---------------------------------------------------------------------------- measurements


def load_records(name: str, limit: Optional[int] = None) -> list[dict]:
    lines = (DEMO_DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit] if line.strip()]


@torch.no_grad()
def exact_match(model_dir, questions: list[dict], device: str, batch_size: int = 32) -> tuple[float, list[dict]]:
    """Share of questions whose greedy answer (chat template, default system prompt) equals the
    reference answer exactly (surrounding whitespace ignored); and the answers."""
    from bumblecore.chat.format import render_prompt
    from bumblecore.inference.generate import GenerationEngine, SamplingParams
    from bumblecore.inference.loading import load_for_inference

    model, tokenizer, eos = load_for_inference(str(model_dir), dtype="float32", device_map=device)
    engine = GenerationEngine(model, tokenizer, max_batch_size=batch_size, max_len=256, eos_token_ids=eos)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q["instruction"]}]) for q in questions]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=24))
    answers = [
        {"question": q["instruction"], "expected": q["output"], "answer": r["text"].strip()}
        for q, r in zip(questions, results)
    ]
    from bumblecore.train.metrics import exact_match as exact_match_score

    return exact_match_score([a["answer"] for a in answers], [a["expected"] for a in answers]), answers


@torch.no_grad()
def preferred_rate(model_dir, cache_dir: Path, device: str) -> float:
    """Share of dpo_eval pairs whose chosen answer has a higher log-probability than the rejected one."""
    from bumblecore.args import DataArgs
    from bumblecore.data.dataset import dataset_units
    from bumblecore.data.loader import eval_batches
    from bumblecore.inference.loading import load_for_inference
    from bumblecore.recipes import recipe_for
    from bumblecore.train.dpo import response_token_logps

    model, tokenizer, _ = load_for_inference(str(model_dir), dtype="float32", device_map=device)
    data = DataArgs(
        dataset_path=str(DEMO_DATA / "dpo_eval.jsonl"), cutoff_len=256, cache_dir=str(cache_dir), packing=False
    )
    _, units = dataset_units(data, recipe_for("dpo").reading, 42, tokenizer, data.dataset_path, progress=False)
    preferred, device = 0, next(model.parameters()).device
    for batch in eval_batches(units, 32, tokenizer.pad_token_id or 0, packing=False):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        sums = response_token_logps(model, batch)[0].sum(-1)
        n = batch["num_pairs"]
        preferred += int((sums[:n] > sums[n:]).sum())
    return preferred / max(1, len(units))


def count_questions(name: str) -> list[dict]:
    return [r for r in load_records(name) if r["instruction"].startswith("How many")]


def write_grpo_prompts(out: Path) -> Path:
    """The training count questions as GRPO prompts: the instruction, and the answer the reward checks."""
    path = out / "grpo_prompts.jsonl"
    lines = [
        json.dumps({"instruction": r["instruction"], "answer": r["output"]}) for r in count_questions("sft_train.jsonl")
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def mean_reward(records: list[dict]) -> float:
    return sum(r["reward"] for r in records) / max(1, len(records))


# ---------------------------------------------------------------------------- RLHF: reward model -> GRPO


def instruction_messages(record: dict) -> list[dict]:
    text = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": text}]


def write_rlhf_prompts(out: Path) -> Path:
    """The preference pairs' instructions as GRPO prompts (the reward model judges the answers)."""
    path = out / "rlhf_prompts.jsonl"
    lines = [json.dumps({"messages": instruction_messages(r)}) for r in load_records("dpo_train.jsonl")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def reward_model_accuracy(rm_dir: Path, device: str) -> float:
    """Share of the held-out dpo_eval pairs whose chosen answer the reward model scores above the rejected."""
    from bumblecore.inference.scoring import RewardScorer

    scorer = RewardScorer(str(rm_dir), "float32", device, batch_size=32)
    pairs = load_records("dpo_eval.jsonl")
    replies = [
        instruction_messages(r) + [{"role": "assistant", "content": r[side]}]
        for side in ("chosen", "rejected")
        for r in pairs
    ]
    scores = scorer(replies)
    return sum(c > r for c, r in zip(scores[: len(pairs)], scores[len(pairs) :])) / len(pairs)


def judged_answers(policy_dir: Path, rm_dir: Path, device: str, limit: Optional[int] = None) -> dict:
    """The policy's greedy answers to the dpo_eval instructions, scored by the reward model: their mean
    score, and the preferred rate (the share the reward model scores at least as high as the chosen answer)."""
    from bumblecore.inference.scoring import RewardScorer

    pairs = load_records("dpo_eval.jsonl", limit)
    questions = [{"instruction": r["instruction"], "output": r["chosen"]} for r in pairs]
    matched, answers = exact_match(policy_dir, questions, device)
    scorer = RewardScorer(str(rm_dir), "float32", device, batch_size=32)
    prompts = [instruction_messages(r) for r in pairs]
    scores = scorer([p + [{"role": "assistant", "content": a["answer"]}] for p, a in zip(prompts, answers)])
    chosen = scorer([p + [{"role": "assistant", "content": r["chosen"]}] for p, r in zip(prompts, pairs)])
    return {
        "reward": sum(scores) / len(scores),
        "preferred_rate": sum(s >= c for s, c in zip(scores, chosen)) / len(scores),
        "exact_match": matched,  # the chosen answer itself: a policy that games the reward model loses it
    }


def rlhf(out: Path, device: str, quick: bool, timed) -> dict:
    """rm (from the SFT model) -> its held-out accuracy -> GRPO with it from the SFT model -> the policy judged."""
    limit = 8 if quick else None
    timed("rm", run_stage, stage_config("rm", out, out / "sft", device, quick))
    accuracy = timed("reward model accuracy (held out)", reward_model_accuracy, out / "rm", device)
    before = timed("policy judged by the reward model (sft)", judged_answers, out / "sft", out / "rm", device, limit)
    config = stage_config(
        "grpo_rm",
        out,
        out / "sft",
        device,
        quick,
        dataset_path=str(write_rlhf_prompts(out)),
        reward_models=[str(out / "rm")],
    )
    if quick:
        config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, num_generations=4)
    rounds = [r for r in timed("grpo with the reward model", run_stage, config) if "reward" in r]
    after = timed(
        "policy judged by the reward model (grpo)", judged_answers, out / "grpo_rm", out / "rm", device, limit
    )
    fifth = max(1, len(rounds) // 5)
    return {
        "reward_model_accuracy": accuracy,
        "reward_before": before["reward"],
        "reward_after": after["reward"],
        "preferred_rate_before": before["preferred_rate"],
        "preferred_rate_after": after["preferred_rate"],
        "exact_match_before": before["exact_match"],
        "exact_match_after": after["exact_match"],
        "prompts": len(load_records("dpo_eval.jsonl", limit)),
        "training_reward_start": mean_reward(rounds[:fifth]),
        "training_reward_end": mean_reward(rounds[-fifth:]),
        "reward_curve": [[r["step"], round(r["reward"], 4)] for r in rounds],
    }


# ---------------------------------------------------------------------------- the command


def demo(
    output_dir: str = "checkpoints/demo",
    device: str = "cpu",
    quick: bool = False,
    eval_questions: int = 200,
    with_grpo: bool = False,
    with_rlhf: bool = False,
) -> dict:
    """Run the whole pipeline on the shipped demo data: init -> pretrain -> SFT -> DPO (LoRA) -> merge -> evaluate.

    Writes each stage's output under output_dir (init/, pretrain/, sft/, dpo/, dpo_merged/, grpo/), their
    loss plots, and demo_report.json with the held-out measurements; prints a short summary.

    Args:
        output_dir: where every stage writes (each stage's output is the next one's model).
        device: cpu, or cuda (bf16, and a bigger model: 8 layers, hidden 512).
        quick: a few steps per stage and a tiny model (seconds; for tests); the numbers then mean nothing.
        eval_questions: how many held-out SFT questions the exact match is measured on (at most 200).
        with_grpo: a fourth stage: GRPO with the exact-match reward on the count questions (~1 minute on 2 cores).
        with_rlhf: RLHF from the SFT model: a reward model on the preference pairs (rm/), then GRPO with it (grpo_rm/).
    """
    from bumblecore.model.init import init_model
    from bumblecore.model.lora import merge_lora

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is visible; use --device cpu")
    started = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    questions = load_records("sft_eval.jsonl", limit=8 if quick else eval_questions)
    timings = {}

    def timed(name, function, *args, **kwargs):
        print(f"\n===== {name} =====", flush=True)
        begun = time.perf_counter()
        result = function(*args, **kwargs)
        timings[name] = round(time.perf_counter() - begun, 1)
        return result

    shape = QUICK_SHAPE if quick else GPU_SHAPE if device == "cuda" else MODEL_SHAPE
    timed(
        "init",
        init_model,
        preset="0.5B",
        tokenizer_path=str(DEMO_DATA / "tokenizer"),
        output_dir=str(out / "init"),
        torch_dtype="float32",
        overwrite_output_dir=True,  # a demo run again replaces its own outputs, as its stages do
        **shape,
    )
    pretrain = timed("pretrain", run_stage, stage_config("pretrain", out, out / "init", device, quick))
    evals = [r["eval/loss"] for r in pretrain if "eval/loss" in r]
    before_sft, _ = timed("exact match (pretrained base)", exact_match, out / "pretrain", questions, device)
    timed("sft", run_stage, stage_config("sft", out, out / "pretrain", device, quick))
    after_sft, _ = timed("exact match (sft)", exact_match, out / "sft", questions, device)
    preferred_before = timed("preferred rate (sft)", preferred_rate, out / "sft", out / "token_cache", device)
    dpo = timed("dpo", run_stage, stage_config("dpo", out, out / "sft", device, quick))
    timed(
        "merge",
        merge_lora,
        base_model_path=str(out / "sft"),
        lora_model_path=str(out / "dpo"),
        save_path=str(out / "dpo_merged"),
    )
    preferred_after = timed("preferred rate (dpo)", preferred_rate, out / "dpo_merged", out / "token_cache", device)
    final_match, answers = timed("exact match (dpo)", exact_match, out / "dpo_merged", questions, device)
    dpo_evals = [r for r in dpo if "eval/rewards/accuracies" in r]
    grpo_report = None
    if with_grpo:
        held_out = count_questions("sft_eval.jsonl")[: 8 if quick else None]
        before, _ = timed("exact match, count questions (dpo)", exact_match, out / "dpo_merged", held_out, device)
        config = stage_config("grpo", out, out / "dpo_merged", device, quick, dataset_path=str(write_grpo_prompts(out)))
        if quick:
            config.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, num_generations=4)
        rounds = [r for r in timed("grpo", run_stage, config) if "reward" in r]
        after, _ = timed("exact match, count questions (grpo)", exact_match, out / "grpo", held_out, device)
        fifth = max(1, len(rounds) // 5)  # one step's reward is 32 samples: the start and end are means of steps
        grpo_report = {
            "count_exact_match_before": before,
            "count_exact_match_after": after,
            "questions": len(held_out),
            "reward_start": mean_reward(rounds[:fifth]),
            "reward_end": mean_reward(rounds[-fifth:]),
            "reward_curve": [[r["step"], round(r["reward"], 4)] for r in rounds],
        }

    rlhf_report = rlhf(out, device, quick, timed) if with_rlhf else None

    report = {
        "pretrain": {"eval_loss_start": evals[0], "eval_loss_end": evals[-1]},
        "sft": {"exact_match_before": before_sft, "exact_match_after": after_sft, "questions": len(questions)},
        "dpo": {
            "reward_accuracy": dpo_evals[-1]["eval/rewards/accuracies"] if dpo_evals else None,
            "preferred_rate_before": preferred_before,
            "preferred_rate_after": preferred_after,
            "exact_match_after": final_match,
        },
        **({"grpo": grpo_report} if grpo_report else {}),
        **({"rlhf": rlhf_report} if rlhf_report else {}),
        "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": timings,
        "samples": answers[:5],
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_summary(report, out)
    return report


def print_summary(report: dict, out: Path) -> None:
    p, s, d = report["pretrain"], report["sft"], report["dpo"]
    fall = 1 - p["eval_loss_end"] / p["eval_loss_start"]
    print("\n===== BumbleCore demo: summary =====")
    print(f"pretrain  eval loss {p['eval_loss_start']:.3f} -> {p['eval_loss_end']:.3f} ({fall:.0%} lower)")
    print(
        f"sft       held-out exact match {s['exact_match_before']:.2f} -> {s['exact_match_after']:.2f} ({s['questions']} questions)"
    )
    accuracy = "n/a" if d["reward_accuracy"] is None else f"{d['reward_accuracy']:.2f}"
    print(
        f"dpo       eval reward accuracy {accuracy}; preferred rate {d['preferred_rate_before']:.2f} -> "
        f"{d['preferred_rate_after']:.2f}; exact match after DPO {d['exact_match_after']:.2f}"
    )
    g = report.get("grpo")
    if g:
        print(
            f"grpo      held-out count questions exact match {g['count_exact_match_before']:.2f} -> "
            f"{g['count_exact_match_after']:.2f} ({g['questions']} questions); training reward "
            f"{g['reward_start']:.2f} -> {g['reward_end']:.2f}"
        )
    r = report.get("rlhf")
    if r:
        print(
            f"rlhf      reward model held-out accuracy {r['reward_model_accuracy']:.2f}; policy (sft -> grpo) on "
            f"{r['prompts']} held-out prompts: reward {r['reward_before']:.2f} -> {r['reward_after']:.2f}, preferred "
            f"rate {r['preferred_rate_before']:.2f} -> {r['preferred_rate_after']:.2f} (scored >= the chosen answer), "
            f"exact match of the chosen answer {r['exact_match_before']:.2f} -> {r['exact_match_after']:.2f}; "
            f"training reward {r['training_reward_start']:.2f} -> {r['training_reward_end']:.2f}"
        )
    for sample in report["samples"][:3]:
        print(f"  Q: {sample['question']}\n  A: {sample['answer']}   (expected: {sample['expected']})")
    print(f"total {report['seconds']:.0f}s; outputs and demo_report.json in {out}")
