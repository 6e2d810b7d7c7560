"""Serving throughput: 16 concurrent streaming clients vs the same 16 requests one at a time.

    python bench/serve.py [--clients 16] [--max_tokens 64] [--quick]

Starts `bumblecore serve` in a subprocess on loopback with a random Qwen2-shaped model (4 layers,
hidden 256, the demo tokenizer's vocabulary), then sends the same requests (streaming, greedy,
ignore_eos, fixed max_tokens, so every request generates exactly max_tokens tokens) first one after
another, then all at once. Reported: aggregate completion tokens/s of each and their ratio (goal >= 4x).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the in-process serving harness lives with the tests
from serving import free_port, wait_until_healthy  # noqa: E402


def build_model(directory: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "bumblecore" / "demo_data" / "tokenizer")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))


def stream_one(url: str, index: int, max_tokens: int) -> int:
    """One streaming request; returns its completion tokens (from the usage chunk)."""
    body = {
        "model": "bumblebee",
        "messages": [{"role": "user", "content": f"Request {index}: tell me about bees."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


def measure(url: str, clients: int, max_tokens: int, at_once: bool) -> tuple[float, int]:
    started = time.perf_counter()
    if at_once:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            counts = list(pool.map(lambda i: stream_one(url, i, max_tokens), range(clients)))
    else:
        counts = [stream_one(url, i, max_tokens) for i in range(clients)]
    seconds = time.perf_counter() - started
    assert all(c == max_tokens for c in counts), counts
    return seconds, sum(counts)


def run(
    quick: bool = False, clients: int | None = None, max_tokens: int | None = None, repeats: int | None = None
) -> dict:
    """Sequential vs concurrent completion tokens/s; --quick defaults: 8 clients, 16 tokens, one run."""
    clients = clients or (8 if quick else 16)
    max_tokens = max_tokens or (16 if quick else 64)
    repeats = repeats or (1 if quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bumblecore",
                "serve",
                "--model_path",
                str(model_dir),
                "--port",
                str(port),
                "--max_batch_size",
                str(clients),
                "--log_level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_healthy(url, lambda: process.poll() is None, timeout=180)
            measure(url, 2, 8, at_once=False)  # warm-up
            sequential = min(measure(url, clients, max_tokens, at_once=False)[0] for _ in range(repeats))
            together = min(measure(url, clients, max_tokens, at_once=True)[0] for _ in range(repeats))
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    tokens = clients * max_tokens
    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "sequential_seconds": sequential,
        "concurrent_seconds": together,
        "sequential_tok_s": tokens / sequential,
        "concurrent_tok_s": tokens / together,
        "ratio": sequential / together,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=None, help="default 16 (quick 8)")
    parser.add_argument("--max_tokens", type=int, default=None, help="default 64 (quick 16)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs of each mode; the best is reported (default 3, quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="8 clients, 16 tokens, one run")
    args = parser.parse_args()
    r = run(args.quick, args.clients, args.max_tokens, args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads default")
    print(f"{r['clients']} requests x {r['max_tokens']} tokens (streaming, greedy, ignore_eos), best of {r['repeats']}")
    print(f"one at a time: {r['sequential_seconds']:.2f} s, {r['sequential_tok_s']:.1f} completion tokens/s")
    print(
        f"{r['clients']} concurrent: {r['concurrent_seconds']:.2f} s, {r['concurrent_tok_s']:.1f} completion tokens/s"
    )
    print(f"ratio: {r['ratio']:.2f}x (goal: >= 4x with the defaults, 16 clients x 64 tokens)")


if __name__ == "__main__":
    main()
