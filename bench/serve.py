"""Serving throughput: 16 concurrent streaming clients vs the same 16 requests one at a time, and
serving efficiency: what the API delivers against the engine's own batch of the same prompts.

    python bench/serve.py [--clients 16] [--max_tokens 64] [--quick]

Starts `bumblecore serve` in a subprocess on loopback with a random Qwen2-shaped model (4 layers,
hidden 256, the demo tokenizer's vocabulary), then sends the same requests (streaming, greedy,
ignore_eos, fixed max_tokens, so every request generates exactly max_tokens tokens) first one after
another, then all at once. Reported: aggregate completion tokens/s of each and their ratio (goal >= 4x).

Efficiency: a tiny model (hidden 64, 2 layers), so the per-token cost of serving is not hidden
behind the model's: the same prompts go through GenerationEngine.generate in this process (the
baseline) and through the API as concurrent streaming and non-streaming clients. Each repeat runs
all three back to back and takes their ratios; the medians are reported (other load on the machine
moves all three of one repeat alike). Goal: >= 0.5 for both. The server runs with its defaults
(`--stream_interval 0.02`); `efficiency(..., options=("--stream_interval", "0"))` tries others.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the in-process serving harness lives with the tests
from serving import free_port, wait_until_healthy  # noqa: E402


def build_model(directory: Path, hidden: int = 256, layers: int = 4) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ROOT / "bumblecore" / "demo_data" / "tokenizer")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8 if hidden >= 256 else 4,
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


def messages(index: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {index}: tell me about bees."}]


def light_request(port: int, index: int, max_tokens: int, stream: bool) -> int:
    """One request on a bare http.client connection (a light client: the bench's own CPU use
    competes with the server's); returns its completion tokens, from the usage chunk or field."""
    body = {
        "model": "bumblebee",
        "messages": messages(index),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()[:200]!r}")
        if not stream:
            return json.loads(reply.read())["usage"]["completion_tokens"]
        tokens = 0
        for line in reply:  # http.client undoes the chunked framing; SSE events are "data: ..." lines
            if line.startswith(b'data: {"') and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
        return tokens
    finally:
        connection.close()


def served(port: int, clients: int, max_tokens: int, stream: bool) -> float:
    """Completion tokens/s of `clients` concurrent requests."""
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        counts = list(pool.map(lambda i: light_request(port, i, max_tokens, stream), range(clients)))
        seconds = time.perf_counter() - started
    assert all(c == max_tokens for c in counts), counts
    return sum(counts) / seconds


def start_server(
    model_dir: Path, port: int, clients: int, threads: int | None = None, options: tuple = ()
) -> subprocess.Popen:
    """`options`: more `bumblecore serve` flags (e.g. ("--stream_interval", "0"))."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the worker
    return subprocess.Popen(
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
            *options,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far; 0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def efficiency(clients: int, max_tokens: int, repeats: int, options: tuple = ()) -> dict:
    """Served tok/s (streaming, non-streaming) over the engine's own tok/s for the same prompts."""
    import torch

    from bumblecore.inference.commands import build_prompt_ids
    from bumblecore.inference.generate import GenerationEngine, SamplingParams
    from bumblecore.inference.loading import load_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        build_model(model_dir, hidden=64, layers=2)
        port = free_port()
        # One torch thread on both sides (bench/run_all.py's choice for generate): a tiny model runs
        # fastest so on a shared 2-core box, and the comparison is of like with like.
        process = start_server(model_dir, port, clients, threads=1, options=options)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model, tokenizer, eos = load_for_inference(str(model_dir), "auto", device)
            prompts = [build_prompt_ids(tokenizer, messages(i)) for i in range(clients)]
            params = SamplingParams(max_new_tokens=max_tokens, do_sample=False, ignore_eos=True)
            engine = GenerationEngine(model, tokenizer, clients, 2048, eos_token_ids=eos)

            def engine_tok_s() -> float:
                started = time.perf_counter()
                results = engine.generate(prompts, params)
                seconds = time.perf_counter() - started
                assert all(len(r["token_ids"]) == max_tokens for r in results)
                return clients * max_tokens / seconds

            engine_tok_s()  # warm-up
            wait_until_healthy(f"http://127.0.0.1:{port}", lambda: process.poll() is None, timeout=180)
            served(port, clients, 8, True)  # warm-up
            served(port, clients, 8, False)
            rows = []
            for _ in range(repeats):
                base = engine_tok_s()
                cpu = tree_cpu_seconds(process.pid)
                stream = served(port, clients, max_tokens, True)
                cpu_stream = tree_cpu_seconds(process.pid) - cpu
                nonstream = served(port, clients, max_tokens, False)
                rows.append((base, stream, nonstream, stream / base, nonstream / base, cpu_stream))
        finally:
            torch.set_num_threads(threads)
            stop_server(process)
    median = [statistics.median(column) for column in zip(*rows)]
    return {
        "engine_tok_s": median[0],
        "served_stream_tok_s": median[1],
        "served_nonstream_tok_s": median[2],
        "efficiency_stream": median[3],
        "efficiency_nonstream": median[4],
        # the server's CPU (both processes) per 1,000 streamed completion tokens
        "server_cpu_ms_per_1k_stream_tokens": 1e6 * median[5] / (clients * max_tokens),
    }


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
        process = start_server(model_dir, port, clients)
        try:
            wait_until_healthy(url, lambda: process.poll() is None, timeout=180)
            measure(url, 2, 8, at_once=False)  # warm-up
            sequential = min(measure(url, clients, max_tokens, at_once=False)[0] for _ in range(repeats))
            together = min(measure(url, clients, max_tokens, at_once=True)[0] for _ in range(repeats))
        finally:
            stop_server(process)
    tokens = clients * max_tokens
    # Efficiency always at 16 clients x 64 tokens (quick: fewer repeats): the figure issue 20 asks for.
    served_vs_engine = efficiency(16, 64, 3 if quick else max(repeats, 5))
    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "sequential_seconds": sequential,
        "concurrent_seconds": together,
        "sequential_tok_s": tokens / sequential,
        "concurrent_tok_s": tokens / together,
        "ratio": sequential / together,
        **served_vs_engine,
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
    print(
        f"efficiency (tiny model, 16 x 64 tokens, median ratios): engine {r['engine_tok_s']:.0f} tok/s; "
        f"served streaming {r['served_stream_tok_s']:.0f} tok/s = {r['efficiency_stream']:.2f}, "
        f"non-streaming {r['served_nonstream_tok_s']:.0f} tok/s = {r['efficiency_nonstream']:.2f} (goal >= 0.5); "
        f"server CPU {r['server_cpu_ms_per_1k_stream_tokens']:.0f} ms per 1k streamed tokens"
    )


if __name__ == "__main__":
    main()
