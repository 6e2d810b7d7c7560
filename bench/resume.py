"""Resume start-up: how long `bumblecore train --resume_from_checkpoint` takes from a late vs an early step.

    python bench/resume.py [--quick] [--repeats N]

Trains a tiny SFT model (2 layers, hidden 64, the demo tokenizer and SFT data, micro batch 1) to
checkpoint-<early> and, in a second run, to checkpoint-<late>, then resumes from checkpoint-<early> and from
checkpoint-<late>, each in a fresh `python -m bumblecore train` process that trains one more step.
Timed: wall clock from launch until the process exits, and from launch until the first resumed step
is in metrics.jsonl (seen by polling). Runs alternate early/late, the median of each is reported.
Goal: late / early <= 1.2x: the data loader is indexed by step, so a late resume should not replay
the batches before it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bumblecore" / "demo_data"


def write_model(directory: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO / "tokenizer")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))


def train_command(model: Path, out: Path, max_steps: int, save_steps: int, resume: Path | None = None) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "bumblecore",
        "train",
        "--training_stage",
        "sft",
        "--model_name_or_path",
        str(model),
        "--dataset_path",
        str(DEMO / "sft_train.jsonl"),
        "--output_dir",
        str(out),
        "--cutoff_len",
        "128",
        "--max_steps",
        str(max_steps),
        "--train_micro_batch_size_per_gpu",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--train_model_precision",
        "fp32",
        "--learning_rate",
        "1e-4",
        "--save_steps",
        str(save_steps),
        "--save_total_limit",
        "100000",
        "--accelerator",
        "cpu",
        "--cache_dir",
        str(out.parent / "cache"),
    ]
    if resume is not None:
        command += ["--resume_from_checkpoint", str(resume)]
    return command


def run_checked(command: list[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")


def has_step(metrics: Path) -> bool:
    """Whether metrics.jsonl holds a training step yet (a line being written may be incomplete)."""
    if not metrics.exists():
        return False
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            if "loss" in json.loads(line):
                return True
        except ValueError:
            pass
    return False


def time_resume(model: Path, base: Path, step: int, late: int, work: Path) -> dict:
    """One resume from a copy of checkpoint-<step> in a fresh output dir (so runs do not see each other's files)."""
    out = work / f"resume_{step}_{time.monotonic_ns()}"
    out.mkdir()
    # Only the checkpoint travels (the copy is not timed); without old metrics, the first line with a loss
    # is the resumed step.
    shutil.copytree(base / f"checkpoint-{step}", out / f"checkpoint-{step}")
    command = train_command(model, out, step + 1, save_steps=late * 10, resume=out / f"checkpoint-{step}")
    metrics = out / "metrics.jsonl"
    started = time.perf_counter()
    # stderr to a file, not a pipe: a pipe nobody reads while we poll could fill and stall the run.
    with open(out / "stderr.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        first_step = None
        while process.poll() is None:
            if first_step is None and has_step(metrics):
                first_step = time.perf_counter() - started
            time.sleep(0.02)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"resume from step {step} failed:\n{(out / 'stderr.log').read_text()[-3000:]}")
    shutil.rmtree(out)
    return {"wall_seconds": wall, "first_step_seconds": first_step if first_step is not None else wall}


def run(quick: bool = False, repeats: int | None = None) -> dict:
    early, late = 2, (200 if quick else 600)
    repeats = repeats or (3 if quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_model(work / "model")
        started = time.perf_counter()
        # Two short runs instead of one with a checkpoint every `early` steps: saving ~100 checkpoints
        # cost more than the steps. Each resume stops one step after its checkpoint, so the schedule
        # horizon differs between the two anyway.
        for step in (early, late):
            run_checked(train_command(work / "model", work / f"train_{step}", step, save_steps=step))
        train_seconds = time.perf_counter() - started
        runs = {early: [], late: []}
        for i in range(repeats):
            for step in (early, late) if i % 2 == 0 else (late, early):
                runs[step].append(time_resume(work / "model", work / f"train_{step}", step, late, work))
    results = {"early_step": early, "late_step": late, "repeats": repeats, "train_seconds": train_seconds}
    for name, step in (("early", early), ("late", late)):
        for key in ("wall_seconds", "first_step_seconds"):
            results[f"{name}_{key}"] = statistics.median(r[key] for r in runs[step])
    results["wall_ratio"] = results["late_wall_seconds"] / results["early_wall_seconds"]
    results["first_step_ratio"] = results["late_first_step_seconds"] / results["early_first_step_seconds"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="resume start-up time from a late vs an early checkpoint")
    parser.add_argument("--quick", action="store_true", help="late step 200 instead of 600, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    r = run(args.quick, args.repeats)
    print(f"trained {r['late_step']} steps in {r['train_seconds']:.1f}s; medians of {r['repeats']} resumes each")
    for name in ("early", "late"):
        print(
            f"resume from step {r[f'{name}_step']:4d}: exit after {r[f'{name}_wall_seconds']:.2f}s, "
            f"first resumed step after {r[f'{name}_first_step_seconds']:.2f}s"
        )
    print(f"late / early = {r['wall_ratio']:.2f}x wall, {r['first_step_ratio']:.2f}x to the first step (goal <= 1.2x)")


if __name__ == "__main__":
    main()
