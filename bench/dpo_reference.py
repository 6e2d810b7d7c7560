"""DPO: a live frozen reference vs reference log-probs computed once and cached, in one run.

    python bench/dpo_reference.py [--quick]

Full fine-tuning DPO on the shipped demo preference pairs, the same randomly initialised
Qwen2-shaped model (4 layers, hidden 256, vocabulary 151,936), fp32 on CPU, micro batch 8. Each side
runs in its own process (its peak RSS is its own):
- live:   precompute_ref_log_probs false: a frozen copy of the model runs a forward every step.
- cached: precompute_ref_log_probs true: one pass over the pairs before training (timed on its
          own), then steps read the reference log-probs from the table beside the token cache.
Reported: mean optimiser-step time (first step left out), peak RSS, the one-off precompute time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bumblecore" / "demo_data"
VOCAB = 151936


def write_model(directory: Path) -> None:
    from train_sft import write_model as write_qwen2  # bench/ is on sys.path: this script's own folder

    write_qwen2(directory, hidden_size=256, intermediate_size=768, num_hidden_layers=4)


def child(which: str, model: str, data: str, out: str, steps: int) -> None:
    from bumblecore.cli import main

    started = time.perf_counter()
    main(
        [
            "train",
            "--training_stage",
            "dpo",
            "--model_name_or_path",
            model,
            "--dataset_path",
            data,
            "--output_dir",
            out,
            "--cutoff_len",
            "256",
            "--max_steps",
            str(steps),
            "--train_micro_batch_size_per_gpu",
            "8",
            "--gradient_accumulation_steps",
            "1",
            "--train_model_precision",
            "fp32",
            "--learning_rate",
            "1e-5",
            "--save_steps",
            "100000",
            "--accelerator",
            "cpu",
            "--cache_dir",
            str(Path(out) / "cache"),
            "--precompute_ref_log_probs",
            "true" if which == "cached" else "false",
        ]
    )
    wall = time.perf_counter() - started
    history = [json.loads(l) for l in open(Path(out) / "metrics.jsonl") if "loss" in json.loads(l)]
    step_seconds = [r["tokens"] / r["tokens_per_sec"] for r in history]
    timed = step_seconds[1:] or step_seconds
    print(
        "RESULT "
        + json.dumps(
            {
                "step_seconds": sum(timed) / len(timed),
                "train_seconds": sum(step_seconds),
                "wall_seconds": wall,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "first_loss": history[0]["loss"],
            }
        )
    )


def measure(which: str, model: Path, data: Path, work: Path, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", which, str(model), str(data), str(work / which), str(steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{done.stderr[-3000:]}")
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def run(quick: bool = False) -> dict:
    steps, pairs = (8, 200) if quick else (24, 600)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_model(work / "model")
        data = work / "pairs.jsonl"
        data.write_text("\n".join(open(DEMO / "dpo_train.jsonl", encoding="utf-8").read().splitlines()[:pairs]) + "\n")
        results = {which: measure(which, work / "model", data, work, steps) for which in ("live", "cached")}
    results["pairs"] = pairs
    results["step_time_ratio"] = results["cached"]["step_seconds"] / results["live"]["step_seconds"]
    results["memory_ratio"] = results["cached"]["peak_rss_mb"] / results["live"]["peak_rss_mb"]
    # The one-off pass over every pair: the cached run's wall time beyond its steps, less the live run's
    # own start-up (the same model loading, tokenizing and export).
    results["precompute_seconds"] = (results["cached"]["wall_seconds"] - results["cached"]["train_seconds"]) - (
        results["live"]["wall_seconds"] - results["live"]["train_seconds"]
    )
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        which, model, data, out, steps = sys.argv[2:7]
        child(which, model, data, out, int(steps))
        return
    parser = argparse.ArgumentParser(description="DPO step time and memory: live vs cached reference log-probs")
    parser.add_argument("--quick", action="store_true", help="fewer steps and pairs")
    results = run(parser.parse_args().quick)
    for which in ("live", "cached"):
        r = results[which]
        print(
            f"{which:7s} step {r['step_seconds'] * 1000:7.1f} ms, peak RSS {r['peak_rss_mb']:6.0f} MB, first loss {r['first_loss']:.6f}"
        )
    print(
        f"cached / live step time = {results['step_time_ratio']:.2f}x, peak memory = {results['memory_ratio']:.2f}x; "
        f"precompute over {results['pairs']} pairs took about {results['precompute_seconds']:.1f}s once"
    )


if __name__ == "__main__":
    main()
