"""Real-model figures: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV
heads, vocabulary 49,152), bumblecore vs transformers, fp32 on this machine's CPU.

    python bench/real_model.py [--quick] [--data DIR] [--only decode|sft] [--threads N] [--batches 1 8]
                               [--static_cache]

1. Greedy decode, batch 1, 8 and 16 vs transformers `generate`: the same prompts (chat-rendered
   instructions of alpaca_zh_demo cut to one length, so no side pads), the same number of new tokens
   (end-of-sequence ignored), greedy; the generated ids must be equal (a row that differs is
   reported). Each decode step is timed (transformers' through a streamer); contenders alternate in
   rounds and a ratio is the median of per-round ratios. Goal: batch 8 >= 1.3x. With --static_cache
   the static-cache engine (inference/static_decode.py) runs paired in the same rounds (goals: batch 1
   >= 2x, batch 8 >= 1.8x); every contender's first run (the compile, transformers' warm-up) is
   timed apart (`warmup_s`).
2. SFT tokens/s and peak RSS vs the transformers Trainer (padded batches, pad to the longest in the
   batch) on the original project's `alpaca_zh_demo.json` (short samples) and `duolun_train.json`
   (long multi-turn conversations), read from --data (default ../shared/original-demo-data; never
   copied into the repository): cutoff_len 512, micro batch 4, fp32, AdamW, the same samples on both
   sides, effective (non-padding) tokens per second over the timed steps (the first is warm-up).
   bumblecore packs. Goals: alpaca >= 1.3x, duolun >= 1x, peak RSS <= 0.8x on both.

The machine may be shared: each figure is a median over alternating rounds, and ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "original-demo-data"
if not DEFAULT_DATA.is_dir():
    DEFAULT_DATA = Path("/work/shared/original-demo-data")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def model_dir() -> Path:
    from bumblecore.model.gguf import smollm2_checkpoint

    return smollm2_checkpoint()


# ---------------------------------------------------------------------------- decode


def decode_prompts(tokenizer, data_dir: Path, count: int, length: int) -> list[list[int]]:
    """`count` chat-rendered alpaca_zh_demo instructions, each cut to `length` tokens."""
    samples = json.loads((data_dir / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    prompts = []
    for sample in samples:
        text = (sample["instruction"] + "\n" + sample.get("input", "")).strip()
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"{data_dir / 'alpaca_zh_demo.json'}: fewer than {count} prompts of {length} tokens")


def run_decode(
    data_dir: Path, quick: bool = False, budget: float | None = None, batches=(1, 8, 16), static: bool = False
) -> dict:
    import torch
    from generate import StepClock
    from transformers import AutoModelForCausalLM

    from bumblecore import Bumblebee
    from bumblecore.inference.generate import GenerationEngine, SamplingParams
    from bumblecore.tokenizer import load_tokenizer

    path = model_dir()
    tokenizer = load_tokenizer(str(path))
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ours = Bumblebee.from_pretrained(path).eval()
    new_tokens, prompt_len = (24, 32) if quick else (64, 48)
    budget = budget if budget is not None else (40.0 if quick else 150.0)
    prompts = decode_prompts(tokenizer, data_dir, max(batches), prompt_len)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def engine(n, static):
        return GenerationEngine(ours, tokenizer, n, prompt_len + new_tokens + 1, eos_token_ids=[], static_cache=static)

    engines = {("bumblecore", n): engine(n, False) for n in batches}
    if static:  # the static-cache step (inference/static_decode.py), compiled in its warm-up run
        engines.update({("static", n): engine(n, True) for n in batches})
    outputs: dict = {}

    def ours_run(n, side="bumblecore"):
        engine = engines[(side, n)]
        started = time.perf_counter()
        ids = [engine.add(p, params, live_text=False) for p in prompts[:n]]
        tokens = {i: [] for i in ids}
        stamps = []
        while engine.active:
            for event in engine.step():
                if event.token_id is not None:
                    tokens[event.request_id].append(event.token_id)
            stamps.append((time.perf_counter(), time.process_time()))
        outputs[(side, n)] = [tokens[i] for i in ids]
        return stamps[-1][0] - started, stamps[1:], stamps[2:]

    def hf_run(n):
        clock = StepClock()
        ids = torch.tensor(prompts[:n])
        started = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                streamer=clock,
            )
        outputs[("transformers", n)] = out[:, prompt_len:].tolist()
        return clock.stamps[-1][0] - started, clock.stamps[1:], clock.stamps[2:]

    contenders = {}
    for n in batches:
        contenders[f"transformers_b{n}"] = (lambda n=n: hf_run(n), n)
        contenders[f"bumblecore_b{n}"] = (lambda n=n: ours_run(n), n)
        if static:
            contenders[f"static_b{n}"] = (lambda n=n: ours_run(n, "static"), n)
    warmup = {}
    for name, (fn, _) in contenders.items():  # warm-up: the static step compiles here, generate warms up
        began = time.perf_counter()
        fn()
        warmup[name] = time.perf_counter() - began
    rounds: list[dict] = []
    started = time.perf_counter()
    while len(rounds) < 3 or time.perf_counter() - started < budget:
        names = list(contenders) if len(rounds) % 2 == 0 else list(reversed(contenders))
        record = {}
        for name in names:
            fn, n = contenders[name]
            total, before, after = fn()
            record[name] = {
                "step_tok_s": n / statistics.median(b[0] - a[0] for a, b in zip(before, after)),
                "cpu_tok_s": n / max(statistics.median(b[1] - a[1] for a, b in zip(before, after)), 1e-9),
                "e2e_tok_s": n * new_tokens / total,
            }
        rounds.append(record)
        if len(rounds) >= 15:
            break
    results = {
        "threads": torch.get_num_threads(),
        "rounds": len(rounds),
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_len,
        "warmup_s": warmup,
    }
    sides = ["bumblecore", "transformers"] + (["static"] if static else [])
    for n in batches:
        theirs_ids = outputs[("transformers", n)]
        for side in sides:
            for key in ("step_tok_s", "cpu_tok_s", "e2e_tok_s"):
                results[f"{side}_b{n}_{key}"] = statistics.median(r[f"{side}_b{n}"][key] for r in rounds)
            if side == "transformers":
                continue
            prefix = "" if side == "bumblecore" else f"{side}_"  # bumblecore's keys as before
            equal = sum(a == b for a, b in zip(outputs[(side, n)], theirs_ids))
            results[f"{prefix}b{n}_rows_equal"], results[f"{prefix}b{n}_rows"] = equal, n
            for key in ("step_tok_s", "cpu_tok_s", "e2e_tok_s"):
                ratios = [r[f"{side}_b{n}"][key] / r[f"transformers_b{n}"][key] for r in rounds]
                results[f"{prefix}b{n}_ratio_{key}"] = statistics.median(ratios)
                results[f"{prefix}b{n}_ratio_{key}_range"] = (min(ratios), max(ratios))
    return results


# ---------------------------------------------------------------------------- SFT

SFT_SETS = {"alpaca": "alpaca_zh_demo.json", "duolun": "duolun_train.json"}
SFT_MICRO, SFT_CUTOFF = 4, 512


def sft_subset(data_dir: Path, name: str, samples: int, work: Path) -> Path:
    """The first `samples` records of a demo set, as a file in `work` (the bench's own temporary copy)."""
    records = json.loads((data_dir / SFT_SETS[name]).read_text(encoding="utf-8"))[:samples]
    path = work / f"{name}.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def run_sft(data_dir: Path, quick: bool = False, rounds: int | None = None) -> dict:
    from train_sft import timed_rounds

    path = model_dir()
    # Enough samples for a few packed steps of bumblecore's (4 x 512 tokens each) and the Trainer's.
    counts = {"alpaca": 32, "duolun": 16} if quick else {"alpaca": 256, "duolun": 96}
    rounds = rounds or (1 if quick else 3)
    results = {"micro_batch": SFT_MICRO, "cutoff_len": SFT_CUTOFF, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in SFT_SETS:
            data = sft_subset(data_dir, name, counts[name], work)
            sides = timed_rounds(["bumblecore", "trainer"], path, data, work / name, rounds, SFT_MICRO, SFT_CUTOFF)
            results[name] = {"samples": counts[name], **sides}
            ours, theirs = sides["bumblecore"], sides["trainer"]
            if "tokens_per_sec" in ours and "tokens_per_sec" in theirs:
                results[name]["speed_ratio"] = ours["tokens_per_sec"] / theirs["tokens_per_sec"]
                results[name]["memory_ratio"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    return results


# ---------------------------------------------------------------------------- the table


def rows(decode: dict | None, sft: dict | None) -> list[tuple]:
    """(measure, bumblecore, peer, ratio, goal) per figure."""
    out = []
    if decode:
        static_goals = {1: ">= 2x", 8: ">= 1.8x"}
        for n in (1, 8, 16):
            for side, prefix, label, goal in (
                ("bumblecore", "", "greedy decode", ">= 1.3x" if n == 8 else ""),
                ("static", "static_", "greedy decode, static_cache", static_goals.get(n, "")),
            ):
                if f"{prefix}b{n}_ratio_step_tok_s" not in decode:
                    continue
                lo, hi = decode[f"{prefix}b{n}_ratio_step_tok_s_range"]
                equal = f"{decode[f'{prefix}b{n}_rows_equal']}/{decode[f'{prefix}b{n}_rows']} rows equal"
                out.append(
                    (
                        f"{label} batch {n}, tok/s (vs transformers generate; {equal})",
                        f"{decode[f'{side}_b{n}_step_tok_s']:.1f}",
                        f"{decode[f'transformers_b{n}_step_tok_s']:.1f}",
                        f"{decode[f'{prefix}b{n}_ratio_step_tok_s']:.2f}x [{lo:.2f}-{hi:.2f}]",
                        goal,
                    )
                )
    if sft:
        for name, goal in (("alpaca", ">= 1.3x"), ("duolun", ">= 1x")):
            r = sft.get(name, {})
            ours, theirs = r.get("bumblecore", {}), r.get("trainer", {})
            if "tokens_per_sec" not in ours or "tokens_per_sec" not in theirs:
                why = ours.get("failed") or theirs.get("failed") or "not run"
                out.append((f"SFT {name}", "failed", "", why[-200:].replace("\n", " "), goal))
                continue
            label = SFT_SETS[name]
            out.append(
                (
                    f"SFT {label} effective tok/s (vs Trainer padded; cutoff 512, micro 4)",
                    f"{ours['tokens_per_sec']:.0f}",
                    f"{theirs['tokens_per_sec']:.0f}",
                    f"{r['speed_ratio']:.2f}x",
                    goal,
                )
            )
            out.append(
                (
                    f"SFT {label} peak RSS, MB",
                    f"{ours['peak_rss_mb']:,.0f}",
                    f"{theirs['peak_rss_mb']:,.0f}",
                    f"{r['memory_ratio']:.2f}x",
                    "<= 0.8x",
                )
            )
    return out


def table(decode: dict | None, sft: dict | None) -> str:
    lines = ["| measure (SmolLM2-135M-Instruct, fp32 CPU) | bumblecore | transformers | ratio | goal |"]
    lines.append("|---|---|---|---|---|")
    lines += ["| " + " | ".join(row) + " |" for row in rows(decode, sft)]
    return "\n".join(lines)


def run(
    quick: bool = False,
    data_dir: Path = DEFAULT_DATA,
    only: str | None = None,
    batches=(1, 8, 16),
    static: bool = False,
    threads: int = 1,
) -> dict:
    import torch

    results = {}
    if only in (None, "decode"):
        # One thread (as bench/generate.py): on a shared box a two-thread team stalls on a busy core.
        default = torch.get_num_threads()
        torch.set_num_threads(threads or default)
        results["decode"] = run_decode(Path(data_dir), quick, batches=tuple(batches), static=static)
        torch.set_num_threads(default)
    if only in (None, "sft"):
        results["sft"] = run_sft(Path(data_dir), quick)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="SmolLM2-135M-Instruct: decode and SFT vs transformers")
    parser.add_argument("--quick", action="store_true", help="fewer tokens, samples and rounds (a few minutes)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with alpaca_zh_demo.json, duolun_train.json")
    parser.add_argument("--only", choices=["decode", "sft"], default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16], help="decode batch sizes")
    parser.add_argument("--static_cache", action="store_true", help="also the static_cache engine, paired")
    parser.add_argument("--threads", type=int, default=1, help="decode's torch threads (0: torch's default)")
    args = parser.parse_args()
    results = run(args.quick, Path(args.data), args.only, args.batches, args.static_cache, args.threads)
    print(json.dumps(results, default=str))
    print(table(results.get("decode"), results.get("sft")))


if __name__ == "__main__":
    main()
