"""Pretokenization: throughput (MB/s) and peak RSS for a 1x and a 4x corpus.

    python bench/pretokenize.py [--mb 16]

Each build runs in a fresh subprocess (so its peak RSS is its own) on a JSONL pretraining corpus
made by repeating the shipped demo corpus with numbered variations. Reported: MB/s of input JSON,
peak RSS of the whole process, and the peak above the process's RSS right before building (what
the data path itself adds). Goal: the 4x corpus stays within 1.2x the 1x peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bumblecore" / "demo_data"

CHILD = """
import json, resource, sys, time
from bumblecore.data.cache import build_cache
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[2])
before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
cache = build_cache(sys.argv[1], tokenizer, recipe_for("pretrain").reading, 2048, cache_dir=sys.argv[3], progress=False)
seconds = time.perf_counter() - started
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "tokens": cache.summary.tokens, "before_mb": before_kb / 1024, "peak_mb": peak_kb / 1024}))
"""


def make_corpus(path: Path, megabytes: float) -> int:
    documents = [json.loads(line)["text"] for line in open(DEMO / "pretrain.jsonl", encoding="utf-8")]
    target, written, i = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = json.dumps({"text": f"Part {i}. " + documents[i % len(documents)]}) + "\n"
            f.write(line)
            written += len(line.encode())
            i += 1
    return written


def measure(corpus: Path, workdir: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(DEMO / "tokenizer"), str(workdir / "cache")],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    stats["mb"] = corpus.stat().st_size / 1e6
    stats["mb_per_s"] = stats["mb"] / stats["seconds"]
    return stats


def run(megabytes: float = 16.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for scale in (1, 4):
            corpus = tmp / f"corpus_{scale}x.jsonl"
            make_corpus(corpus, megabytes * scale)
            results[f"{scale}x"] = measure(corpus, tmp / f"work{scale}")
    one, four = results["1x"], results["4x"]
    results["rss_ratio"] = four["peak_mb"] / one["peak_mb"]
    results["added_rss_ratio"] = (four["peak_mb"] - four["before_mb"]) / max(1e-9, one["peak_mb"] - one["before_mb"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="pretokenization throughput and peak memory")
    parser.add_argument("--mb", type=float, default=16.0, help="size of the 1x corpus in MB")
    args = parser.parse_args()
    results = run(args.mb)
    for scale in ("1x", "4x"):
        r = results[scale]
        print(
            f"{scale}: {r['mb']:.1f} MB, {r['tokens']:,} tokens in {r['seconds']:.1f}s = {r['mb_per_s']:.2f} MB/s; "
            f"peak RSS {r['peak_mb']:.0f} MB ({r['peak_mb'] - r['before_mb']:.0f} MB above start)"
        )
    print(
        f"peak RSS 4x / 1x = {results['rss_ratio']:.3f} (goal <= 1.2); added by the build 4x / 1x = {results['added_rss_ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
