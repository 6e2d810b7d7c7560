"""The memory plan's parts against independent oracles (autograd's own saved tensors, the chunked loss's
chunk size, safetensors' own writer), and a short real run whose measured peak lands within +-25% of
the plan it printed."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from tiny import DEMO_TOKENIZER, TINY_INIT_ARGS, saved_tensor_bytes

from bumblecore.model.bumblebee import Bumblebee
from bumblecore.model.config import BumblebeeConfig
from bumblecore.train.memory import Workload, peak_host_rss_bytes, plan_memory, runtime_rss
from bumblecore.train.runtime import fill_deepspeed_config, load_deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "bumblecore" / "demo_data"
FINAL_LINE = re.compile(r"^peak memory per rank: host RSS ([\d,]+) MB(?:, ([\d,]+) MB)* \(planned ([\d,]+) MB\)$")


def saved_activation_bytes(model, ids, compute: str, forward=None) -> int:
    """Bytes of every tensor autograd keeps for backward in one forward, weights excluded (each storage
    counted once): what the plan's activation closed form predicts. `forward(ids)`: another function
    of the model's weights (default: the model on packed rows)."""
    segments = torch.zeros_like(ids)
    segments[:, ids.shape[1] // 2 :] = 1  # packed rows: two documents each

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "autocast"):
            if forward is not None:
                forward(ids)
            else:
                model(ids, segment_ids=segments, return_hidden_states=True)

    return saved_tensor_bytes(model, run)


@pytest.mark.parametrize("compute", ["fp32", "autocast", "half"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shape", [(64, 128, 4, 2), (256, 704, 8, 2), (192, 512, 6, 6)])
def test_activation_closed_form_matches_what_autograd_keeps(compute, checkpointing, shape):
    """Per token and layer, 4(7h + 3i + 2kv) bytes in fp32, 2(12h + 3i + 2kv) under bf16 autocast
    (beside autocast's bf16 weight copies, 2 bytes per linear weight), 2(7h + 3i + 2kv) with 16-bit
    weights; with checkpointing each layer's input plus one layer. Within 15% of the saved tensors."""
    hidden, intermediate, heads, kv_heads = shape
    layers, batch, seq = 3, 2, 64
    config = BumblebeeConfig(
        vocab_size=500,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    torch.manual_seed(0)
    model = Bumblebee(config).train()
    if compute == "half":
        model = model.to(torch.bfloat16)
    work = Workload.from_config(
        json.loads(json.dumps(vars(config), default=str)), batch, seq, gradient_checkpointing=checkpointing
    )
    ids = torch.randint(0, 500, (batch, seq))
    if checkpointing:  # the recompute in backward holds one layer's activations; the forward keeps the inputs
        model.set_gradient_checkpointing(True)
        measured = saved_activation_bytes(model, ids, compute)
        model.set_gradient_checkpointing(False)
        measured += saved_activation_bytes(model, ids, compute) // layers  # one layer's worth (the outside is small)
    else:
        measured = saved_activation_bytes(model, ids, compute)
    predicted = work.activations(compute)
    if compute == "autocast":  # the bf16 weight copies autocast keeps for backward (one layer's when recomputed)
        linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
        predicted += 2 * linear // (layers if checkpointing else 1)
    assert predicted == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_closed_form_matches_what_autograd_keeps(checkpointing):
    """tiled_mlp: 4 x 3 x intermediate bytes per token no longer kept per layer, one chunk's recomputed in
    backward instead. Measured: what autograd keeps for the tiled model (every layer, or with
    checkpointing the inputs plus one layer), plus what it keeps for one chunk through the untiled MLP."""
    from bumblecore.model.tiling import enable_long_context

    layers, batch, seq, tiles = 3, 2, 64, 4
    config = BumblebeeConfig(vocab_size=500, hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model = Bumblebee(config).train()
    enable_long_context(model, tiles)
    ids = torch.randint(0, 500, (batch, seq))
    work = Workload.from_config(json.loads(json.dumps(vars(config), default=str)), batch, seq,
                                gradient_checkpointing=checkpointing, mlp_tiles=tiles)  # fmt: skip
    model.set_gradient_checkpointing(checkpointing)
    measured = saved_activation_bytes(model, ids, "fp32")
    if checkpointing:
        model.set_gradient_checkpointing(False)
        measured += saved_activation_bytes(model, ids, "fp32") // layers
    chunk = torch.randn(batch * seq // tiles, 256, requires_grad=True)
    mlp = model.model.layers[0].mlp
    measured += saved_activation_bytes(mlp, chunk, "fp32", mlp.untiled)
    measured -= chunk.numel() * 4  # the chunk's input: a view of the layer's, counted above
    assert work.activations("fp32") == pytest.approx(measured, rel=0.15)
    untiled = Workload.from_config(json.loads(json.dumps(vars(config), default=str)), batch, seq,
                                   gradient_checkpointing=checkpointing)  # fmt: skip
    assert work.activations("fp32") < untiled.activations("fp32")


def test_activation_offload_moves_the_checkpointed_inputs_to_host():
    """activation_offload: every layer's checkpointed input (hidden wide, per token) leaves the device's
    activations and shows as host memory."""
    shape = dict(hidden_size=256, intermediate_size=704, num_layers=6, kv_width=64, q_width=256, vocab_size=500,
                 micro_batch_size=1, sequence_length=4096, gradient_checkpointing=True)  # fmt: skip
    kept, offloaded = Workload(**shape), Workload(**shape, activation_offload=True)
    moved = 6 * 2 * 256 * 4096  # layers x 16-bit x hidden x tokens
    assert kept.activations("half") - offloaded.activations("half") == moved
    plans = [plan_memory(10**6, 10**6, "bf16", 1, {"zero_optimization": {"stage": 0}}, "cuda:0", None,
                         workload=w, prompt_release=True) for w in (kept, offloaded)]  # fmt: skip
    assert plans[1].host_offload - plans[0].host_offload == moved
    assert plans[0].peak - plans[1].peak == moved


def test_loss_chunk_is_the_losses_chunk():
    """The plan's loss chunk uses the chunked cross-entropy's own chunk size (losses.tokens_per_chunk)."""
    from bumblecore.train.losses import tokens_per_chunk

    for vocab, tokens in [(151_936, 4096), (32_000, 512), (768, 100_000)]:
        work = Workload(64, 128, 2, 32, 64, vocab, micro_batch_size=1, sequence_length=tokens)
        chunk = min(tokens, tokens_per_chunk(torch.nn.Linear(1, vocab, bias=False)))
        assert work.loss_chunks("fp32") == chunk * vocab * 4
        assert work.loss_chunks("autocast") == chunk * vocab * 6


def test_layer_params_count_a_real_layer():
    config = BumblebeeConfig(
        vocab_size=500, hidden_size=96, intermediate_size=256, num_hidden_layers=1, num_attention_heads=6,
        num_key_value_heads=2, attention_bias=False,
    )  # fmt: skip
    layer = Bumblebee(config).model.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert Workload.from_config(vars(config), 1, 1).layer_params == linear


def test_plan_parts_per_strategy():
    """The runtime's buffers: DDP keeps a second copy of the gradients in its buckets; ZeRO-3 holds at
    the whole model gathered at its peak (measured on CPU ranks); 16-bit ZeRO makes an fp32 copy of
    a rank's gradient partition at the step; autocast keeps 2 bytes per weight."""
    p, n = 10_000_000, 2
    work = Workload(512, 1024, 8, 128, 512, 1000, micro_batch_size=1, sequence_length=16, embedding_params=512_000)
    ddp = plan_memory(p, p, "fp32", n, None, "host", None, workload=work, runtime=300 << 20)
    assert ddp.transient["DDP gradient buckets"] == 4 * p
    assert ddp.peak == (300 << 20) + 16 * p + sum(ddp.transient.values())
    one_bf16 = plan_memory(p, p, "bf16", 1, None, "host", None, workload=work)
    assert one_bf16.transient["autocast copies"] == 2 * p and "DDP gradient buckets" not in one_bf16.transient
    zero = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1_000_000,
                                  "stage3_prefetch_bucket_size": 500_000, "reduce_bucket_size": 250_000}}  # fmt: skip
    z3 = plan_memory(p, p, "bf16", n, zero, "host", None, workload=work)
    assert z3.transient["gathered parameters"] == 2 * p  # measured: the whole model, whatever the limits
    assert z3.transient["reduce bucket"] == 2 * 250_000
    assert z3.transient["fp32 gradient copy"] == 4 * p // n
    # Freed blocks straight back to the OS: the live-parameter limit and the embedding stay gathered, and
    # nothing is kept by the allocator.
    prompt = plan_memory(p, p, "bf16", n, zero, "host", None, workload=work, prompt_release=True)
    assert prompt.transient["gathered parameters"] == 2 * (1_000_000 + 512_000)
    assert "freed blocks the allocator keeps" not in prompt.transient
    assert "freed blocks the allocator keeps" in z3.transient
    # Short rows: the gradients outgrow the activations, which add nothing beyond them.
    assert ddp.transient["activations and loss chunks"] == 0
    long = Workload(512, 1024, 8, 128, 512, 1000, micro_batch_size=8, sequence_length=2048)
    lora = plan_memory(p, p // 100, "fp32", 1, None, "host", None, workload=long)
    assert (
        lora.transient["activations and loss chunks"] == long.activations("fp32") + long.loss_chunks() - lora.gradients
    )


def test_refusal_counts_the_whole_peak():
    """A run whose states fit but whose activations do not is refused too, naming what to change."""
    p = 1_000_000
    work = Workload(4096, 11008, 32, 4096, 4096, 32000, micro_batch_size=64, sequence_length=4096)
    plan = plan_memory(p, p // 100, "fp32", 1, None, "a small device", 100 * p, workload=work)
    assert plan.total < plan.available < plan.peak
    with pytest.raises(ValueError, match="cannot fit.*gradient checkpointing"):
        plan.check()


def test_shipped_zero3_config_sizes_its_knobs_from_the_layer():
    """The shipped ZeRO-3 config's live-parameter and reuse limits follow the model (DeepSpeed's 1e9
    defaults would keep a sub-1B model whole on every rank): two layers live, one layer of reuse."""
    layer = 11_149_312
    filled = fill_deepspeed_config(
        load_deepspeed_config(ROOT / "configs" / "deepspeed" / "ds_z3_config.json"),
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        world_size=2,
        precision="fp32",
        max_grad_norm=1.0,
        hidden_size=1024,
        layer_params=layer,
    )["zero_optimization"]
    assert filled["stage3_max_live_parameters"] == 2 * layer
    assert filled["stage3_max_reuse_distance"] == layer
    assert filled["stage3_prefetch_bucket_size"] == int(0.9 * 1024**2)
    assert filled["sub_group_size"] == layer  # the step's flattened-gradient transient: a layer's slice


PROMPT_RELEASE_PROBE = """
import sys, torch
from bumblecore.train.memory import release_freed_memory_promptly, runtime_rss
if sys.argv[1] == "prompt":
    assert release_freed_memory_promptly()
torch.ones(2 << 20)  # an 8 MiB block freed: glibc raises its mmap threshold past it
before = runtime_rss()
big, keep = [], []
for _ in range(48):  # 8 MiB blocks, each followed by a small one that stays: holes the heap cannot trim
    big.append(torch.ones(2 << 20))
    keep.append(torch.ones(8 << 10))
del big
print((runtime_rss() - before) >> 20)
"""


@pytest.mark.parametrize("mode", ["default", "prompt"])
def test_prompt_release_hands_freed_blocks_back(mode):
    """The kernel's RSS as the oracle: glibc keeps 384 MiB of freed 8 MiB blocks behind small live ones;
    with release_freed_memory_promptly they were their own mappings and are gone."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", PROMPT_RELEASE_PROBE, mode], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    kept_mib = int(done.stdout.split()[-1])
    assert kept_mib < 32 if mode == "prompt" else kept_mib > 300


SHARED_MASTER_PROBE = """
import hashlib, os, sys, torch
from bumblecore.model.bumblebee import Bumblebee
from bumblecore.model.config import BumblebeeConfig
from bumblecore.train.backend import deepspeed_engine, share_fp32_master_weights
from bumblecore.train.runtime import build_fabric, fill_deepspeed_config

stage, share = int(sys.argv[1]), sys.argv[3] == "share"
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
config = fill_deepspeed_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}},
    micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, precision="fp32", max_grad_norm=None, hidden_size=64)
fabric = build_fabric(accelerator="cpu", devices=1, train_model_precision="fp32", deepspeed_config=config)
fabric.launch()
torch.manual_seed(0)
model = Bumblebee(BumblebeeConfig.from_preset("0.5B", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, torch_dtype="float32"))
numel = sum(p.numel() for p in model.parameters())
wrapped, _ = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True))
if share:
    freed = share_fp32_master_weights(wrapped)
    assert numel * 4 <= freed <= numel * 4 + 4096, (freed, numel)  # the whole master copy (plus alignment)
    assert share_fp32_master_weights(wrapped) == 0  # once shared, nothing more to free
for step in range(3):
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(step))
    fabric.backward(wrapped(ids).float().logsumexp(-1).mean())
    deepspeed_engine(wrapped).step()
from deepspeed.utils import safe_get_full_fp32_param
digest = hashlib.sha256()
with torch.no_grad():
    for p in wrapped.parameters():
        digest.update((safe_get_full_fp32_param(p) if stage == 3 else p).numpy().tobytes())
print("weights", digest.hexdigest())
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_fp32_zero_keeps_its_weights_once_and_changes_no_number(stage):
    """fp32 weights are their own master copy under ZeRO-1/3 (DeepSpeed's clone is dropped: a model's
    worth of fp32 bytes freed), and three steps give bit for bit the weights of DeepSpeed's own copy."""
    import socket
    import subprocess

    with socket.socket() as one, socket.socket() as other:  # two ports, distinct since both are held
        one.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        ports = {"share": one.getsockname()[1], "copy": other.getsockname()[1]}
    # The two one-process runs side by side: each is mostly a single-threaded interpreter importing
    # DeepSpeed and Lightning, so on 2 cores together they take about the wall time of one.
    probes = {
        mode: subprocess.Popen(
            [sys.executable, "-c", SHARED_MASTER_PROBE, str(stage), str(port), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        for mode, port in ports.items()
    }
    weights = {}
    for mode, probe in probes.items():
        out, err = probe.communicate(timeout=300)
        assert probe.returncode == 0, (out + err)[-3000:]
        weights[mode] = out.split("weights ")[-1].strip()
    assert weights["share"] == weights["copy"]


@pytest.mark.parametrize("max_shard_size", ["5GB", 1000])
def test_streamed_safetensors_are_safetensors_own_bytes(tmp_path, max_shard_size):
    """Writing tensor by tensor (in any order) gives the same files, byte for byte, as safetensors'
    save_file over the same shards (mixed dtypes, a transposed view, several shards)."""
    from safetensors.torch import save_file

    from bumblecore.model.hf_io import SafetensorsShards

    torch.manual_seed(0)
    state = {
        "model.layers.1.w": torch.randn(20, 10),
        "model.layers.0.w": torch.randn(10, 20).t(),
        "b": torch.randn(7).to(torch.bfloat16),
        "steps": torch.arange(4),
        "half": torch.randn(3, 2).half(),
        "mask": torch.tensor([True, False, True]),
    }
    writer = SafetensorsShards(tmp_path, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, max_shard_size)
    for name in reversed(list(state)):
        writer.write(name, state[name])
    writer.finish()
    assert len(writer.names) == (1 if max_shard_size == "5GB" else 2)
    for shard, name in zip(writer.shards, writer.names):
        save_file({k: state[k].contiguous() for k in shard}, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert (tmp_path / name).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_peak_is_the_kernels_high_water_mark():
    """VmHWM: at least the RSS now, and it grows when a large buffer is touched."""
    before = peak_host_rss_bytes()
    assert before >= runtime_rss() > 0
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert peak_host_rss_bytes() >= before + (48 << 20) or before > runtime_rss() + (64 << 20)
    del block


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_a_run_ends_with_its_peak_beside_the_plan(tmp_path, devices):
    """A short SFT on a tiny model (one process, and DDP on 2 gloo ranks): the last line has the
    contract's format, and each rank's measured peak is within +-25% of the plan."""
    import subprocess

    from bumblecore.cli import main

    main(["init_model", *TINY_INIT_ARGS, "--tokenizer_path", str(DEMO_TOKENIZER), "--output_dir", str(tmp_path / "m")])
    done = subprocess.run(
        [sys.executable, "-m", "bumblecore", "train",
         "--training_stage", "pretrain", "--model_name_or_path", str(tmp_path / "m"),
         "--dataset_path", str(DEMO / "pretrain_eval.jsonl"), "--output_dir", str(tmp_path / "out"),
         "--cutoff_len", "64", "--max_steps", "2", "--train_micro_batch_size_per_gpu", "2",
         "--train_model_precision", "fp32", "--accelerator", "cpu", "--devices", str(devices),
         "--save_steps", "100", "--cache_dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    last = [line for line in done.stdout.splitlines() if line.strip()][-1]  # stderr holds the progress bar
    match = FINAL_LINE.match(last)
    assert match, last
    peaks = [float(v.replace(",", "")) for v in re.findall(r"([\d,]+) MB", last)[:-1]]
    planned = float(match.group(3).replace(",", ""))
    assert len(peaks) == devices
    for peak in peaks:
        assert 0.75 * planned <= peak <= 1.25 * planned, last
