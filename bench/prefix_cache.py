"""Prefix reuse: time to first token of a chat's second turn, cold vs continuing the cached history.

    python bench/prefix_cache.py [--quick] [--threads N] [--server]

A random Qwen2-shaped model (4 layers, hidden 256, vocabulary 32,000: bench/generate.py's build()).
Turn 1 is a system prompt and a long user message rendered with the chat template (~900 tokens);
the engine answers it with `completion_tokens` greedy tokens. Turn 2 is that history (prompt +
completion, as a chat client sends it back) and a short new user message, ~1,000 tokens in all.
Cold: an engine without a prefix cache prefills all of it. Warm: the engine that answered turn 1,
with its prefix cache (the default 256 MiB), prefills only what is not stored.

TTFT is the wall time from `add` to the step that returns the request's first token (prefill, the
first token's choice and that step's decode, as a server sees it), and this process's CPU time for
the same span (`time.process_time`, which other processes on a shared machine do not inflate; with
one thread it is the work done). Each repeat uses a new conversation and an emptied store, cold and
warm in alternating order; reported are medians, and the goal is warm <= 0.3x cold.
`--server` measures the same through `bumblecore serve` too (run_server).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from generate import build  # noqa: E402  (the benchmark model of bench/generate.py)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _conversation(tokenizer, seed: int, words: int):
    """Turn 1's prompt ids and the ids that follow the completion in turn 2 (end of the reply, the
    new user message, the assistant prompt), rendered with the chat template."""
    from bumblecore.inference.commands import build_prompt_ids

    rng = torch.Generator().manual_seed(seed)
    vocabulary = ["bee", "hive", "honey", "flower", "data", "model", "token", "garden", "summer", "pollen", "wax"]
    text = " ".join(vocabulary[i] for i in torch.randint(0, len(vocabulary), (words,), generator=rng).tolist())
    first = build_prompt_ids(tokenizer, [{"role": "user", "content": text}], "sft", "You are a helpful assistant.")
    follow = tokenizer("<|im_end|>\n<|im_start|>user\nAnd what about the wax?<|im_end|>\n<|im_start|>assistant\n")
    return first, follow["input_ids"]


def _first_token(engine, prompt, params) -> tuple[float, float]:
    """(wall seconds, CPU seconds) from add to the step that yields the request's first token."""
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    request = engine.add(prompt, params, live_text=False)
    while not any(e.request_id == request for e in engine.step()):
        pass
    _sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    engine.cancel(request)
    return wall, cpu


def run(quick: bool = False, threads: int = 1) -> dict:
    from bumblecore.inference.generate import GenerationEngine, SamplingParams
    from bumblecore.inference.serve_settings import DEFAULT_PREFIX_CACHE_MB
    from bumblecore.tokenizer import load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats, completion_tokens, words = (3, 64, 360) if quick else (9, 128, 335)
    with tempfile.TemporaryDirectory() as tmp:
        _, model = build(Path(tmp), device)
        tokenizer = load_tokenizer(tmp)
    max_len = 2048
    warm = GenerationEngine(model, tokenizer, 1, max_len, eos_token_ids=[], prefix_cache_mb=DEFAULT_PREFIX_CACHE_MB)
    cold = GenerationEngine(model, tokenizer, 1, max_len, eos_token_ids=[])
    reply = SamplingParams(max_new_tokens=completion_tokens, ignore_eos=True)
    ttft = SamplingParams(max_new_tokens=16, ignore_eos=True)

    def second_turn(seed: int):
        first, follow = _conversation(tokenizer, seed, words)
        completion = warm.generate([first], reply)[0]["token_ids"]  # turn 1, which the store keeps
        return first + completion + follow

    second_turn(0)  # warm-up: first calls of each engine (allocations, kernels) are slower
    _first_token(cold, second_turn(0), ttft)
    samples = {"cold": [], "warm": []}
    history = 0
    for repeat in range(repeats):
        warm.prefix_cache.clear()
        prompt = second_turn(1000 + repeat)
        history = len(prompt)
        reused_before = warm.prefix_cache.stats["hit_tokens"]
        order = ("cold", "warm") if repeat % 2 == 0 else ("warm", "cold")
        for kind in order:
            samples[kind].append(_first_token(cold if kind == "cold" else warm, prompt, ttft))
        reused = warm.prefix_cache.stats["hit_tokens"] - reused_before
    median = {k: [statistics.median(s[i] for s in v) for i in (0, 1)] for k, v in samples.items()}
    return {
        "cold_ttft_s": median["cold"][0],
        "warm_ttft_s": median["warm"][0],
        "ratio": median["warm"][0] / median["cold"][0],
        "cold_ttft_cpu_s": median["cold"][1],
        "warm_ttft_cpu_s": median["warm"][1],
        "ratio_cpu": median["warm"][1] / median["cold"][1],
        "history_tokens": history,
        "reused_tokens": reused,
        "repeats": repeats,
        "device": device.type,
        "threads": torch.get_num_threads(),
    }


def run_server(quick: bool = False) -> dict:
    """The same through `bumblecore serve` (one slot, one torch thread in its worker): TTFT is a
    non-streaming request's wall time with max_tokens 1 (HTTP, rendering and tokenizing included).
    Cold: a conversation's second turn sent first; warm: the same after its first turn was answered
    (the client sends the reply's text back, which the template re-tokenizes)."""
    import os

    import requests

    sys.path.insert(0, str(ROOT / "tests"))
    from serving import running_server

    os.environ["OMP_NUM_THREADS"] = "1"  # the worker process is spawned: it reads this at start
    repeats, words = (3, 400) if quick else (7, 400)
    samples = {"cold": [], "warm": []}
    prompt_tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), torch.device("cpu"))
        with running_server(tmp, max_batch_size=1, max_model_len=2048, device_map="cpu") as url:

            def ask(messages, max_tokens):
                started = time.perf_counter()
                body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
                reply = requests.post(url + "/v1/chat/completions", json=body, timeout=120).json()
                return time.perf_counter() - started, reply

            def conversation(seed, reverse=False):
                rng = torch.Generator().manual_seed(seed)
                pool = ["bee", "hive", "honey", "flower", "data", "model", "token", "garden", "summer", "wax"]
                chosen = [pool[i] for i in torch.randint(0, len(pool), (words,), generator=rng).tolist()]
                text = " ".join(chosen[::-1] if reverse else chosen)
                return [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": text},
                ]

            def second(messages, reply):
                answer = {"role": "assistant", "content": reply["choices"][0]["message"]["content"]}
                return messages + [answer, {"role": "user", "content": "And what about the wax?"}]

            first = conversation(0)
            ask(second(first, ask(first, 64)[1]), 1)  # warm-up
            for repeat in range(repeats):
                warm_turn = conversation(100 + repeat)
                _, reply = ask(warm_turn, 64)
                # Cold: a second turn whose history the server never saw (only the system prompt's
                # first block is stored), as long as the warm one (the same words, reversed).
                cold_turn = second(conversation(100 + repeat, reverse=True), reply)
                for kind in ("cold", "warm") if repeat % 2 == 0 else ("warm", "cold"):
                    turn = cold_turn if kind == "cold" else second(warm_turn, reply)
                    elapsed, answer = ask(turn, 1)
                    samples[kind].append(elapsed)
                    prompt_tokens[kind] = answer["usage"]["prompt_tokens"]
    cold, warm = statistics.median(samples["cold"]), statistics.median(samples["warm"])
    return {
        "server_cold_ttft_s": cold,
        "server_warm_ttft_s": warm,
        "server_ratio": warm / cold,
        "server_history_tokens": prompt_tokens["warm"],
        "server_cold_prompt_tokens": prompt_tokens["cold"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--server", action="store_true", help="also measure through bumblecore serve (CPU)")
    args = parser.parse_args()
    result = run(args.quick, args.threads)
    if args.server:
        result.update(run_server(args.quick))
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"goal warm/cold <= 0.3: {'met' if result['ratio'] <= 0.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
