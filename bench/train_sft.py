"""SFT: bumblecore vs the transformers Trainer on the same model and data, in one run.

    python bench/train_sft.py [--quick]

1. Throughput: effective (non-padding) tokens per second of training steps, on the shipped demo SFT
   set (short, varied samples). The Trainer runs padded batches (pad to the longest in the batch, as
   LLaMA-Factory and TRL do); bumblecore packs. Goal >= 2x.
2. Peak memory at vocabulary 151,936 and sequence 2048 (one 2048-token sample per step): peak RSS
   of the whole training process. Goal <= 0.4x.

Both use the same randomly initialised Qwen2-shaped model (2 layers, hidden 128), fp32 on CPU, AdamW,
one epoch over the same samples. Each run is a separate process so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bumblecore" / "demo_data"
VOCAB = 151936


def write_model(
    directory: Path, hidden_size: int = 128, intermediate_size: int = 512, num_hidden_layers: int = 2
) -> None:
    """A random Qwen2-shaped model at the 151,936-token vocabulary, with the demo tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bumblecore.tokenizer import load_tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
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


def run_trainer(model: str, data: str, out: str, micro: int, cutoff: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from bumblecore.data.formats import read_samples
    from bumblecore.data.template import encode_conversation
    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    rows = []
    for sample in read_samples(data, "sft"):
        ids, mask = encode_conversation(tokenizer, sample.conversation.messages)
        ids, mask = ids[:cutoff], mask[:cutoff]
        rows.append({"input_ids": ids, "labels": [i if m else -100 for i, m in zip(ids, mask)]})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(r["input_ids"], 0) for r in batch]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in batch]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch]),
        }

    class StepTimer(TrainerCallback):
        durations: list = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            StepTimer.durations.append(time.perf_counter() - self.started)

    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=micro,
        num_train_epochs=1,
        learning_rate=1e-4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32),
        args=args,
        train_dataset=rows,
        data_collator=collate,
        callbacks=[StepTimer()],
    )
    trainer.train()
    # As for bumblecore, the first step (one-time warm-up) is left out. The random sampler's order is
    # not recorded, so the timed steps' tokens are the epoch's tokens pro rata (exact in expectation).
    timed = StepTimer.durations[1:] or StepTimer.durations
    total = sum(len(r["input_ids"]) for r in rows)
    return {
        "tokens": total * len(timed) / len(StepTimer.durations),
        "seconds": sum(timed),
        "steps": len(StepTimer.durations),
    }


def child(which: str, model: str, data: str, out: str, micro: int, cutoff: int) -> None:
    runner = run_bumblecore if which == "bumblecore" else run_trainer
    result = runner(model, data, out, micro, cutoff)
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
    results["throughput_ratio"] = (
        results["throughput/bumblecore"]["tokens_per_sec"] / results["throughput/trainer"]["tokens_per_sec"]
    )
    results["memory_ratio"] = results["memory/bumblecore"]["peak_rss_mb"] / results["memory/trainer"]["peak_rss_mb"]
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


if __name__ == "__main__":
    main()
