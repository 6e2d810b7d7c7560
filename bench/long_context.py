"""The longest sample that trains under a fixed per-rank memory budget: one process vs sequence_parallel_size 2.

    python bench/long_context.py [--budgets tiny=770,100m=2800] [--max_len 65536]
    python bench/long_context.py --budgets 100m=4000 --fit 100m=3072,4096,6144   # fit, then confirm

For each model, one `bumblecore train` step (continue_pretrain, fp32, micro batch 1, one document per
row: every token attends to every earlier one) in a fresh process per probe:

    one process:        a plain run (no DeepSpeed)
    SP=2:               --devices 2 --sequence_parallel_size 2 under DeepSpeed ZeRO-0 (each rank holds half
                        of every row, and like the one process the whole weights, gradients and Adam states;
                        DeepSpeed's own runtime, ~130 MB more per rank here, counts against SP)

A probe's memory is the run's own last line, each rank's peak RSS (getrusage); every process runs one
intra-op thread (OMP_NUM_THREADS=1), so a rank's runtime is the same in both configurations. Both
sides run with `--release_freed_memory true` (fixed glibc malloc thresholds: freed blocks of 128 KiB or
more go back to the OS) unless `--malloc default`: with glibc's default, a rank's RSS keeps freed
activation blocks below its self-raised mmap threshold (up to 32 MiB), and an SP rank's tensors, half
the size, fall under it more often (bench/long_context_profile.py measures both views).

The search doubles the length from 1,024 while the worst rank stays under the budget, then bisects (to
1/8 of the bracket). With `--fit model=n1,n2,n3` it instead probes the one process at those lengths and
SP=2 at twice them (the same tokens per rank), fits peak(n) = a + b n by least squares on each side
(probes must be past the start-up floor: the step's Adam moments, made after the backward, set the
peak of short rows), predicts the longest length under the budget and confirms it: the prediction
rounded down to 256 must fit and 256 more must not (if not, it walks by 256, at most 4 probes). Reported per model and configuration: the longest length, its peak, the activation bytes per
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


def probe(model: Path, corpus: Path, work: Path, length: int, extra: list[str], malloc: str = "prompt") -> dict:
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
    if malloc == "prompt":  # the same malloc setting on both sides (module docstring)
        command += ["--release_freed_memory", "true"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"length {length} {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    match = re.search(r"peak memory per rank: host RSS ([\d,]+ MB(?:, [\d,]+ MB)*)", done.stdout + done.stderr)
    peaks = [float(v.replace(",", "").removesuffix(" MB")) for v in match.group(1).split(", ")]
    planned = re.search(r"\(planned ([\d,]+) MB\)", done.stdout + done.stderr)  # the memory plan, for one rank
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"length": length, "peak_mb": max(peaks), "peaks_mb": peaks, "tokens_per_sec": record["tokens_per_sec"],
            "loss": record["loss"], "seconds": seconds,
            "planned_mb": float(planned.group(1).replace(",", "")) if planned else None}  # fmt: skip


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


def fitted(measure, budget_mb: float, lengths: list[int], step: int = 256, known=None) -> tuple[dict, dict, tuple]:
    """(the longest probe under the budget, every probe by length, (a MB, b MB per token)): peak(n) = a + b n
    fitted to probes at `lengths`, the boundary predicted, then confirmed by a probe each side of it.
    `known`: probes already measured (length -> record), not run again."""
    probes = dict(known or {})
    probes.update({n: measure(n) for n in lengths if n not in probes})
    for n in lengths:
        print(f"    {n:>7} tokens: peak {probes[n]['peak_mb']:,.0f} MB (fit point)", flush=True)
    mean_n = sum(lengths) / len(lengths)
    mean_p = sum(probes[n]["peak_mb"] for n in lengths) / len(lengths)
    slope = sum((n - mean_n) * (probes[n]["peak_mb"] - mean_p) for n in lengths) / sum(
        (n - mean_n) ** 2 for n in lengths
    )
    intercept = mean_p - slope * mean_n
    predicted = int((budget_mb - intercept) / slope) // step * step
    print(f"    fit: {intercept:,.0f} MB + {slope * 1024:,.1f} KB/token; predicted longest {predicted:,}", flush=True)

    def fits(n: int) -> bool:
        if n not in probes:
            probes[n] = measure(n)
            print(f"    {n:>7} tokens: peak {probes[n]['peak_mb']:,.0f} MB (confirm)", flush=True)
        return probes[n]["peak_mb"] <= budget_mb

    good = predicted
    for _ in range(4):  # walk to the boundary: `good` fits and `good + step` does not
        if not fits(good):
            good -= step
        elif fits(good + step):
            good += step
        else:
            break
    return probes[good], probes, (intercept, slope)


def earlier_probes(path: str | None, model: str, config: str) -> dict:
    """Probes of an earlier run's --json (same model, config and malloc setting): length -> record."""
    if not path:
        return {}
    rows = [r for r in json.loads(Path(path).read_text()) if r["model"] == model and r["config"] == config]
    return {
        int(n): {
            "length": int(n),
            "peak_mb": mb,
            "tokens_per_sec": None,
            "loss": None,
            "planned_mb": r.get("planned", {}).get(n),
        }
        for r in rows
        for n, mb in r["probes"].items()
    }


def run(
    budgets: dict, max_len: int, fit: dict | None = None, malloc: str = "prompt", reuse: str | None = None
) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "long.jsonl"
        long_documents(corpus)
        for name, budget_mb in budgets.items():
            model = work / name
            parameters = write_model(model, SHAPES[name])
            found, fits_of = {}, {}
            for config, extra in CONFIGS.items():
                print(
                    f"{name} ({parameters / 1e6:.1f}M parameters), {config}, budget {budget_mb:,.0f} MB per rank:",
                    flush=True,
                )

                def measure(length, extra=extra, model=model):
                    return probe(model, corpus, work, length, extra, malloc)

                if fit and name in fit:  # SP at twice the lengths: the same tokens per rank
                    lengths = [n * (2 if config == "SP=2" else 1) for n in fit[name]]
                    known = earlier_probes(reuse, name, config)
                    best, probes, line = fitted(measure, budget_mb, lengths, known=known)
                else:
                    (best, probes), line = longest(measure, budget_mb, 1024, max_len, 256), None
                found[config] = (best, probes, measure)
                fits_of[config] = line

            def growth(
                config: str, length: int, found=found, fits_of=fits_of
            ) -> float:  # MB the peak grows from length / 2 to length
                if fits_of[config]:  # the fitted slope: no more probes
                    return fits_of[config][1] * length / 2
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
                    "fit": fits_of[config], "probes": {n: p["peak_mb"] for n, p in sorted(found[config][1].items())},
                    "planned": {n: p["planned_mb"] for n, p in sorted(found[config][1].items())},
                })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="longest sample under a per-rank budget: one process vs SP=2")
    parser.add_argument("--budgets", default="tiny=770,100m=2800", help="model=per-rank peak RSS budget in MB, ...")
    parser.add_argument("--max_len", type=int, default=65536, help="stop doubling here")
    parser.add_argument(
        "--fit",
        default="",
        help="model=n1,n2,n3;...: fit the peak at these lengths (SP at twice them), confirm the boundary",
    )
    parser.add_argument("--malloc", choices=["prompt", "default"], default="prompt",
                        help="prompt: --release_freed_memory true on both sides; default: glibc's own thresholds")  # fmt: skip
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--reuse", help="an earlier --json: its probes are taken as measured (e.g. the fit points)")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    budgets = {name: float(mb) for name, mb in (item.split("=") for item in args.budgets.split(","))}
    fit = {m: [int(n) for n in ns.split(",")] for m, ns in (i.split("=") for i in args.fit.split(";") if i)}
    rows = run(budgets, args.max_len, fit, args.malloc, args.reuse)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(
        "| model | config | budget per rank | longest sample under it | its peak per rank | activations per token | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} ({r['parameters'] / 1e6:.1f}M) | {r['config']} | {r['budget_mb']:,.0f} MB | {r['longest']:,} "
            f"| {r['peak_mb']:,.0f} MB | {r['activation_kb_per_token']:.1f} KB | {r['tokens_per_sec'] or 0:,.0f} |"
        )
        print(f"    probes: {', '.join(f'{n:,}: {mb:,.0f}' for n, mb in r['probes'].items())} MB; fit {r['fit']}")
    for name in dict.fromkeys(r["model"] for r in rows):
        r = next(r for r in rows if r["model"] == name)
        print(
            f"{name}: SP=2 trains {r['length_ratio']:.2f}x longer samples (goal >= 1.7x); per-rank activations at the "
            f"one process's longest length {r['activation_ratio']:.2f}x (goal <= 0.6x)"
        )


if __name__ == "__main__":
    main()
