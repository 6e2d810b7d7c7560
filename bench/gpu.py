"""What only a GPU can show, in one command: bf16 training throughput and MFU, flash attention,
fused vs chunked cross-entropy, torch.compile, DeepSpeed ZeRO-2/3 with a consolidated save.

    python bench/gpu.py [--only NAME ...] [--steps N] [--json out.json]
    python bench/gpu.py --dry_run          # the same code paths on the CPU, tiny shapes (a smoke test)

Checks (each reports its figures; a check whose package is missing says so and the rest go on):
- mfu:        bf16 training steps of the 0.5B and 1.5B presets at sequence 4096, packed rows
              (documents of 256-2048 tokens), SDPA and flash attention; tokens/s and
              MFU = tokens/s x (6 N + 6 L h s) / peak bf16 FLOP/s (N non-embedding + LM head
              parameters, L layers, h hidden, s sequence: the causal attention term).
- flash:      logits of flash attention (flash-attn 2 or flash-attn-4) vs SDPA in bf16, dense
              and packed (varlen) rows.
- varlen:     packed rows' attention (fwd + bwd): SDPA with the dense per-document mask, SDPA per
              document (the default without flash-attn) and flash-attn's varlen kernel, each
              against an fp32 masked reference, and their times.
- liger:      enable_liger_kernel (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy) vs our
              kernels on 4 layers of the 0.5B preset: loss, gradients, step time, peak memory.
- fused_ce:   liger-kernel's fused linear cross-entropy vs our chunked cross-entropy: loss,
              gradient, time and peak memory at vocabulary 151,936.
- compile:    torch.compile of the model: training step time vs eager.
- deepspeed:  `bumblecore train` SFT of the 0.5B preset (4 layers) on every GPU under ZeRO-2 and ZeRO-3 through
              the real DeepSpeed, then the ZeRO-3 16-bit consolidated export loaded in transformers.
- decode:     bench/generate.py on the GPU (batch 1 vs transformers generate, batch 16 vs 1).

Peak FLOP/s: dense bf16 of the detected GPU (H100/H200 SXM 989 TFLOP/s, A100 312), or --peak_tflops.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops(override: float | None) -> float:
    if override:
        return override * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return 1e12  # dry run on a CPU: an arbitrary unit so the arithmetic still runs


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def packed_batch(batch: int, seq: int, vocab: int, device, seed: int = 0) -> dict:
    """Rows of `seq` tokens packed from documents of 256-2048 tokens (fewer when seq is small)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    segments = torch.zeros(batch, seq, dtype=torch.long)
    positions = torch.zeros(batch, seq, dtype=torch.long)
    low, high = min(256, seq // 4), min(2048, seq // 2)
    for row in range(batch):
        start, index = 0, 0
        while start < seq:
            length = min(int(torch.randint(low, high + 1, (1,), generator=generator)), seq - start)
            segments[row, start : start + length] = index
            positions[row, start : start + length] = torch.arange(length)
            start, index = start + length, index + 1
    return {
        "input_ids": ids.to(device),
        "labels": ids.to(device),
        "segment_ids": segments.to(device),
        "position_ids": positions.to(device),
    }


def model_for(preset: str, attn: str, device, layers: int | None = None, vocab: int | None = None):
    from bumblecore.model.bumblebee import Bumblebee
    from bumblecore.model.config import BumblebeeConfig

    overrides = {"attn_implementation": attn}
    if layers:
        overrides["num_hidden_layers"] = layers
    if vocab:
        overrides["vocab_size"] = vocab
    torch.manual_seed(0)
    return Bumblebee(BumblebeeConfig.from_preset(preset, **overrides)).to(device)


def flops_per_token(model, seq: int) -> float:
    c = model.config
    embedding = c.vocab_size * c.hidden_size
    parameters = sum(p.numel() for p in model.parameters())
    dense = parameters - embedding + (embedding if c.tie_word_embeddings else 0)  # the LM head multiplies either way
    return 6 * dense + 6 * c.num_hidden_layers * c.hidden_size * seq


def training_steps(model, batch: dict, steps: int, dtype) -> float:
    """Seconds per step (after 2 warm-up steps) of forward + chunked loss + backward + AdamW."""
    from bumblecore.train.sft import LanguageModelingStage

    stage = LanguageModelingStage()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.cuda.is_available())
    model.train()
    times = []
    for step in range(steps + 2):
        sync()
        started = time.perf_counter()
        with torch.autocast(batch["input_ids"].device.type, dtype=dtype):
            loss, _ = stage.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= 2:
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------- checks


def check_mfu(args, device, dtype) -> list[dict]:
    from bumblecore.model.attention import flash_available

    rows = []
    presets = [("0.5B", None), ("1.5B", None)] if not args.dry_run else [("0.5B", 2)]
    seq, batch = (4096, args.micro_batch) if not args.dry_run else (256, 1)
    for preset, layers in presets:
        for attn in ["sdpa"] + (["flash_attn"] if flash_available() and device.type == "cuda" else []):
            model = model_for(preset, attn, device, layers=layers, vocab=None if not args.dry_run else 1024)
            model.set_gradient_checkpointing(args.gradient_checkpointing)
            data = packed_batch(batch, seq, model.config.vocab_size, device)
            seconds = training_steps(model, data, args.steps, dtype)
            tokens_per_sec = batch * seq / seconds
            mfu = tokens_per_sec * flops_per_token(model, seq) / peak_flops(args.peak_tflops)
            rows.append(
                {
                    "check": "mfu",
                    "preset": preset,
                    "attention": attn,
                    "seq": seq,
                    "micro_batch": batch,
                    "tokens_per_sec": round(tokens_per_sec),
                    "mfu": round(mfu, 4),
                    "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)
                    if device.type == "cuda"
                    else None,
                }
            )
            print(rows[-1], flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return rows


def check_flash(args, device, dtype) -> list[dict]:
    from bumblecore.model.attention import flash_available

    if device.type != "cuda" or not flash_available():
        return [{"check": "flash", "skipped": "no CUDA or no flash-attn / flash-attn-4 installed"}]
    model = model_for("0.5B", "sdpa", device, layers=4).to(dtype).eval()
    data = packed_batch(2, 2048, model.config.vocab_size, device)
    rows = []
    with torch.no_grad():
        for name, kwargs in (
            ("dense", {}),
            ("packed", {"segment_ids": data["segment_ids"], "position_ids": data["position_ids"]}),
        ):
            reference = model(data["input_ids"], **kwargs).float()
            model.config.attn_implementation = "flash_attn"
            for layer in model.model.layers:
                layer.self_attn.attn_implementation = "flash_attn"
            got = model(data["input_ids"], **kwargs).float()
            model.config.attn_implementation = "sdpa"
            for layer in model.model.layers:
                layer.self_attn.attn_implementation = "sdpa"
            rows.append(
                {
                    "check": "flash",
                    "rows": name,
                    "max_abs_logit_diff": float((got - reference).abs().max()),
                    "mean_abs_logit_diff": float((got - reference).abs().mean()),
                }
            )
            print(rows[-1], flush=True)
    return rows


def check_fused_ce(args, device, dtype) -> list[dict]:
    from bumblecore.train.losses import chunked_cross_entropy

    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return [{"check": "fused_ce", "skipped": "liger-kernel not installed (pip install -e '.[gpu]')"}]
    if device.type != "cuda":
        return [{"check": "fused_ce", "skipped": "liger's kernels need CUDA"}]
    tokens, hidden_size, vocab = 8192, 896, 151936
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    results = {}
    for name in ("chunked", "liger"):
        hidden.grad = None
        head.weight.grad = None
        torch.cuda.reset_peak_memory_stats()
        sync()
        started = time.perf_counter()
        if name == "chunked":
            total, count = chunked_cross_entropy(hidden, head, targets)
            loss = total / count
        else:
            loss = LigerFusedLinearCrossEntropyLoss()(head.weight, hidden, targets)
        loss.backward()
        sync()
        results[name] = {
            "loss": float(loss),
            "seconds": time.perf_counter() - started,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
            "grad": hidden.grad.float().clone(),
        }
    difference = float((results["chunked"]["grad"] - results["liger"]["grad"]).abs().max())
    row = {
        "check": "fused_ce",
        "loss_chunked": results["chunked"]["loss"],
        "loss_liger": results["liger"]["loss"],
        "max_grad_diff": difference,
        "ms_chunked": round(results["chunked"]["seconds"] * 1000, 1),
        "ms_liger": round(results["liger"]["seconds"] * 1000, 1),
        "peak_gb_chunked": round(results["chunked"]["peak_gb"], 2),
        "peak_gb_liger": round(results["liger"]["peak_gb"], 2),
    }
    print(row, flush=True)
    return [row]


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def check_varlen(args, device, dtype) -> list[dict]:
    """Packed rows' attention, forward + backward on (batch, seq, 14 heads, 2 kv heads, 64): the dense
    per-document mask through SDPA, SDPA per document (the default without flash-attn) and, when
    installed, flash-attn's varlen kernel; each against an fp32 masked reference (max |diff| of the
    output and of dq), and its time."""
    from bumblecore.model import attention

    batch, seq, reps = (2, 4096, 10) if not args.dry_run else (1, 256, 2)
    data = packed_batch(batch, seq, 2, device)
    segments = data["segment_ids"]
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, seq, 14, 64, device=device, generator=generator)
    k, v = (torch.randn(batch, seq, 2, 64, device=device, generator=generator) for _ in range(2))
    grad_out = torch.randn(batch, seq, 14, 64, device=device, generator=generator)
    scale = 64**-0.5
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    dense = attention.AttentionMask(dense=(causal[None] & (segments[:, :, None] == segments[:, None, :]))[:, None])
    varlen = attention.packed_document_boundaries(segments)

    def heads_first(kernel):  # eager/SDPA take (b, heads, s, d)
        return lambda q, k, v, mask, scale: kernel(*(t.transpose(1, 2) for t in (q, k, v)), mask, scale).transpose(1, 2)

    def run(kernel, mask, precision):
        leaves = [t.detach().to(precision).requires_grad_() for t in (q, k, v)]
        out = kernel(*leaves, mask, scale)
        out.backward(grad_out.to(precision))
        return out.detach().float(), leaves[0].grad.float()

    reference = run(heads_first(attention.eager_attention), dense, torch.float32)
    kernels = {
        "sdpa_dense_mask": (heads_first(attention.sdpa_attention), dense),
        "sdpa_per_document": (attention.per_document_attention, varlen),
    }
    if device.type == "cuda" and attention.flash_available():
        kernels["flash_varlen"] = (attention.flash_attention, varlen)
    rows = []
    for name, (kernel, mask) in kernels.items():
        out, dq = run(kernel, mask, dtype)
        row = {
            "check": "varlen",
            "kernel": name,
            "documents": len(varlen.cu_seqlens) - 1,
            "max_abs_out_diff": float((out - reference[0]).abs().max()),
            "max_abs_dq_diff": float((dq - reference[1]).abs().max()),
            "fwd_bwd_ms": round(timed(functools.partial(run, kernel, mask, dtype), reps) * 1000, 2),
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def check_liger(args, device, dtype) -> list[dict]:
    """enable_liger_kernel (model/liger.py) on the 0.5B preset (4 layers), packed rows of 2048 tokens:
    the loss, every gradient and the step time and peak memory against the same model without liger."""
    import copy

    from bumblecore.model.liger import liger_refusal, use_liger_kernels
    from bumblecore.train.sft import LanguageModelingStage

    refusal = liger_refusal(device.type)
    if refusal:
        return [{"check": "liger", "skipped": refusal}]
    ours = model_for("0.5B", "sdpa", device, layers=4)
    theirs = copy.deepcopy(ours)
    swapped = use_liger_kernels(theirs)
    data = packed_batch(2, 2048, ours.config.vocab_size, device)
    stage, results = LanguageModelingStage(), {}
    for name, model in (("ours", ours), ("liger", theirs)):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=dtype):
            loss, _ = stage.loss(model, data)
        loss.backward()
        results[name] = {"loss": float(loss), "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    worst = max(
        float((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12))
        for p, q in zip(ours.parameters(), theirs.parameters())
    )
    for name, model in (("ours", ours), ("liger", theirs)):
        results[name]["step_ms"] = training_steps(model, data, args.steps, dtype) * 1000
    row = {
        "check": "liger",
        "kernels": swapped,
        "loss_ours": results["ours"]["loss"],
        "loss_liger": results["liger"]["loss"],
        "worst_relative_grad_diff": worst,
        "step_ms_ours": round(results["ours"]["step_ms"], 1),
        "step_ms_liger": round(results["liger"]["step_ms"], 1),
        "peak_gb_ours": round(results["ours"]["peak_gb"], 2),
        "peak_gb_liger": round(results["liger"]["peak_gb"], 2),
    }
    print(row, flush=True)
    return [row]


def check_compile(args, device, dtype) -> list[dict]:
    seq, batch = (2048, 4) if not args.dry_run else (128, 1)
    rows = []
    for compiled in (False, True):
        model = model_for(
            "0.5B", "sdpa", device, layers=None if not args.dry_run else 2, vocab=None if not args.dry_run else 1024
        )
        data = packed_batch(batch, seq, model.config.vocab_size, device)
        data.pop("segment_ids")  # the plain causal path: what compile is best at
        started = time.perf_counter()
        runner = torch.compile(model) if compiled else model  # attributes (lm_head) still reach the model
        seconds = training_steps(runner, data, args.steps, dtype)
        rows.append(
            {
                "check": "compile",
                "compiled": compiled,
                "step_ms": round(seconds * 1000, 1),
                "tokens_per_sec": round(batch * seq / seconds),
                "wall_s_including_compile": round(time.perf_counter() - started, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


def check_deepspeed(args, device, dtype) -> list[dict]:
    """ZeRO-2 and ZeRO-3 through `bumblecore train` on every GPU here (on the CPU with --dry_run: 2 gloo
    processes and a tiny model, the same code path)."""
    import torch

    rows = []
    cuda = device.type == "cuda"
    devices = max(1, torch.cuda.device_count()) if cuda else 2
    shape = (
        []
        if cuda
        else [
            "--hidden_size",
            "64",
            "--intermediate_size",
            "128",
            "--num_attention_heads",
            "4",
            "--num_key_value_heads",
            "2",
            "--vocab_size",
            "1024",
        ]
    )
    steps = 20 if cuda else 4
    common = (
        ["--train_model_precision", "bf16", "--cutoff_len", "1024"]
        if cuda
        else ["--train_model_precision", "fp32", "--cutoff_len", "128", "--accelerator", "cpu"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        demo = ROOT / "bumblecore" / "demo_data"
        base = [sys.executable, "-m", "bumblecore"]
        subprocess.run(
            base
            + [
                "init_model",
                "--preset",
                "0.5B",
                "--num_hidden_layers",
                "4" if cuda else "2",
                *shape,
                "--tokenizer_path",
                str(demo / "tokenizer"),
                "--output_dir",
                str(work / "init"),
            ],
            check=True,
        )
        subprocess.run(
            base
            + [
                "train",
                "--training_stage",
                "pretrain",
                "--model_name_or_path",
                str(work / "init"),
                "--dataset_path",
                str(demo / "pretrain.jsonl"),
                "--output_dir",
                str(work / "base"),
                "--max_steps",
                "2",
                *common,
                "--save_steps",
                "1000",
            ],
            check=True,
        )
        for stage in (2, 3):
            out = work / f"z{stage}"
            started = time.perf_counter()
            done = subprocess.run(
                base
                + [
                    "train",
                    "--training_stage",
                    "sft",
                    "--model_name_or_path",
                    str(work / "base"),
                    "--dataset_path",
                    str(demo / "sft_train.jsonl"),
                    "--output_dir",
                    str(out),
                    *common,
                    "--max_steps",
                    str(steps),
                    "--save_steps",
                    str(steps // 2),
                    "--devices",
                    str(devices),
                    "--gradient_accumulation_steps",
                    "1",
                    "--deepspeed_config_path",
                    str(ROOT / "configs" / "deepspeed" / f"ds_z{stage}_config.json"),
                ],
                capture_output=True,
                text=True,
            )
            row = {
                "check": "deepspeed",
                "zero_stage": stage,
                "returncode": done.returncode,
                "seconds": round(time.perf_counter() - started, 1),
            }
            if done.returncode == 0:
                history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                losses = [r["loss"] for r in history if "loss" in r]
                row.update(
                    devices=devices,
                    first_loss=losses[0],
                    last_loss=losses[-1],
                    tokens_per_sec=round(history[-1]["tokens_per_sec"]),
                    grad_norm=history[-1]["grad_norm"],
                )
                from transformers import AutoModelForCausalLM

                hf = AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{steps}")
                row["checkpoint_loads_in_transformers"] = type(hf).__name__
            else:
                row["error"] = done.stderr[-1500:]
            rows.append(row)
            print(row, flush=True)
    return rows


def check_decode(args, device, dtype) -> list[dict]:
    sys.path.insert(0, str(ROOT / "bench"))
    import generate as generate_bench

    results = generate_bench.run(quick=args.dry_run)
    row = {"check": "decode", **{k: v for k, v in results.items() if isinstance(v, (int, float, str))}}
    print(row, flush=True)
    return [row]


def installed_versions() -> dict:
    """The optional packages a check depends on, as this machine has them (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "deepspeed", "triton", "liger-kernel", "flash-attn", "flash-attn-4"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


CHECKS = {
    "mfu": check_mfu,
    "flash": check_flash,
    "varlen": check_varlen,
    "liger": check_liger,
    "fused_ce": check_fused_ce,
    "compile": check_compile,
    "deepspeed": check_deepspeed,
    "decode": check_decode,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these checks")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per measurement")
    parser.add_argument("--micro_batch", type=int, default=2, help="rows of 4096 tokens per step for the MFU check")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute activations (bigger batches fit)"
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not detected")
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes on the CPU: checks that the code paths run")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA GPU visible: nothing to measure (use --dry_run to exercise the code paths on the CPU)")
        return
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    names = args.only or list(CHECKS)
    if args.dry_run:
        names = [
            n for n in names if n in ("mfu", "compile", "flash", "varlen", "liger", "fused_ce", "deepspeed")
        ]  # decode has its own CPU bench
    header = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "peak_tflops": peak_flops(args.peak_tflops) / 1e12,
        **installed_versions(),
    }
    print(header, flush=True)
    results = [header]
    for name in names:
        try:
            rows = CHECKS[name](args, device, dtype)
            for row in rows:
                if "skipped" in row:
                    print(row, flush=True)
            results += rows
        except Exception as err:  # one failing check must not hide the others' figures
            results.append({"check": name, "failed": f"{type(err).__name__}: {err}"})
            print(results[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
