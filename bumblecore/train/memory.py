"""The memory plan of a run: what each rank will hold at its peak, checked against the device before
anything is allocated, and printed beside the measured peak when the run ends.

States, bytes per parameter with Adam (the ZeRO paper's accounting; P all parameters, T trainable, N ranks):

    plain / DDP (fp32 weights, bf16 autocast)     4P weights + 4T gradients + 8T Adam moments
    DeepSpeed with bf16/fp16                      2P weights + 2T gradients + 12T (fp32 master + moments)
    DeepSpeed in fp32                             4P weights + 4T gradients + 8T (the weights are the fp32 master)
    ZeRO-1 divides the optimizer states by N, ZeRO-2 the gradients too, ZeRO-3 the weights too;
    offload_optimizer / offload_param move those states to host memory.

Beside the states, the plan counts (see `Workload` and `plan_memory`):

    runtime      the process itself (Python, torch, the imported libraries), measured when the plan is made
    activations  what autograd keeps for backward per token and layer (closed forms below), for the run's
                 micro batch x sequence, all layers or (gradient checkpointing) each layer's input plus one
                 layer recomputed; with LoRA, its dropout copies of each adapted input
    loss chunks  the chunked cross-entropy's fp32 logits of one chunk (forward, and recomputed in backward)
    autocast     bf16 copies of the weights that autocast makes (and keeps until backward) under bf16-mixed
    runtime buffers  DDP's gradient buckets (a second copy of the gradients); DeepSpeed's reduce bucket,
                 the fp32 copy of a rank's gradient partition at the step (16-bit runs), its engine's own
                 state, and under ZeRO-3 the gathered parameters (its live-parameter limit and the embedding)
    allocator    what glibc keeps of the memory each step frees and makes again (activations, gradients,
                 ZeRO-3's gathered weights): about 0.6 of the largest, measured; none where freed blocks
                 go back to the OS at once (RuntimeArgs.release_freed_memory, the default under ZeRO-3 and SP)

Gradients and activations are not all alive at once: backward frees a layer's activations as it makes
that layer's gradients, so the plan counts the larger of the two (plus the embedding/head gradient).
With gradient accumulation they are: from the second micro batch on, the forward runs beside the
gradients summed so far, so the plan counts both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Optional

from bumblecore.train.losses import LOGITS_BUDGET_BYTES  # the chunked cross-entropy's logits per chunk

GIB = 1024**3
MIB = 2**20
# Measured on the CPU machine of docs/BENCHMARKS.md ("Memory plan: planned vs measured"): what glibc keeps
# of the memory a step frees and makes again, and DeepSpeed's own per-rank buffers and communication state.
ALLOCATOR_RETENTION = 0.6
DEEPSPEED_ENGINE_BYTES = 100 * 2**20


@dataclass
class Workload:
    """The model's shape and the run's batch: what activations depend on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    kv_width: int  # key/value heads x head dim
    q_width: int  # attention heads x head dim
    vocab_size: int
    micro_batch_size: int
    sequence_length: int
    gradient_checkpointing: bool = False
    lora_dropout: bool = False  # LoRA with dropout > 0: each adapted input is copied by its dropout
    embedding_params: int = 0  # the (tied) embedding and LM head: gradients made at backward's ends
    accumulates: bool = False  # gradient accumulation: every micro batch after the first runs beside the gradients
    mlp_tiles: int = 0  # tiled_mlp: the MLP's intermediates of one of this many chunks alive at a time
    activation_offload: bool = False  # the checkpointed layers' inputs wait in host memory (CUDA)

    @classmethod
    def from_config(cls, raw: dict, micro_batch_size: int, sequence_length: int, **kwargs) -> Workload:
        """From a model's config.json (Bumblebee, Qwen2, Llama and most transformers families)."""
        raw = {**raw.get("text_config", {}), **raw}
        hidden = int(raw.get("hidden_size", 0))
        heads = int(raw.get("num_attention_heads", 1) or 1)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        vocab = int(raw.get("vocab_size", 0))
        tied = raw.get("tie_word_embeddings", True)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(raw.get("intermediate_size", 4 * hidden)),
            num_layers=int(raw.get("num_hidden_layers", 0)),
            kv_width=int(raw.get("num_key_value_heads") or heads) * head_dim,
            q_width=heads * head_dim,
            vocab_size=vocab,
            micro_batch_size=micro_batch_size,
            sequence_length=sequence_length,
            embedding_params=vocab * hidden * (1 if tied else 2),
            **kwargs,
        )

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer: q and o projections, k and v, the gated MLP's three."""
        h = self.hidden_size
        return 2 * h * self.q_width + 2 * h * self.kv_width + 3 * h * self.intermediate_size

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.sequence_length

    def layer_bytes_per_token(self, compute: str) -> int:
        """Bytes autograd keeps per token for one decoder layer (fitted on Bumblebee with saved-tensor
        hooks over several shapes; tests/train/test_memory_plan.py checks it). fp32: the inputs of the two norms,
        the projections and the attention, RoPE'd q and the residuals (~7 of hidden), the MLP's gate,
        up and product (3 of intermediate: the activation is recomputed in backward, as are the norms'
        outputs, model/bumblebee.py), RoPE'd k and v (~2 of kv). 16-bit weights (DeepSpeed): the same
        in 16 bits. bf16 autocast: fp32 inputs and their bf16 casts both kept (~12 of hidden)."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_width
        if compute == "autocast":
            per = 2 * (12 * h + 3 * i + 2 * kv)
        elif compute == "half":
            per = 2 * (7 * h + 3 * i + 2 * kv)
        else:
            per = 4 * (7 * h + 3 * i + 2 * kv)
        if self.lora_dropout:  # dropout copies of 6 hidden-wide inputs and 1 intermediate-wide, with their masks
            per += (4 if compute == "fp32" else 2) * (6 * h + i) + (6 * h + i)
        return per

    def activations(self, compute: str) -> int:
        """Activation bytes alive at the start of backward, for one micro batch."""
        width = 4 if compute == "fp32" else 2
        outside = (10 if compute == "fp32" else 7) * self.hidden_size * self.tokens  # embedding output, final norm
        one_layer = self.layer_bytes_per_token(compute) * self.tokens
        long_context = tiled_and_offloaded(self, compute)  # what tiled_mlp and activation_offload take off
        if self.gradient_checkpointing:  # each layer's input kept; one layer recomputed in backward
            return self.num_layers * width * self.hidden_size * self.tokens + one_layer + outside - long_context
        return self.num_layers * one_layer + outside - long_context

    def loss_chunks(self, compute: str = "fp32") -> int:
        """The chunked cross-entropy's largest live tensor: one chunk's logits, recomputed in backward
        and turned into their gradient in place (train/losses.py); under 16-bit compute the head's
        16-bit logits and their fp32 copy."""
        if not self.vocab_size:
            return 0
        chunk = min(self.tokens, max(64, LOGITS_BUDGET_BYTES // (4 * self.vocab_size)))
        return chunk * self.vocab_size * (4 if compute == "fp32" else 6)


def tiled_and_offloaded(work: Workload, compute: str) -> int:
    """Activation bytes tiled_mlp and activation_offload keep off the device (model/tiling.py). Tiled, a
    layer keeps only its MLP chunks' inputs (views of what the projections keep anyway), not the 3
    intermediate-wide tensors per token, and one chunk's are recomputed at a time in backward; offloaded,
    the checkpointed layers' inputs are in host memory (`offloaded_activations`)."""
    saved = offloaded_activations(work, compute)
    if work.mlp_tiles > 1:
        width = 4 if compute == "fp32" else 2
        chunk = -(-work.tokens // work.mlp_tiles)
        stored_layers = 1 if work.gradient_checkpointing else work.num_layers  # the recomputed one, or all
        saved += 3 * work.intermediate_size * width * (stored_layers * work.tokens - chunk)
    return saved


def offloaded_activations(work: Workload, compute: str) -> int:
    """The checkpointed layers' inputs that activation_offload keeps in host memory."""
    if not (work.activation_offload and work.gradient_checkpointing):
        return 0
    return work.num_layers * (4 if compute == "fp32" else 2) * work.hidden_size * work.tokens


def sequence_parallel_share(work: Workload, size: int) -> Workload:
    """One rank's workload under Ulysses sequence parallelism over `size` ranks (train/sequence_parallel.py):
    its slice, ceil(sequence / size) tokens of each row, for everything but the attention core, which sees
    the whole sequence for heads / size: as many elements as all heads over the slice. The exchanged q, k,
    v and output replace the slice's own in what autograd keeps, so the per-token closed form holds
    (measured with saved-tensor hooks, tests/train/sequence_parallel_ranks.py)."""
    return replace(work, sequence_length=-(-work.sequence_length // size))


@dataclass
class MemoryPlan:
    parameters: int
    gradients: int
    optimizer: int
    device_name: str
    available: Optional[int]  # bytes this rank may use on its device; None when unknown
    strategy: str
    host_offload: int = 0  # bytes moved to host memory by ZeRO offload
    extra: dict = field(default_factory=dict)  # name -> bytes (e.g. a frozen DPO reference)
    runtime: int = 0  # the process itself before it builds anything
    transient: dict = field(default_factory=dict)  # name -> bytes alive at the peak beside the states

    @property
    def total(self) -> int:
        """The states: parameters, gradients, optimizer states and extra copies."""
        return self.parameters + self.gradients + self.optimizer + sum(self.extra.values())

    @property
    def peak(self) -> int:
        """The whole predicted peak of one rank: the process, its states and what is alive beside them."""
        return self.runtime + self.total + sum(self.transient.values())

    @property
    def peak_mb(self) -> int:
        return round(self.peak / MIB)

    def lines(self) -> list[str]:
        parts = [
            *([f"runtime {_gib(self.runtime)}"] if self.runtime else []),
            f"parameters {_gib(self.parameters)}",
            f"gradients {_gib(self.gradients)}",
            f"optimizer states {_gib(self.optimizer)}",
        ] + [f"{k} {_gib(v)}" for k, v in {**self.extra, **self.transient}.items() if v]
        where = (
            f"{_gib(self.available)} available on {self.device_name}"
            if self.available is not None
            else f"{self.device_name}"
        )
        text = f"  memory plan per rank ({self.strategy}): {', '.join(parts)} = {_gib(self.peak)} at the peak; {where}"
        lines = [text]
        if self.host_offload:
            lines.append(f"  offloaded to host memory per rank: {_gib(self.host_offload)}")
        return lines

    def check(self) -> None:
        if self.available is not None and self.peak > self.available:
            raise ValueError(
                f"this run cannot fit: each rank needs {_gib(self.peak)} at its peak ({_gib(self.total)} for "
                f"parameters, gradients and optimizer states; {self.strategy}), but {self.device_name} has "
                f"{_gib(self.available)} available. Shard more: ZeRO-3 (--deepspeed_config_path "
                "configs/deepspeed/ds_z3_config.json) over more devices, bf16, LoRA (--finetuning_type lora), "
                "or a smaller micro batch / cutoff_len with gradient checkpointing"
            )


def _gib(size: Optional[int]) -> str:
    if size is None:
        return "?"
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / MIB:.1f} MiB"


def plan_memory(
    total_params: int,
    trainable_params: int,
    precision: str,
    world_size: int,
    deepspeed_config: Optional[dict],
    device_name: str,
    available: Optional[int],
    frozen_copy_params: int = 0,
    workload: Optional[Workload] = None,
    runtime: int = 0,
    linear_params: Optional[int] = None,
    prompt_release: bool = False,
) -> MemoryPlan:
    """Per-rank bytes at the peak. `frozen_copy_params`: a second model held without gradients (a frozen
    DPO reference), at the weights' width; `workload`: the shape and batch (activations, loss chunks);
    `runtime`: the process's own bytes; `linear_params`: weights autocast casts (default: all);
    `prompt_release`: freed blocks go back to the OS at once (`release_freed_memory_promptly`)."""
    zero = (deepspeed_config or {}).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if deepspeed_config is not None else None
    sixteen = stage is not None and precision in ("bf16", "fp16")
    width = 2 if sixteen else 4
    frozen = total_params - trainable_params
    parameters = trainable_params * width + frozen * width
    gradients = trainable_params * width
    # 16-bit weights keep an fp32 master copy; fp32 ones are their own master (share_fp32_master_weights)
    optimizer = trainable_params * (12 if sixteen else 8)
    n = max(1, world_size)
    if stage is not None and stage >= 1:
        optimizer //= n
    if stage is not None and stage >= 2:
        gradients //= n
    if stage == 3:
        parameters //= n
    host = 0
    if _offloaded(zero.get("offload_optimizer")):
        host += optimizer
        optimizer = 0
    if stage == 3 and _offloaded(zero.get("offload_param")):
        host += parameters
        parameters = 0
    strategy = f"DeepSpeed ZeRO-{stage}" if stage is not None else ("DDP" if world_size > 1 else "single process")
    strategy += f", {world_size} rank(s), {precision}"
    extra = {"frozen reference": frozen_copy_params * 4} if frozen_copy_params else {}
    plan = MemoryPlan(parameters, gradients, optimizer, device_name, available, strategy, host, extra, runtime)
    if workload is not None:
        plan.transient = _transient(plan, workload, precision, stage, n, zero, total_params, trainable_params,
                                    linear_params if linear_params is not None else total_params,
                                    prompt_release)  # fmt: skip
    return plan


def _transient(plan, work: Workload, precision, stage, n, zero, total, trainable, linear, prompt_release) -> dict:
    """What is alive beside the states at the peak. Backward turns each layer's activations into its
    gradients, so the peak is the larger of (activations + loss chunks, at backward's start) and
    (every gradient + the embedding's new gradient before it is added to the head's, at its end)."""
    autocast = stage is None and precision in ("bf16", "fp16")
    compute = "autocast" if autocast else ("half" if stage is not None and precision in ("bf16", "fp16") else "fp32")
    width = 2 if compute == "half" else 4
    embedding_gradient = work.embedding_params * width // (n if stage == 3 else 1) if trainable == total else 0
    start = work.activations(compute) + work.loss_chunks(compute)
    plan.host_offload += offloaded_activations(work, compute)
    end = plan.gradients + embedding_gradient
    if work.accumulates:
        # The gradients summed so far stay alive through the next micro batch's forward: its activations
        # come on top of them (measured: SmolLM2 full SFT, 4 micro batches a step, +570 MB, its gradients).
        transient = {"activations and loss chunks": start, "embedding gradient": max(0, embedding_gradient - start)}
    else:
        transient = {"activations and loss chunks": max(0, start - end), "embedding gradient": embedding_gradient}
    if autocast:
        transient["autocast copies"] = 2 * linear
    if stage is None and n > 1:
        transient["DDP gradient buckets"] = 4 * trainable
    # Each step frees and makes again its activations, every gradient (zero_grad(set_to_none); DeepSpeed
    # makes each full-size before sharding it) and, under ZeRO-3, every gathered weight. glibc keeps
    # part of that heap for reuse rather than returning it (measured on this project's matrix: about
    # 0.6 of the largest of the three); fixed malloc thresholds return it, at a cost in speed.
    churn = max(start, trainable * width, total * width if stage == 3 else 0)
    if not prompt_release:
        transient["freed blocks the allocator keeps"] = int(ALLOCATOR_RETENTION * churn)
    if stage is not None:
        transient["DeepSpeed engine"] = DEEPSPEED_ENGINE_BYTES
        reduce_bucket = _number(zero.get("reduce_bucket_size"), 5e8)
        transient["reduce bucket"] = int(min(reduce_bucket, trainable)) * width
        if width == 2 and stage >= 1:  # the step's fp32 copy of this rank's gradient partition
            transient["fp32 gradient copy"] = 4 * trainable // n
        if stage == 3:
            # Weights gathered at once: the live-parameter limit plus the embedding (gathered whole for the
            # head). Measured on 2 CPU ranks (DeepSpeed 0.19, docs/BENCHMARKS.md): without prompt release,
            # glibc keeps each freed gather, and a rank holds about the whole model gathered.
            live = _number(zero.get("stage3_max_live_parameters"), 1e9) + work.embedding_params
            transient["gathered parameters"] = int(min(total, live if prompt_release else total)) * width
    return transient


def _number(value, default) -> float:
    return float(value) if isinstance(value, (int, float)) else float(default)


def _offloaded(section) -> bool:
    return isinstance(section, dict) and section.get("device") in ("cpu", "nvme")


def runtime_rss() -> int:
    """This process's resident memory now (the runtime a plan made at start adds to every rank)."""
    return _status_kib("VmRSS") * 1024


def _status_kib(key: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def available_memory(device, local_processes: int) -> tuple[str, Optional[int]]:
    """(name, bytes this rank may use): a GPU's free memory, or this node's available host memory
    shared by the node's processes."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return f"{device} ({torch.cuda.get_device_name(device)})", int(free)
    available = host_memory_available()
    if available is None:
        return "host memory", None
    return f"host memory (shared by {local_processes} process(es))", available // max(1, local_processes)


def host_memory_available() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def peak_host_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (the kernel's high-water mark of this process's RSS),
    else getrusage's (which Linux carries over an exec from the parent's peak)."""
    hwm = _status_kib("VmHWM")
    if hwm:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# glibc's mallopt parameters (malloc.h) and the size from which a freed block goes straight back to the OS.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
PROMPT_RELEASE_BYTES = 128 * 1024


def release_freed_memory_promptly() -> bool:
    """From now on, give every block of 128 KiB or more its own mapping, unmapped when it is freed, and
    trim the heap's top past 128 KiB. Left alone, glibc raises its mmap threshold to the largest block
    freed so far (up to 32 MiB) and keeps later blocks of that size in its heap for reuse: a ZeRO-3 rank,
    which gathers and frees every weight each step, then holds ~1.5 GB it no longer uses (docs/
    BENCHMARKS.md). The cost: each new big tensor's pages are faulted in again. False where this is
    not glibc (nothing changes)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, PROMPT_RELEASE_BYTES)
            and libc.mallopt(M_TRIM_THRESHOLD, PROMPT_RELEASE_BYTES)
        )
    except (OSError, AttributeError):
        return False


def release_freed_host_memory() -> None:
    """Hand memory that has been freed back to the OS (glibc keeps freed heap blocks for reuse).
    Building and loading a model churns many short-lived tensors of a layer's size (below glibc's mmap
    threshold, so on the heap); without this a rank's RSS stays up to ~1 GB above what it holds."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (e.g. musl): nothing to trim
