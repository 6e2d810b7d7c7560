"""Greedy decode tokens/s: bumblecore vs transformers `generate`, same model and prompts, one run.

    python bench/generate.py [--quick]

A random Qwen2-shaped model (4 layers, hidden 256, vocabulary 32,000) on this machine's device.
Both generate exactly `new_tokens` tokens per prompt (end-of-sequence ignored), greedy. Reported:
batch 1 tokens/s for both (goal: bumblecore >= 1.3x transformers on CPU, >= 3x on GPU) and
bumblecore's batch-16 aggregate tokens/s vs its batch 1 (goal >= 8x).
"""

from __future__ import annotations

import argparse
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
    config = Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
    hf = Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(directory)
    load_tokenizer(ROOT / "bumblecore" / "demo_data" / "tokenizer").save_pretrained(str(directory))
    return hf.to(device), Bumblebee.from_pretrained(directory).to(device).eval()


def timed(fn) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def run(quick: bool = False) -> dict:
    from bumblecore.inference.generate import GenerationEngine, SamplingParams
    from bumblecore.tokenizer import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    new_tokens, prompt_len = (32, 32) if quick else (128, 64)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(Path(tmp), device)
        tokenizer = load_tokenizer(tmp)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (prompt_len,), generator=g).tolist() for _ in range(16)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def ours_batch(n):
        engine = GenerationEngine(ours, tokenizer, max_batch_size=n, max_len=prompt_len + new_tokens + 1, eos_token_ids=[])
        return lambda: engine.generate(prompts[:n], params)

    def hf_batch1():
        with torch.inference_mode():
            hf.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, eos_token_id=None, pad_token_id=0)

    results = {
        "transformers_b1": new_tokens / timed(hf_batch1),
        "bumblecore_b1": new_tokens / timed(ours_batch(1)),
        "bumblecore_b16": 16 * new_tokens / timed(ours_batch(16)),
    }
    results["b1_ratio"] = results["bumblecore_b1"] / results["transformers_b1"]
    results["b16_over_b1"] = results["bumblecore_b16"] / results["bumblecore_b1"]
    results["device"] = str(device)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="greedy decode tokens/s vs transformers generate")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    r = run(args.quick)
    print(f"device {r['device']}: transformers batch 1 {r['transformers_b1']:.1f} tok/s; bumblecore batch 1 "
          f"{r['bumblecore_b1']:.1f} tok/s, batch 16 {r['bumblecore_b16']:.1f} tok/s")
    print(f"bumblecore / transformers at batch 1 = {r['b1_ratio']:.2f}x (goal >= 1.3x CPU, >= 3x GPU)")
    print(f"bumblecore batch 16 / batch 1 = {r['b16_over_b1']:.2f}x (goal >= 8x)")


if __name__ == "__main__":
    main()
