"""`compile: true` vs eager training on CPU: tokens/s after warm-up and the compile time, paired.

    python bench/compile_train.py [--model smollm2|tiny|both] [--rounds 2] [--seq 256] [--warmup 4] [--steps 4]

One training step is what the engine runs for packed pretraining/SFT: Bumblebee's forward over packed
rows (documents of random lengths, per-document attention), the chunked cross-entropy, backward, AdamW.
Each side runs in its own process with an empty inductor cache (so the compile time is a cold one, as a
user's first run sees it); the sides alternate within a round. Reported per side: `warmup_s`, the wall
time of the first step and `--warmup` more (compilation and recompiles included for the compiled side),
`compile_s` = the compiled side's warmup_s minus eager's, and tokens/s over the `--steps` timed steps
after them. fp32, the same seeded batches on both sides.

Models: SmolLM2-135M-Instruct (30 layers, hidden 576, the converted checkpoint of
bumblecore/model/gguf.py) and the tests' tiny shape (2 layers, hidden 64, vocab 768).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = Path.home() / ".cache" / "bumblecore" / "models" / "SmolLM2-135M-Instruct-0.1.2"


def build_model(name: str):
    import torch

    from bumblecore.model.bumblebee import Bumblebee

    if name == "smollm2":
        return Bumblebee.from_pretrained(SMOLLM2, dtype=torch.float32)
    sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny shape lives with them
    from tiny import make_tiny_model

    return make_tiny_model(768, initializer_range=0.02)  # a real model's init std


def packed_batch(step: int, vocab: int, seq: int, rows: int):
    """Rows of documents 16..seq/2 tokens long back to back: ids, per-document positions, segment ids."""
    import torch

    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab, (rows, seq), generator=generator)
    segments, positions = torch.zeros(rows, seq, dtype=torch.long), torch.zeros(rows, seq, dtype=torch.long)
    for row in range(rows):
        start, document = 0, 0
        while start < seq:
            length = int(torch.randint(16, seq // 2, (1,), generator=generator))
            end = min(seq, start + length)
            segments[row, start:end], positions[row, start:end] = document, torch.arange(end - start)
            start, document = end, document + 1
    return ids, positions, segments


def one_side(model_name: str, compiled: bool, seq: int, rows: int, warmup: int, steps: int) -> dict:
    import torch

    from bumblecore.model.regional_compile import compile_for_training
    from bumblecore.train.losses import chunked_cross_entropy, shift_targets

    model = build_model(model_name).train()
    if compiled:
        compile_for_training(model, model.lm_head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = model.config.vocab_size

    def step(index: int) -> float:
        ids, positions, segments = packed_batch(index, vocab, seq, rows)
        started = time.perf_counter()
        hidden = model(ids, position_ids=positions, segment_ids=segments, return_hidden_states=True)
        total, count = chunked_cross_entropy(hidden, model.lm_head, shift_targets(ids, segments))
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    # Dynamo compiles at the first step and, where a size changes (the document count, the loss chunk's
    # length), once more to make it dynamic: the warm-up steps hold those recompiles.
    first = sum(step(index) for index in range(1 + warmup))
    timed = [step(1 + warmup + i) for i in range(steps)]
    return {
        "model": model_name,
        "compiled": compiled,
        "warmup_s": round(first, 2),
        "step_s": round(sum(timed) / len(timed), 3),
        "tokens_per_s": round(rows * seq * len(timed) / sum(timed), 1),
        "threads": torch.get_num_threads(),
    }


def run_side(model: str, compiled: bool, args) -> dict:
    """One side in a fresh process with an empty inductor cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, __file__, "--side", model, "--seq", str(args.seq), "--rows", str(args.rows)]
        command += ["--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--compiled"] if compiled else [])
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-3000:])
        return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_side(args.side, args.compiled, args.seq, args.rows, args.warmup, args.steps)))
        return
    models = ["smollm2", "tiny"] if args.model == "both" else [args.model]
    for model in models:
        for round_index in range(args.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)  # alternate who goes first
            sides = {compiled: run_side(model, compiled, args) for compiled in order}
            eager, compiled = sides[False], sides[True]
            compiled["compile_s"] = round(compiled["warmup_s"] - eager["warmup_s"], 1)
            compiled["speedup"] = round(compiled["tokens_per_s"] / eager["tokens_per_s"], 3)
            print(json.dumps({"round": round_index, "eager": eager, "compiled": compiled}), flush=True)


if __name__ == "__main__":
    main()
