"""The memory plan against the measured peak: each run's planned MB per rank beside every rank's peak RSS.

    python bench/memory_plan.py [--only NAME,NAME] [--json F]

Runs a matrix of short trainings (2 steps, short rows), each in a fresh `python -m bumblecore train`
process on the CPU, and reads its last line, `peak memory per rank: host RSS <A> MB[, <B> MB] (planned
<P> MB)`: single process, DDP (2 gloo ranks), DeepSpeed ZeRO-1/2/3 (2 ranks), fp32 and bf16, full and
LoRA, gradient checkpointing on and off, on three models:

    tiny   the 0.5B preset cut to 2 layers, hidden 64, vocab 32,000 (~2M parameters), random weights
    250M   the 0.5B preset cut to 20 layers, hidden 1024, intermediate 2816, 16/4 heads, vocab 32,000 tied
           (256M parameters), random fp32 weights
    smol   SmolLM2-135M-Instruct (converted once per machine; see bumblecore.model.gguf)

Goal: every rank's peak within +-25% of its plan. The 2-rank ZeRO-3 fp32 row of the 250M model with the
shipped configs/deepspeed/ds_z3_config.json, against the one-process fp32 row, also gives the ZeRO-3
per-rank ratio (goal <= 0.65x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bumblecore" / "demo_data"
ZERO = {stage: str(ROOT / "configs" / "deepspeed" / f"ds_z{stage}_config.json") for stage in range(4)}
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000),
    "demo": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=768),  # the demo's model (checkpoints/demo/pretrain)
    "250M": dict(hidden_size=1024, num_hidden_layers=20, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip

# name, model, stage, precision, ranks, ZeRO stage (None: no DeepSpeed), lora, checkpointing, micro, cutoff[,
# gradient accumulation steps (default 1)[, more command-line arguments]]
MATRIX = [
    ("tiny fp32 1p", "tiny", "sft", "fp32", 1, None, False, False, 2, 256),
    ("tiny bf16 ddp", "tiny", "sft", "bf16", 2, None, False, False, 2, 256),
    ("tiny bf16 z1 lora", "tiny", "sft", "bf16", 2, 1, True, False, 2, 256),
    ("tiny fp32 z3", "tiny", "sft", "fp32", 2, 3, False, False, 2, 256),
    ("smol fp32 1p", "smol", "sft", "fp32", 1, None, False, False, 2, 256),
    ("smol fp32 1p gc", "smol", "sft", "fp32", 1, None, False, True, 2, 256),
    ("smol bf16 1p lora", "smol", "sft", "bf16", 1, None, True, False, 2, 256),
    ("smol fp32 ddp", "smol", "sft", "fp32", 2, None, False, False, 1, 128),
    ("smol bf16 z2", "smol", "sft", "bf16", 2, 2, False, False, 1, 128),
    ("smol bf16 z3 lora", "smol", "sft", "bf16", 2, 3, True, False, 1, 128),
    ("250M fp32 1p", "250M", "continue_pretrain", "fp32", 1, None, False, False, 1, 128),
    ("250M bf16 1p gc long", "250M", "continue_pretrain", "bf16", 1, None, False, True, 2, 512),
    ("250M fp32 1p lora long", "250M", "continue_pretrain", "fp32", 1, None, True, False, 2, 512),
    ("250M fp32 z3", "250M", "continue_pretrain", "fp32", 2, 3, False, False, 1, 128),
    ("250M bf16 z3", "250M", "continue_pretrain", "bf16", 2, 3, False, False, 1, 128),
    ("250M bf16 z1", "250M", "continue_pretrain", "bf16", 2, 1, False, False, 1, 128),
    # gradient accumulation (the README's sft_lora line accumulates 8 micro batches of 4 x 1024)
    ("tiny fp32 1p lora acc8", "tiny", "sft", "fp32", 1, None, True, False, 4, 1024, 8),
    ("smol fp32 1p lora acc4", "smol", "sft", "fp32", 1, None, True, False, 2, 256, 4),
    ("smol fp32 1p acc4", "smol", "sft", "fp32", 1, None, False, False, 2, 256, 4),
    ("250M fp32 1p acc4", "250M", "continue_pretrain", "fp32", 1, None, False, False, 1, 128, 4),
    ("250M bf16 z2 acc4", "250M", "continue_pretrain", "bf16", 2, 2, False, False, 1, 128, 4),
    (
        "demo fp32 1p lora r64 acc8",
        "demo",
        "sft",
        "fp32",
        1,
        None,
        True,
        False,
        4,
        1024,
        8,
        ["--lora_rank", "64", "--lora_alpha", "128", "--lora_dropout", "0.1"],
    ),  # README's sft_lora line
]
LINE = re.compile(r"peak memory per rank: host RSS ([\d,]+ MB(?:, [\d,]+ MB)*) \(planned ([\d,]+) MB\)")


def write_model(directory: Path, shape: dict) -> None:
    import torch

    from bumblecore import Bumblebee, BumblebeeConfig
    from bumblecore.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = Bumblebee(BumblebeeConfig.from_preset("0.5B", torch_dtype="float32", **shape))
    model.save_pretrained(directory)
    load_tokenizer(DEMO / "tokenizer").save_pretrained(str(directory))


def model_dir(name: str, work: Path) -> Path:
    if name == "smol":
        from bumblecore.model.gguf import smollm2_checkpoint

        return Path(smollm2_checkpoint())
    directory = work / f"model-{name}"
    if not (directory / "config.json").is_file():
        write_model(directory, SHAPES[name])
    return directory


def train(row: tuple, work: Path) -> dict:
    name, model, stage, precision, ranks, zero, lora, checkpointing, micro, cutoff, accumulation, extra = (
        row + (1, [])[len(row) - 10 :]
    )
    out = work / re.sub(r"\W+", "_", name)
    data = DEMO / ("pretrain.jsonl" if stage == "continue_pretrain" else "sft_train.jsonl")
    command = [
        sys.executable, "-m", "bumblecore", "train",
        "--training_stage", stage,
        "--model_name_or_path", str(model_dir(model, work)),
        "--dataset_path", str(data),
        "--output_dir", str(out),
        "--overwrite_output_dir", "true",
        "--cutoff_len", str(cutoff),
        "--max_steps", "2",
        "--train_micro_batch_size_per_gpu", str(micro),
        "--gradient_accumulation_steps", str(accumulation),
        "--train_model_precision", precision,
        "--enable_gradient_checkpointing", str(checkpointing).lower(),
        "--save_steps", "1000",
        "--accelerator", "cpu",
        "--devices", str(ranks),
        "--cache_dir", str(work / "cache"),
        *(["--finetuning_type", "lora", "--lora_rank", "8"] if lora else []),
        *(["--deepspeed_config_path", ZERO[zero]] if zero is not None else []),
        *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (work / f"{out.name}.log").write_text(done.stdout + done.stderr)
    match = LINE.search(done.stdout + done.stderr)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    peaks = [float(v.replace(",", "").removesuffix(" MB")) for v in match.group(1).split(", ")]
    planned = float(match.group(2).replace(",", ""))
    return {
        "name": name,
        "planned_mb": planned,
        "peak_mb": peaks,
        "worst_error": max((p / planned - 1 for p in peaks), key=abs),
        "seconds": seconds,
        "settings": dict(stage=stage, precision=precision, ranks=ranks, zero=zero, lora=lora,
                         checkpointing=checkpointing, micro=micro, cutoff=cutoff, accumulation=accumulation),
    }  # fmt: skip


def accumulated(settings: dict) -> str:
    steps = settings.get("accumulation", 1)
    return f" (x {steps})" if steps > 1 else ""


def table(results: list[dict]) -> str:
    lines = [
        "| run | ZeRO | precision | LoRA | ckpt | micro x seq (x accumulation) | planned MB | measured peak MB per rank | worst error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["settings"]
        zero = f"ZeRO-{s['zero']}" if s["zero"] is not None else ("DDP" if s["ranks"] > 1 else "-")
        lines.append(
            f"| {r['name']} | {zero} | {s['precision']} | {'yes' if s['lora'] else 'no'} | "
            f"{'on' if s['checkpointing'] else 'off'} | {s['micro']} x {s['cutoff']}{accumulated(s)} | {r['planned_mb']:,.0f} | "
            f"{', '.join(f'{p:,.0f}' for p in r['peak_mb'])} | {r['worst_error']:+.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="memory plan vs measured peak RSS per rank")
    parser.add_argument("--only", default="", help="comma-separated run names (default: the whole matrix)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--work", default=None, help="a directory for models and outputs (default: a temporary one)")
    args = parser.parse_args()
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    rows = [row for row in MATRIX if not wanted or row[0] in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for row in rows:
            results.append(train(row, work))
            r = results[-1]
            print(
                f"{r['name']}: planned {r['planned_mb']:,.0f} MB, measured "
                f"{', '.join(f'{p:,.0f}' for p in r['peak_mb'])} MB ({r['worst_error']:+.0%}, {r['seconds']:.0f}s)",
                flush=True,
            )
    print(f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n")
    print(table(results))
    worst = max(abs(r["worst_error"]) for r in results)
    print(f"\nworst |measured / planned - 1| = {worst:.0%} (goal <= 25%)")
    by_name = {r["name"]: r for r in results}
    if "250M fp32 z3" in by_name and "250M fp32 1p" in by_name:
        ratio = max(by_name["250M fp32 z3"]["peak_mb"]) / by_name["250M fp32 1p"]["peak_mb"][0]
        print(f"ZeRO-3 fp32 250M: worst rank / one process = {ratio:.2f}x (goal <= 0.65x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
