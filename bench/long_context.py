"""The longest sample that trains under a fixed per-rank memory budget: one process vs sequence_parallel_size 2.

    python bench/long_context.py [--budgets tiny=770,100m=2800] [--max_len 65536]

For each model, one `bumblecore train` step (continue_pretrain, fp32, micro batch 1, one document per
row: every token attends to every earlier one) in a fresh process per probe:

    one process:        a plain run (no DeepSpeed)
    SP=2:               --devices 2 --sequence_parallel_size 2 under DeepSpeed ZeRO-0 (each rank holds half
                        of every row, and like the one process the whole weights, gradients and Adam states;
                        DeepSpeed's own runtime, ~130 MB more per rank here, counts against SP)

A probe's memory is the run's own last line, each rank's peak RSS (getrusage); every process runs one
intra-op thread (OMP_NUM_THREADS=1), so a rank's runtime is the same in both configurations. The search
doubles the length from 1,024 while the worst rank stays under the budget, then bisects (to 1/8 of the
bracket). Reported per model and configuration: the longest length, its peak, the activation bytes per
token (the peak's growth from half that length to it, per token: the start-up peaks cancel) and
tokens/s of the step; and the ratio of per-rank activation memory SP=2 / one process, the same growth
measured from half the one process's longest length to it. Goals: <= 0.6x activations, >= 1.7x the
longest sample.

Models (random weights, the demo tokenizer): tiny (2 layers, hidden 32, 4/2 heads, vocab 768) and
100m (hidden 768, 8 layers, intermediate 2048, 12 query / 4 KV heads, vocab 32,000 untied: 99M).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zero3_memory import write_model  # noqa: E402  (a random Bumblebee of a shape, with the demo tokenizer)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bumblecore" / "demo_data"
ZERO0 = ROOT / "configs" / "deepspeed" / "ds_z0_config.json"
SHAPES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=768),
    "100m": dict(hidden_size=768, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}  # fmt: skip
CONFIGS = {
    "one process": [],
    "SP=2": ["--devices", "2", "--sequence_parallel_size", "2", "--deepspeed_config_path", str(ZERO0)],
}


def long_documents(path: Path, documents: int = 4, characters: int = 600_000) -> None:
    """A corpus of a few long documents (the demo texts back to back): rows of any length are one document."""
    texts = [json.loads(line)["text"] for line in (DEMO / "pretrain.jsonl").read_text().splitlines()]
    corpus = " ".join(texts)
    with path.open("w") as out:
        for d in range(documents):
            start = (d * characters) % max(1, len(corpus) - characters)
            text = (corpus * (1 + characters // len(corpus)))[start : start + characters]
            out.write(json.dumps({"text": text}) + "\n")


def probe(model: Path, corpus: Path, work: Path, length: int, extra: list[str]) -> dict:
    """One training step at `length` tokens: every rank's peak RSS (MB), tokens/s, wall seconds."""
    out = work / f"run-{length}-{len(extra)}"
    command = [
        sys.executable, "-m", "bumblecore", "train", "--training_stage", "continue_pretrain",
        "--model_name_or_path", str(model), "--dataset_path", str(corpus), "--output_dir", str(out),
        "--cutoff_len", str(length), "--max_steps", "1", "--train_micro_batch_size_per_gpu", "1",
        "--gradient_accumulation_steps", "1", "--train_model_precision", "fp32", "--save_steps", "100",
        "--accelerator", "cpu", "--report_to", "none", "--cache_dir", str(work / "cache"),
        "--overwrite_output_dir", "true", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"length {length} {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    match = re.search(r"peak memory per rank: host RSS ([\d,]+ MB(?:, [\d,]+ MB)*)", done.stdout + done.stderr)
    peaks = [float(v.replace(",", "").removesuffix(" MB")) for v in match.group(1).split(", ")]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"length": length, "peak_mb": max(peaks), "peaks_mb": peaks, "tokens_per_sec": record["tokens_per_sec"],
            "loss": record["loss"], "seconds": seconds}  # fmt: skip


def longest(measure, budget_mb: float, start: int, max_len: int, step: int) -> tuple[dict, dict]:
    """(the longest probe under the budget, every probe by length): doubling, then bisection."""
    probes: dict[int, dict] = {}

    def fits(length: int) -> bool:
        if length not in probes:
            probes[length] = measure(length)
            print(f"    {length:>7} tokens: peak {probes[length]['peak_mb']:,.0f} MB", flush=True)
        return probes[length]["peak_mb"] <= budget_mb

    good, bad = None, None
    length = start
    while length <= max_len:
        if not fits(length):
            bad = length
            break
        good, length = length, length * 2
    if good is None:
        raise RuntimeError(f"even {start} tokens exceed {budget_mb} MB")
    if bad is not None:
        resolution = max(step, (bad - good) // 8 // step * step)
        while bad - good > resolution:
            middle = (good + bad) // 2 // step * step
            if fits(middle):
                good = middle
            else:
                bad = middle
    return probes[good], probes


def run(budgets: dict, max_len: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "long.jsonl"
        long_documents(corpus)
        for name, budget_mb in budgets.items():
            model = work / name
            parameters = write_model(model, SHAPES[name])
            found = {}
            for config, extra in CONFIGS.items():
                print(
                    f"{name} ({parameters / 1e6:.1f}M parameters), {config}, budget {budget_mb:,.0f} MB per rank:",
                    flush=True,
                )

                def measure(length, extra=extra, model=model):
                    return probe(model, corpus, work, length, extra)

                best, probes = longest(measure, budget_mb, 1024, max_len, 256)
                found[config] = (best, probes, measure)

            def growth(config: str, length: int, found=found) -> float:  # MB the peak grows from length / 2 to length
                _, probes, measure = found[config]
                for at in (length // 2, length):
                    if at not in probes:
                        probes[at] = measure(at)
                return probes[length]["peak_mb"] - probes[length // 2]["peak_mb"]

            one_longest = found["one process"][0]["length"]
            ratio = growth("SP=2", one_longest) / max(1e-9, growth("one process", one_longest))
            for config, (best, _, _) in found.items():
                rows.append({
                    "model": name, "parameters": parameters, "config": config, "budget_mb": budget_mb,
                    "longest": best["length"], "peak_mb": best["peak_mb"],
                    "activation_kb_per_token": growth(config, best["length"]) * 1024 / (best["length"] / 2),
                    "tokens_per_sec": best["tokens_per_sec"], "loss": best["loss"],
                    "length_ratio": found["SP=2"][0]["length"] / one_longest, "activation_ratio": ratio,
                })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="longest sample under a per-rank budget: one process vs SP=2")
    parser.add_argument("--budgets", default="tiny=770,100m=2800", help="model=per-rank peak RSS budget in MB, ...")
    parser.add_argument("--max_len", type=int, default=65536, help="stop doubling here")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    budgets = {name: float(mb) for name, mb in (item.split("=") for item in args.budgets.split(","))}
    rows = run(budgets, args.max_len)
    print(
        "| model | config | budget per rank | longest sample under it | its peak per rank | activations per token | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} ({r['parameters'] / 1e6:.1f}M) | {r['config']} | {r['budget_mb']:,.0f} MB | {r['longest']:,} "
            f"| {r['peak_mb']:,.0f} MB | {r['activation_kb_per_token']:.1f} KB | {r['tokens_per_sec']:,.0f} |"
        )
    for name in dict.fromkeys(r["model"] for r in rows):
        r = next(r for r in rows if r["model"] == name)
        print(
            f"{name}: SP=2 trains {r['length_ratio']:.2f}x longer samples (goal >= 1.7x); per-rank activations at the "
            f"one process's longest length {r['activation_ratio']:.2f}x (goal <= 0.6x)"
        )


if __name__ == "__main__":
    main()
