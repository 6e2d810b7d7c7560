"""Every benchmark in one go, with the summary table rewritten in docs/BENCHMARKS.md.

    python bench/run_all.py [--quick] [--no-write]

Runs the benchmarks one after another (never in parallel: they would time each other), each in its
own child process of this one, so a crash, a hang or a thread setting in one cannot touch the next.
Each measure is a ratio against its peer taken in the same run on this machine. A benchmark that
fails is recorded as "failed: <reason>" and the rest still run. The table goes between the
run_all markers in docs/BENCHMARKS.md (the rest of the file is left as it is) and is printed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


def bench_train_sft(quick):
    return importlib.import_module("train_sft").run(quick)


def bench_generate(quick):
    import torch

    # One torch thread, as bench/generate.py's own default: on a shared 2-core box a two-thread team
    # stalls whenever another process holds a core.
    torch.set_num_threads(1)
    return importlib.import_module("generate").run(quick, None)


def bench_serve(quick):
    # The goal's own setting (16 clients x 64 tokens) even in quick mode, one run instead of best of 3:
    # it is seconds of work; the server start-up dominates.
    return importlib.import_module("serve").run(quick, clients=16, max_tokens=64, repeats=1 if quick else 3)


def bench_pretokenize(quick):
    return importlib.import_module("pretokenize").run(4.0 if quick else 16.0)


def bench_dpo_reference(quick):
    return importlib.import_module("dpo_reference").run(quick)


def bench_resume(quick):
    return importlib.import_module("resume").run(quick)


def bench_prefix_cache(quick):
    import torch

    torch.set_num_threads(1)  # as bench/generate.py: a two-thread team stalls on a shared box
    return importlib.import_module("prefix_cache").run(quick)


def bench_zero3_memory(quick):
    return importlib.import_module("zero3_memory").run(quick)


def bench_real_model(quick):
    # Decode at one torch thread inside (as bench/generate.py); SFT children at torch's default.
    return importlib.import_module("real_model").run(quick)


BENCHES = {
    "real_model": bench_real_model,
    "train_sft": bench_train_sft,
    "generate": bench_generate,
    "serve": bench_serve,
    "prefix_cache": bench_prefix_cache,
    "pretokenize": bench_pretokenize,
    "dpo_reference": bench_dpo_reference,
    "resume": bench_resume,
    "zero3_memory": bench_zero3_memory,
}


def child(name: str, quick: bool) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    result = BENCHES[name](quick)
    print("RESULT " + json.dumps(result, default=str))


def run_one(name: str, quick: bool, timeout: float) -> dict:
    """The bench's result dict, or {"failed": reason}."""
    command = [sys.executable, __file__, "--child", name] + (["--quick"] if quick else [])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout:.0f} s"}
    seconds = time.perf_counter() - started
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        # The last line of the traceback says what went wrong in a table cell's worth of text.
        tail = [l for l in done.stderr.strip().splitlines() if l.strip()][-1:] or [f"exit code {done.returncode}"]
        sys.stderr.write(done.stderr[-3000:])
        return {"failed": tail[0][:200], "bench_seconds": seconds}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["bench_seconds"] = seconds
    return result


class Missing(Exception):
    """A figure a bench could not produce, with the reason."""


def rows(results: dict) -> list[tuple]:
    """(measure, bumblecore, peer, ratio, goal, met) per goal; a failed bench, or a figure a bench did
    not produce (an optional peer that is not installed), gives its row as failed with the reason."""

    def fmt(x, unit):
        return f"{x:,.1f} {unit}" if x < 100 else f"{x:,.0f} {unit}"

    out = []

    def add(bench, measure, goal, build):
        r = results.get(bench, {"failed": "not run"})
        if "failed" in r:
            status = "not run" if r["failed"] == "not run" else f"failed: {r['failed']}".replace("|", "/")
            out.append((measure, "", "", "", goal[0], status))
            return
        try:
            ours, peer, ratio = build(r)
        except Missing as why:
            out.append((measure, "", "", "", goal[0], f"failed: {why}".replace("|", "/")))
            return
        except KeyError as key:  # a bench of an older version, or one that stopped short
            out.append((measure, "", "", "", goal[0], f"failed: no {key} in its result"))
            return
        limit, above = goal[1], goal[2]
        if limit is None:  # reported, no goal set
            out.append((measure, ours, peer, f"**{ratio}**", goal[0], "reported"))
            return
        met = ratio >= limit if above else ratio <= limit
        out.append((measure, ours, peer, f"**{ratio:.2f}x**", goal[0], "met" if met else "**missed**"))

    real = results.get("real_model", {"failed": "not run"})
    if "failed" in real:
        status = "not run" if real["failed"] == "not run" else f"failed: {real['failed']}".replace("|", "/")
        out.append(
            ("SmolLM2-135M-Instruct: decode and SFT vs transformers (bench/real_model.py)", "", "", "", "", status)
        )
    else:
        from real_model import rows as real_rows

        for measure, ours, peer, ratio, goal in real_rows(real.get("decode"), real.get("sft")):
            try:
                value = float(ratio.split("x")[0])
            except ValueError:
                out.append((f"SmolLM2: {measure}", ours, peer, "", goal, f"failed: {ratio}"))
                continue
            if not goal:
                status = "reported"
            elif goal.startswith(">="):
                status = "met" if value >= float(goal.split()[1].rstrip("x")) else "**missed**"
            else:
                status = "met" if value <= float(goal.split()[1].rstrip("x")) else "**missed**"
            out.append((f"SmolLM2: {measure}", ours, peer, f"**{ratio}**", goal or "reported", status))

    def tok_s(part):
        if "failed" in part:  # one peer could not run (e.g. TRL not installed): its rows say why
            raise Missing(part["failed"])
        return fmt(part["tokens_per_sec"], "tok/s")

    add(
        "train_sft",
        "SFT tokens/s, h256 x 4, vocab 4,000 (LM head ~1/3 of compute), packed vs Trainer padded",
        (">= 1.5x", 1.5, True),
        lambda r: (tok_s(r["realistic/bumblecore"]), tok_s(r["realistic/trainer"]), r["realistic_trainer_ratio"]),
    )
    add(
        "train_sft",
        "the same vs TRL SFTTrainer with packing",
        (">= 2x", 2.0, True),
        lambda r: (tok_s(r["realistic/bumblecore"]), tok_s(r["realistic/trl"]), r["realistic_trl_ratio"]),
    )
    add(
        "train_sft",
        "SFT tokens/s, 2-layer h128 body under vocab 151,936 (flatters packing), vs Trainer padded",
        (">= 2x", 2.0, True),
        lambda r: (tok_s(r["throughput/bumblecore"]), tok_s(r["throughput/trainer"]), r["throughput_ratio"]),
    )
    add(
        "train_sft",
        "CPU training MFU (achieved FLOP/s / measured fp32 matmul peak)",
        ("reported (was ~60%)", None, True),
        lambda r: ("", f"peak {r['matmul_peak_gflops']:,.0f} GFLOP/s", f"{100 * r['mfu']:.0f}%"),
    )
    add(
        "train_sft",
        "peak training RSS, vocab 151,936, seq 2048 (vs Trainer)",
        ("<= 0.4x", 0.4, False),
        lambda r: (
            fmt(r["memory/bumblecore"]["peak_rss_mb"], "MB") + f" (floor {r['memory_floor_mb']:,.0f} MB)",
            fmt(r["memory/trainer"]["peak_rss_mb"], "MB"),
            r["memory_ratio"],
        ),
    )
    gpu = results.get("generate", {}).get("device", "cpu").startswith("cuda")
    add(
        "generate",
        "greedy decode, batch 1 (vs transformers generate)",
        (">= 3x (GPU)", 3.0, True) if gpu else (">= 1.5x (CPU)", 1.5, True),
        lambda r: (
            fmt(r["bumblecore_b1_step_tok_s"], "tok/s"),
            fmt(r["transformers_b1_step_tok_s"], "tok/s"),
            r["b1_ratio_step_tok_s"],
        ),
    )
    add(
        "generate",
        "greedy decode, batch 16 (vs transformers generate at batch 16, left-padded)",
        (">= 2x", 2.0, True),
        lambda r: (
            fmt(r["bumblecore_b16_step_tok_s"], "tok/s"),
            fmt(r["transformers_b16_step_tok_s"], "tok/s"),
            r["b16_ratio_step_tok_s"],
        ),
    )
    add(
        "generate",
        "greedy decode, batch 16 aggregate (vs our batch 1)",
        (">= 8x", 8.0, True),
        lambda r: (
            fmt(r["bumblecore_b16_step_tok_s"], "tok/s"),
            fmt(r["bumblecore_b1_step_tok_s"], "tok/s"),
            r["b16_over_b1_step_tok_s"],
        ),
    )
    add(
        "serve",
        "serving efficiency, streaming: 16 API clients (vs the engine's own batch), h64 x 2",
        (">= 0.5x", 0.5, True),
        lambda r: (fmt(r["served_stream_tok_s"], "tok/s"), fmt(r["engine_tok_s"], "tok/s"), r["efficiency_stream"]),
    )
    add(
        "serve",
        "serving efficiency, non-streaming (the same)",
        (">= 0.5x", 0.5, True),
        lambda r: (
            fmt(r["served_nonstream_tok_s"], "tok/s"),
            fmt(r["engine_tok_s"], "tok/s"),
            r["efficiency_nonstream"],
        ),
    )
    add(
        "serve",
        "served completion tokens/s, 16 concurrent (vs one at a time)",
        (">= 4x", 4.0, True),
        lambda r: (fmt(r["concurrent_tok_s"], "tok/s"), fmt(r["sequential_tok_s"], "tok/s"), r["ratio"]),
    )
    add(
        "prefix_cache",
        "second-turn time to first token, ~1,000-token history (vs a cold prefill)",
        ("<= 0.3x", 0.3, False),
        lambda r: (
            f"{r['warm_ttft_s'] * 1000:,.1f} ms ({r['history_tokens']} tokens)",
            f"{r['cold_ttft_s'] * 1000:,.1f} ms",
            r["ratio"],
        ),
    )
    add(
        "pretokenize",
        "pretokenization peak RSS, 4x corpus (vs 1x)",
        ("<= 1.2x", 1.2, False),
        lambda r: (fmt(r["4x"]["peak_mb"], "MB"), fmt(r["1x"]["peak_mb"], "MB"), r["rss_ratio"]),
    )
    add(
        "resume",
        "resume start-up to exit, late step (vs early step)",
        ("<= 1.2x", 1.2, False),
        lambda r: (
            f"{r['late_wall_seconds']:.2f} s (step {r['late_step']})",
            f"{r['early_wall_seconds']:.2f} s (step {r['early_step']})",
            r["wall_ratio"],
        ),
    )
    # The issue sets no figure for DPO; cached reference log-probs should at least not be slower.
    add(
        "dpo_reference",
        "DPO step time, cached reference (vs live reference)",
        ("<= 1x (no goal set; not slower)", 1.0, False),
        lambda r: (
            f"{r['cached']['step_seconds'] * 1000:,.0f} ms",
            f"{r['live']['step_seconds'] * 1000:,.0f} ms",
            r["step_time_ratio"],
        ),
    )
    add(
        "zero3_memory",
        "per-rank peak RSS, ZeRO-3 on 2 CPU processes (vs one process)",
        ("<= 0.6x", 0.6, False),
        lambda r: (
            f"{max(r['zero3_peak_rss_mb']):,.0f} MB ({r['parameters'] / 1e6:.0f}M params)",
            f"{r['one_process_peak_rss_mb']:,.0f} MB",
            r["ratio"],
        ),
    )
    if not gpu:  # the GPU goals, which this machine cannot measure (bench/gpu.py on a GPU machine)
        for measure, goal in (
            ("GPU: greedy decode, batch 1 (vs transformers generate)", ">= 3x"),
            ("GPU: served throughput, 64 streams", "reported"),
        ):
            out.append((measure, "", "", "", goal, "not measured: no GPU on this machine (bench/gpu.py)"))
    return out


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:  # the model name is more telling than "x86_64"
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def table(results: dict, quick: bool, seconds: float) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Generated by `python bench/run_all.py{' --quick' if quick else ''}` on {stamp}, {machine()}. "
        f"{'Quick mode (fewer steps and samples, noisier). ' if quick else ''}Wall time {seconds / 60:.1f} min; "
        f"per bench: " + ", ".join(f"{n} {r.get('bench_seconds', 0):.0f} s" for n, r in results.items()) + ".",
        "",
        "| measure | bumblecore | peer | ratio | goal | |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:  # first run: a Summary section after the intro paragraph
        head, sep, rest = doc.partition("\n## ")
        doc = head.rstrip() + "\n\n## Summary\n\n" + block + "\n\n" + sep.lstrip("\n") + rest
        doc = doc if sep else doc.rstrip() + "\n"
    DOC.write_text(doc, encoding="utf-8")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], "--quick" in sys.argv[3:])
        return
    parser = argparse.ArgumentParser(
        description="run every benchmark and rewrite the summary table in docs/BENCHMARKS.md"
    )
    parser.add_argument(
        "--quick", action="store_true", help="each bench in its quick mode (under 10 min on 2 CPU cores)"
    )
    parser.add_argument(
        "--only", nargs="*", choices=list(BENCHES), help="a subset (the table marks the rest 'not run')"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    results = {}
    for name in args.only or BENCHES:
        print(f"[run_all] {name} ...", flush=True)
        quick_limit = 900 if name == "real_model" else 420  # the real model's SFT alone is minutes on 2 cores
        results[name] = run_one(name, args.quick, timeout=quick_limit if args.quick else 3600)
        r = results[name]
        print(
            f"[run_all] {name}: {'failed: ' + r['failed'] if 'failed' in r else 'done'} in {r.get('bench_seconds', 0):.0f} s",
            flush=True,
        )
    text = table(results, args.quick, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        write_doc(text)


if __name__ == "__main__":
    main()
