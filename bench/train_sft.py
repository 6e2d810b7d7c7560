"""SFT: bumblecore vs the transformers Trainer on the same model and data, in one run.

    python bench/train_sft.py [--quick]

1. Throughput: effective (non-padding) tokens per second of training steps, on the shipped demo SFT
   set (short, varied samples). The Trainer runs padded batches (pad to the longest in the batch, as
   LLaMA-Factory and TRL do); bumblecore packs. Goal >= 2x.
2. Peak memory at vocabulary 151,936 and sequence 2048 (one 2048-token sample per step): peak RSS
   of the whole training process. Goal <= 0.4x. Beside it, the floor any trainer of this model has:
   weights + gradients + AdamW's two moments (16 bytes per parameter), the backbone's saved
   activations without logits (measured with saved-tensor hooks on one 2048-token forward), and the
   runtime's own RSS (a bare `import torch, bumblecore` process).
3. The realistic row: rows 1-2 run a 2-layer hidden-128 body under a 151,936 vocabulary, where the
   LM head is nearly all of the compute and skipping prompt positions there flatters bumblecore. Here
   a Qwen2-shaped model of hidden 256 x 4 layers (intermediate 512, 4 heads / 2 KV heads) under a
   4,000 vocabulary, whose LM head is ~30% of the per-token matmul work (the 0.5B preset's share is
   ~28%), on the same demo SFT data, against (a) the padded Trainer (goal >= 1.5x) and (b) TRL's
   SFTTrainer with packing (goal >= 2x). The demo tokenizer has 768 tokens; the embedding is padded
   to 4,000 rows, so every side trains the very same token ids (the softmax still spans 4,000).
   Timed in rounds, the sides alternating; a figure is the median over rounds.
   MFU: achieved model FLOP/s of bumblecore's realistic run over this machine's fp32 matmul peak
   (the best of repeated 2048^3 torch.mm at torch's thread count). Model FLOPs of an epoch:

       6 * N_body * T  +  6 * H * V * T_target  +  6 * L * H * sum_d len_d^2

   N_body: parameters of the decoder layers (embedding and LM head excluded), T: tokens, H: hidden,
   V: vocabulary, T_target: trained (label) positions, which is all the loss needs of the LM head,
   len_d: each sample's length (causal attention within a sample: QK^T and AV, forward + backward).
   `mfu_head_all_positions` counts the LM head at every position instead (PaLM's convention).

All use fp32 on CPU, AdamW, one epoch over the same samples. Each run is a separate process so peak
RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bumblecore" / "demo_data"
VOCAB = 151936
# The realistic row's model: hidden 256 x 4 layers under a 4,000 vocabulary.
REALISTIC = {"vocab": 4000, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}


def write_model(
    directory: Path,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    num_hidden_layers: int = 2,
    vocab: int = VOCAB,
) -> None:
    """A random Qwen2-shaped model (tied embeddings) at `vocab` rows, with the demo tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bumblecore.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    load_tokenizer(DEMO / "tokenizer").save_pretrained(directory)


def write_data(directory: Path, samples: int, long: bool) -> Path:
    """Demo SFT samples; with `long`, each sample is a ~2048-token instruction + answer."""
    lines = open(DEMO / "sft_train.jsonl", encoding="utf-8").read().splitlines()
    path = directory / ("long.jsonl" if long else "short.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        if not long:
            f.write("\n".join(lines[:samples]) + "\n")
        else:
            stories = [json.loads(l)["text"] for l in open(DEMO / "pretrain.jsonl", encoding="utf-8")]
            for i in range(samples):
                text = " ".join(stories[i * 40 : (i + 1) * 40])
                f.write(json.dumps({"instruction": text[: len(text) // 2], "output": text[len(text) // 2 :]}) + "\n")
    return path


# ---------------------------------------------------------------------------- the two runners (child processes)


def run_bumblecore(model: str, data: str, out: str, micro: int, cutoff: int) -> dict:
    from bumblecore.cli import main

    main(
        [
            "train",
            "--training_stage",
            "sft",
            "--model_name_or_path",
            model,
            "--dataset_path",
            data,
            "--output_dir",
            out,
            "--cutoff_len",
            str(cutoff),
            "--num_epochs",
            "1",
            "--train_micro_batch_size_per_gpu",
            str(micro),
            "--gradient_accumulation_steps",
            "1",
            "--train_model_precision",
            "fp32",
            "--learning_rate",
            "1e-4",
            "--save_steps",
            "100000",
            "--accelerator",
            "cpu",
            "--cache_dir",
            str(Path(out) / "cache"),
        ]
    )
    history = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
    history = history[1:] if len(history) > 1 else history  # the first step pays one-time warm-up
    tokens = sum(r["tokens"] for r in history)
    seconds = sum(r["tokens"] / r["tokens_per_sec"] for r in history)
    return {"tokens": tokens, "seconds": seconds, "steps": len(history)}


def encode_rows(model: str, data: str, cutoff: int) -> list[dict]:
    """The samples as the Trainer and TRL get them: bumblecore's chat template, cut at `cutoff`."""
    from bumblecore.chat.format import encode_conversation
    from bumblecore.data.formats import read_samples
    from bumblecore.recipes import recipe_for
    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    rows = []
    for sample in read_samples(data, recipe_for("sft").reading):
        ids, mask = encode_conversation(tokenizer, sample.conversation.messages)
        ids, mask = ids[:cutoff], mask[:cutoff]
        rows.append({"input_ids": ids, "labels": [i if m else -100 for i, m in zip(ids, mask)]})
    return rows


DURATIONS: list = []  # seconds of each training step of this (child) process


def step_timer():
    """A TrainerCallback timing each step into DURATIONS."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            DURATIONS.append(time.perf_counter() - self.started)

    return StepTimer()


def timed_tokens(rows: list[dict]) -> dict:
    # As for bumblecore, the first step (one-time warm-up) is left out. The random sampler's order is
    # not recorded, so the timed steps' tokens are the epoch's tokens pro rata (exact in expectation).
    timed = DURATIONS[1:] or DURATIONS
    total = sum(len(r["input_ids"]) for r in rows)
    return {
        "tokens": total * len(timed) / len(DURATIONS),
        "seconds": sum(timed),
        "steps": len(DURATIONS),
    }


def run_trainer(model: str, data: str, out: str, micro: int, cutoff: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    rows = encode_rows(model, data, cutoff)

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(r["input_ids"], 0) for r in batch]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in batch]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch]),
        }

    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=micro,
        **PEER_ARGS,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32),
        args=args,
        train_dataset=rows,
        data_collator=collate,
        callbacks=[step_timer()],
    )
    trainer.train()
    return timed_tokens(rows)


# The same run settings for both peers (the Trainer and TRL's SFTTrainer): one epoch, CPU, no
# logging, saving or loader workers, so only the training steps differ.
PEER_ARGS = dict(
    num_train_epochs=1,
    learning_rate=1e-4,
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    logging_strategy="no",
    dataloader_num_workers=0,
)


def run_trl(model: str, data: str, out: str, micro: int, cutoff: int) -> dict:
    """TRL's SFTTrainer with packing (its default best-fit-decreasing packing, padding-free rows of
    `cutoff` tokens, batch `micro`): the same pre-tokenised rows and labels as the Trainer's."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = encode_rows(model, data, cutoff)
    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=micro,
        **PEER_ARGS,
        packing=True,
        max_length=cutoff,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(rows),
        callbacks=[step_timer()],
    )
    trainer.train()
    return timed_tokens(rows)


RUNNERS = {"bumblecore": run_bumblecore, "trainer": run_trainer, "trl": run_trl}


def child(which: str, model: str, data: str, out: str, micro: int, cutoff: int) -> None:
    result = RUNNERS[which](model, data, out, micro, cutoff)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def measure(which: str, model: Path, data: Path, work: Path, micro: int, cutoff: int) -> dict:
    out = work / which
    command = [sys.executable, __file__, "--child", which, str(model), str(data), str(out), str(micro), str(cutoff)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{done.stderr[-3000:]}")
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    result["tokens_per_sec"] = result["tokens"] / result["seconds"]
    return result


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None


def model_flops(rows: list[dict], hidden: int, layers: int, vocab: int, body_params: int) -> dict:
    """Model FLOPs of one epoch over `rows` (the module docstring's formula), and per token."""
    tokens = sum(len(r["input_ids"]) for r in rows)
    targets = sum(sum(1 for label in r["labels"][1:] if label != -100) for r in rows)
    attention = 6 * layers * hidden * sum(len(r["input_ids"]) ** 2 for r in rows)
    body = 6 * body_params * tokens
    head = 6 * hidden * vocab * targets
    return {
        "tokens": tokens,
        "target_tokens": targets,
        "per_token": (body + head + attention) / tokens,
        "per_token_head_all_positions": (body + 6 * hidden * vocab * tokens + attention) / tokens,
    }


def matmul_peak_gflops(size: int = 2048, seconds: float = 3.0) -> float:
    """fp32 GFLOP/s of the best of repeated (size x size) @ (size x size) torch.mm at torch's thread count."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def memory_floor(model: Path, seq: int = 2048) -> dict:
    """MB that training `model` on one `seq`-token sample cannot go below (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    params = sum(p.numel() for p in net.parameters())  # tied embeddings are counted once
    saved: dict = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 768, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = net.model(input_ids=ids).last_hidden_state  # the backbone: no logits
    del hidden
    bare = subprocess.run(
        [
            sys.executable,
            "-c",
            # VmHWM, not ru_maxrss: Linux carries the forking parent's ru_maxrss across exec.
            "import torch, bumblecore; print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    mb = 1 / 2**20
    parts = {
        "weights": 4 * params * mb,
        "gradients": 4 * params * mb,
        "optimizer": 8 * params * mb,
        "activations_without_logits": sum(saved.values()) * mb,
        "runtime": int(bare.stdout.split()[-2]) / 1024,  # "VmHWM:  224364 kB"
    }
    return parts


def timed_rounds(sides: list[str], model: Path, data: Path, work: Path, rounds: int, micro: int, cutoff: int) -> dict:
    """Each side `rounds` times, alternating (a, b, c, then c, b, a, ...); tokens/s is the median."""
    runs: dict = {side: [] for side in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            if isinstance(runs[side], dict):
                continue
            if side == "trl" and not trl_available():
                runs[side] = {"failed": "trl not installed (pip install -e '.[bench]')"}
                continue
            try:
                runs[side].append(measure(side, model, data, work / f"{side}{r}", micro, cutoff))
            except RuntimeError as error:
                runs[side] = {"failed": str(error)[-1500:]}
    results = {}
    for side, got in runs.items():
        if isinstance(got, dict):
            results[side] = got
            continue
        results[side] = dict(got[-1])
        results[side]["tokens_per_sec"] = statistics.median(g["tokens_per_sec"] for g in got)
        results[side]["rounds_tokens_per_sec"] = [g["tokens_per_sec"] for g in got]
    return results


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "model"
        write_model(model)
        short = write_data(work, 512 if quick else 2048, long=False)
        long = write_data(work, 3 if quick else 4, long=True)
        results = {}
        for which in ("bumblecore", "trainer"):
            results[f"throughput/{which}"] = measure(which, model, short, work / "t", micro=8, cutoff=1024)
            results[f"memory/{which}"] = measure(which, model, long, work / "m", micro=1, cutoff=2048)
        results["memory_floor"] = memory_floor(model)

        realistic = work / "realistic"
        write_model(
            realistic,
            hidden_size=REALISTIC["hidden_size"],
            intermediate_size=REALISTIC["intermediate_size"],
            num_hidden_layers=REALISTIC["num_hidden_layers"],
            vocab=REALISTIC["vocab"],
        )
        # Quick: 1,024 samples (4 packed steps of bumblecore's, 3 timed), one round (~1.5 min quiet).
        (work / "r").mkdir()
        realistic_data = write_data(work / "r", 1024, long=False) if quick else short
        sides = timed_rounds(
            ["bumblecore", "trainer", "trl"], realistic, realistic_data, work / "r", 1 if quick else 3, 8, 1024
        )
        for side, got in sides.items():
            results[f"realistic/{side}"] = got
        rows = encode_rows(str(realistic), str(realistic_data), 1024)
        h, layers = REALISTIC["hidden_size"], REALISTIC["num_hidden_layers"]
        body = layers * (2 * h * h + 2 * h * (h // 2) + 3 * h * REALISTIC["intermediate_size"])  # q, o; k, v; MLP
        flops = model_flops(rows, h, layers, REALISTIC["vocab"], body)
    results["matmul_peak_gflops"] = matmul_peak_gflops()
    results["model_flops"] = flops
    bumble = results["realistic/bumblecore"]
    peak = results["matmul_peak_gflops"] * 1e9
    results["mfu"] = bumble["tokens_per_sec"] * flops["per_token"] / peak
    results["mfu_head_all_positions"] = bumble["tokens_per_sec"] * flops["per_token_head_all_positions"] / peak
    for other in ("trainer", "trl"):
        theirs = results[f"realistic/{other}"]
        results[f"realistic_{other}_ratio"] = (
            bumble["tokens_per_sec"] / theirs["tokens_per_sec"] if "tokens_per_sec" in theirs else None
        )
    results["throughput_ratio"] = (
        results["throughput/bumblecore"]["tokens_per_sec"] / results["throughput/trainer"]["tokens_per_sec"]
    )
    results["memory_ratio"] = results["memory/bumblecore"]["peak_rss_mb"] / results["memory/trainer"]["peak_rss_mb"]
    results["memory_floor_mb"] = sum(results["memory_floor"].values())
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        which, model, data, out, micro, cutoff = sys.argv[2:8]
        child(which, model, data, out, int(micro), int(cutoff))
        return
    parser = argparse.ArgumentParser(description="SFT throughput and memory vs the transformers Trainer")
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    results = run(args.quick)
    for key in ("throughput/bumblecore", "throughput/trainer", "memory/bumblecore", "memory/trainer"):
        r = results[key]
        print(
            f"{key:24s} {r['tokens']:>8,.0f} tokens in {r['seconds']:7.2f}s of steps = {r['tokens_per_sec']:8.0f} tok/s, "
            f"{r['steps']} steps, peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    print(f"effective tokens/s bumblecore / Trainer = {results['throughput_ratio']:.2f}x (goal >= 2x)")
    print(
        f"peak memory bumblecore / Trainer at vocab {VOCAB}, seq 2048 = {results['memory_ratio']:.2f}x (goal <= 0.4x)"
    )
    parts = ", ".join(f"{k} {v:.0f}" for k, v in results["memory_floor"].items())
    print(
        f"memory floor {results['memory_floor_mb']:.0f} MB ({parts}); bumblecore's peak is "
        f"{results['memory/bumblecore']['peak_rss_mb'] / results['memory_floor_mb']:.2f}x the floor"
    )
    for side in ("bumblecore", "trainer", "trl"):
        r = results[f"realistic/{side}"]
        if "failed" in r:
            print(f"realistic/{side:14s} failed: {r['failed'][-300:]}")
            continue
        rounds = ", ".join(f"{t:.0f}" for t in r["rounds_tokens_per_sec"])
        print(f"realistic/{side:14s} {r['tokens_per_sec']:8.0f} tok/s (median of rounds: {rounds})")
    for other, goal in (("trainer", 1.5), ("trl", 2.0)):
        ratio = results[f"realistic_{other}_ratio"]
        shown = f"{ratio:.2f}x" if ratio is not None else "n/a"
        print(f"realistic (h256 x 4, vocab 4,000) bumblecore / {other} = {shown} (goal >= {goal}x)")
    print(
        f"fp32 matmul peak {results['matmul_peak_gflops']:.1f} GFLOP/s; MFU {results['mfu']:.1%} "
        f"({results['model_flops']['per_token'] / 1e6:.1f} MFLOP/token; LM head at every position: "
        f"{results['mfu_head_all_positions']:.1%})"
    )


if __name__ == "__main__":
    main()
