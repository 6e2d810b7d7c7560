"""Per-rank peak host memory of ZeRO-3 on 2 CPU processes vs one process, for a ~300M-parameter model.

    python bench/zero3_memory.py [--quick] [--steps N]

Writes a Qwen2-shaped model with random weights (hidden 1024, 24 layers, intermediate 2816, 16 heads,
4 KV heads, vocab 32,000 tied: 304M parameters, fp32 safetensors), then continues pretraining it for a
few bf16 steps (the default precision) on the demo corpus twice, each in a fresh `python -m bumblecore train` process:

    one process:  micro batch 1 x accumulation 2
    ZeRO-3:       micro batch 1 x 2 processes (configs/deepspeed/ds_z3_config.json), the same global batch

Each run prints every rank's peak RSS (getrusage) at the end; the ratio is the worst ZeRO-3 rank over
the single process. Goal <= 0.6x: a rank that held a full fp32 copy (weights, gradients or Adam
moments) would show as ~1x. Both runs load the same checkpoint, so the loading path is measured too.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bumblecore" / "demo_data"
SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    intermediate_size=2816,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)
QUICK_SHAPE = dict(SHAPE, num_hidden_layers=8)
PRECISION = "bf16"


def write_model(directory: Path, shape: dict) -> int:
    import torch

    from bumblecore import Bumblebee, BumblebeeConfig
    from bumblecore.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = Bumblebee(BumblebeeConfig.from_preset("0.5B", torch_dtype="float32", **shape))
    model.save_pretrained(directory)
    load_tokenizer(DEMO / "tokenizer").save_pretrained(str(directory))
    return model.num_parameters()


def train(model: Path, out: Path, steps: int, extra: list[str], env: dict | None = None) -> tuple[list[float], float]:
    command = [
        sys.executable,
        "-m",
        "bumblecore",
        "train",
        "--training_stage",
        "continue_pretrain",
        "--model_name_or_path",
        str(model),
        "--dataset_path",
        str(DEMO / "pretrain.jsonl"),
        "--output_dir",
        str(out),
        "--cutoff_len",
        "128",
        "--max_steps",
        str(steps),
        "--train_micro_batch_size_per_gpu",
        "1",
        "--train_model_precision",
        PRECISION,
        "--save_steps",
        str(steps * 10),
        "--accelerator",
        "cpu",
        "--cache_dir",
        str(out.parent / "cache"),
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra) or 'one process'} failed:\n{done.stderr[-3000:]}")
    match = re.search(r"peak memory per rank: host RSS ([\d,]+ MB(?:, [\d,]+ MB)*)", done.stdout + done.stderr)
    if not match:
        raise RuntimeError("no peak memory line in the run's output")
    return [float(v.replace(",", "").removesuffix(" MB")) for v in match.group(1).split(", ")], seconds


def run(quick: bool = False, steps: int = 2, trim_malloc: bool = False) -> dict:
    shape = QUICK_SHAPE if quick else SHAPE
    # glibc keeps freed blocks of the sizes it saw freed last (its dynamic mmap threshold), so a
    # process's RSS can stay above what it holds; fixed thresholds return them (same for both runs).
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"} if trim_malloc else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parameters = write_model(work / "model", shape)
        one, one_seconds = train(work / "model", work / "one", steps, ["--gradient_accumulation_steps", "2"], env)
        zero3, zero3_seconds = train(
            work / "model",
            work / "zero3",
            steps,
            [
                "--gradient_accumulation_steps",
                "1",
                "--devices",
                "2",
                "--deepspeed_config_path",
                str(ROOT / "configs" / "deepspeed" / "ds_z3_config.json"),
            ],
            env,
        )
    return {
        "parameters": parameters,
        "steps": steps,
        "one_process_peak_rss_mb": one[0],
        "zero3_peak_rss_mb": zero3,
        "ratio": max(zero3) / one[0],
        "one_process_seconds": one_seconds,
        "zero3_seconds": zero3_seconds,
        "fp32_states_mb": parameters * 16 / 2**20,
        "trim_malloc": trim_malloc,
        "precision": PRECISION,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="per-rank peak RSS: ZeRO-3 on 2 CPU processes vs one process")
    parser.add_argument("--quick", action="store_true", help="8 layers instead of 24 (~120M parameters)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trim_malloc", action="store_true", help="fixed glibc malloc thresholds in both runs")
    args = parser.parse_args()
    r = run(args.quick, args.steps, args.trim_malloc)
    print(
        f"model: {r['parameters'] / 1e6:.0f}M parameters, {r['precision']}; fp32 weights + gradients + Adam = "
        f"{r['fp32_states_mb']:,.0f} MB; fixed malloc thresholds: {r['trim_malloc']}"
    )
    print(f"one process: peak RSS {r['one_process_peak_rss_mb']:,.0f} MB ({r['one_process_seconds']:.0f}s)")
    print(
        f"ZeRO-3, 2 processes: peak RSS per rank {', '.join(f'{v:,.0f} MB' for v in r['zero3_peak_rss_mb'])} "
        f"({r['zero3_seconds']:.0f}s)"
    )
    print(f"worst rank / one process = {r['ratio']:.2f}x (goal <= 0.6x)")


if __name__ == "__main__":
    main()
