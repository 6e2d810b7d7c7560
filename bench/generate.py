"""Greedy decode tokens/s: bumblecore vs transformers `generate`, same model and prompts.

    python bench/generate.py [--quick] [--threads N] [--budget SECONDS]

A random Qwen2-shaped model (4 layers, hidden 256, vocabulary 32,000) on this machine's device.
Both generate exactly `new_tokens` tokens per prompt (end-of-sequence ignored), greedy. Reported:
batch 1 tokens/s for both (goal: bumblecore >= 1.5x transformers on CPU, >= 3x on GPU), batch 16
aggregate tokens/s for both (transformers left-padded; goal: bumblecore >= 2x) and bumblecore's
batch 16 vs its batch 1 (goal >= 8x).

Built for a shared, noisy machine: the four contenders (transformers batch 1, bumblecore batch 1,
transformers batch 16, bumblecore batch 16) run in rounds, one after another, in alternating order; every run records the
time of each decode step (transformers' through a streamer, which `generate` calls once per token),
so a step that another process delayed does not move the median. Each step is timed twice: wall
clock, and this process's CPU time (`time.process_time`, which does not count the time other
processes held the cores; with one thread it is the work a step costs). Ratios are medians of
per-round ratios (the contenders of one round saw about the same load); end-to-end wall times
(prefill included) are reported too. Rounds stop when the time budget is spent (at least 3 rounds).

One torch thread by default: on a shared machine a two-thread OpenMP team stalls whenever another
process holds one of the cores (each op waits for the descheduled thread; measured 250 ms decode steps
instead of 11 ms on the 2-core CI box), which swamps any difference between the contenders.
`--threads 0` keeps torch's default (all cores) for an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(directory: Path, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bumblecore import Bumblebee
    from bumblecore.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    hf = Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(directory)
    load_tokenizer(ROOT / "bumblecore" / "demo_data" / "tokenizer").save_pretrained(str(directory))
    return hf.to(device), Bumblebee.from_pretrained(directory).to(device).eval()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """A transformers streamer that only notes when each token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value):
        _sync()
        self.stamps.append((time.perf_counter(), time.process_time()))

    def end(self):
        pass


def left_pad(prompts: list[list[int]], device, pad_id: int = 0):
    """(ids, attention_mask) with each prompt right-aligned, as transformers batches decoder-only prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def run(quick: bool = False, budget: float | None = None) -> dict:
    from bumblecore.inference.generate import GenerationEngine, SamplingParams
    from bumblecore.tokenizer import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    new_tokens, prompt_len = (32, 32) if quick else (128, 64)
    budget = budget if budget is not None else (30.0 if quick else 120.0)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(Path(tmp), device)
        tokenizer = load_tokenizer(tmp)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (prompt_len,), generator=g).tolist() for _ in range(16)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engines = {
        n: GenerationEngine(ours, tokenizer, max_batch_size=n, max_len=prompt_len + new_tokens + 1, eos_token_ids=[])
        for n in (1, 16)
    }

    def ours_run(n):
        """(end-to-end seconds, decode step seconds): the same add/step loop as engine.generate."""
        engine = engines[n]
        _sync()
        started = time.perf_counter()
        for prompt in prompts[:n]:
            engine.add(prompt, params, live_text=False)
        stamps = []
        while engine.active:
            engine.step()
            _sync()
            stamps.append((time.perf_counter(), time.process_time()))
        # The first step prefills and picks token 1; each later step decodes one token per row.
        return stamps[-1][0] - started, stamps[1:], stamps[2:]

    def hf_run(n=1):
        clock = StepClock()
        # Left padding, as a batch must be padded for generate (the bench's prompts are equally long,
        # so the mask is all ones; it is passed so generate takes its batched, masked path).
        ids, mask = left_pad(prompts[:n], device)
        _sync()
        started = time.perf_counter()
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                streamer=clock,
            )
        # stamps: prompt, then one per new token (the first after prefill).
        return clock.stamps[-1][0] - started, clock.stamps[1:], clock.stamps[2:]

    contenders = {
        "transformers_b1": hf_run,
        "bumblecore_b1": lambda: ours_run(1),
        "transformers_b16": lambda: hf_run(16),
        "bumblecore_b16": lambda: ours_run(16),
    }
    batch = {"transformers_b1": 1, "bumblecore_b1": 1, "transformers_b16": 16, "bumblecore_b16": 16}
    for fn in contenders.values():  # warm-up
        fn()
    rounds: list[dict] = []
    started = time.perf_counter()
    while len(rounds) < 3 or time.perf_counter() - started < budget:
        names = list(contenders) if len(rounds) % 2 == 0 else list(reversed(contenders))
        record = {}
        for name in names:
            total, before, after = contenders[name]()
            wall = statistics.median(b[0] - a[0] for a, b in zip(before, after))
            cpu = statistics.median(b[1] - a[1] for a, b in zip(before, after))
            record[name] = {
                "step_tok_s": batch[name] / wall,
                "cpu_tok_s": batch[name] / max(cpu, 1e-9),
                "e2e_tok_s": batch[name] * new_tokens / total,
            }
        rounds.append(record)
        if len(rounds) >= 15:
            break

    def median(name, key):
        return statistics.median(r[name][key] for r in rounds)

    results = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": len(rounds),
        "seconds": time.perf_counter() - started,
    }
    for key in ("step_tok_s", "cpu_tok_s", "e2e_tok_s"):
        for name in contenders:
            results[f"{name}_{key}"] = median(name, key)
        b1 = [r["bumblecore_b1"][key] / r["transformers_b1"][key] for r in rounds]
        b16 = [r["bumblecore_b16"][key] / r["bumblecore_b1"][key] for r in rounds]
        vs_hf16 = [r["bumblecore_b16"][key] / r["transformers_b16"][key] for r in rounds]
        results[f"b1_ratio_{key}"] = statistics.median(b1)
        results[f"b1_ratio_{key}_range"] = (min(b1), max(b1))
        results[f"b16_ratio_{key}"] = statistics.median(vs_hf16)
        results[f"b16_ratio_{key}_range"] = (min(vs_hf16), max(vs_hf16))
        results[f"b16_over_b1_{key}"] = statistics.median(b16)
        results[f"b16_over_b1_{key}_range"] = (min(b16), max(b16))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="greedy decode tokens/s vs transformers generate")
    parser.add_argument("--quick", action="store_true", help="32-token prompts, 32 new tokens, ~30 s of rounds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads; 0 = torch's default (default 1)"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of measuring rounds (default 120, quick 30)"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    r = run(args.quick, args.budget)
    print(f"device {r['device']}, {r['threads']} threads, {r['rounds']} rounds in {r['seconds']:.0f} s (medians)")
    for key, label in (
        ("step_tok_s", "decode steps, wall clock"),
        ("cpu_tok_s", "decode steps, per CPU second"),
        ("e2e_tok_s", "end to end, wall clock, prefill included"),
    ):
        print(
            f"{label}: transformers batch 1 {r[f'transformers_b1_{key}']:.1f} tok/s; bumblecore batch 1 "
            f"{r[f'bumblecore_b1_{key}']:.1f} tok/s; transformers batch 16 {r[f'transformers_b16_{key}']:.1f} tok/s; "
            f"bumblecore batch 16 {r[f'bumblecore_b16_{key}']:.1f} tok/s"
        )
        lo, hi = r[f"b1_ratio_{key}_range"]
        print(
            f"  bumblecore / transformers at batch 1 = {r[f'b1_ratio_{key}']:.2f}x [rounds {lo:.2f}-{hi:.2f}] "
            f"(goal >= 1.5x CPU, >= 3x GPU)"
        )
        lo, hi = r[f"b16_ratio_{key}_range"]
        print(
            f"  bumblecore / transformers at batch 16 = {r[f'b16_ratio_{key}']:.2f}x [rounds {lo:.2f}-{hi:.2f}] "
            f"(goal >= 2x CPU)"
        )
        lo, hi = r[f"b16_over_b1_{key}_range"]
        print(
            f"  bumblecore batch 16 / batch 1 = {r[f'b16_over_b1_{key}']:.2f}x [rounds {lo:.2f}-{hi:.2f}] (goal >= 8x)"
        )


if __name__ == "__main__":
    main()
