"""Ulysses sequence parallelism in Bumblebee's attention (DeepSpeed's ALST, `deepspeed.sequence.layer`).

Each of N ranks of a sequence-parallel group holds a contiguous 1/N of every row. Before attention,
DeepSpeed's all-to-all trades sequence for heads: each rank then holds the whole sequence for 1/N of
the query heads and of the key/value heads (query head i lands beside its KV head, as GQA needs), runs
the ordinary kernel on it, and the second all-to-all trades back. Everything else (embedding, norms,
projections, MLP, loss) runs on the rank's slice alone. The attention mask is built for the full
sequence (Bumblebee.forward takes the full row's segment ids), positions come in per slice.
"""

from __future__ import annotations


def check_heads_divide(num_attention_heads: int, num_key_value_heads: int, size: int, source: str) -> None:
    """Ulysses gives each rank heads / N query heads and kv_heads / N KV heads: both must divide."""
    for key, heads in (("num_attention_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads)):
        if heads % size:
            raise ValueError(
                f"sequence_parallel_size {size}: {source} has {key} {heads}, not divisible by {size} "
                "(Ulysses gives each rank an equal share of the query and of the key/value heads); "
                f"choose a sequence_parallel_size that divides both"
            )


class UlyssesAttention:
    """Calls `kernel(q, k, v, mask)` on the full sequence for this rank's heads through DeepSpeed's
    DistributedAttention. q, k, v: (batch, local seq, heads, head_dim) -> (batch, local seq, heads, head_dim).
    A plain object, not a module: the model's parameters and state dict are unchanged."""

    def __init__(self, kernel, group, num_kv_heads: int):
        from deepspeed.sequence.layer import DistributedAttention

        # batch first: the sequence (dim 1) is gathered and the heads (dim 2) scattered.
        self.exchange = DistributedAttention(kernel, group, scatter_idx=2, gather_idx=1, num_kv_heads=num_kv_heads)

    def __call__(self, q, k, v, mask):
        return self.exchange(q, k, v, 0, None, mask)


def use_sequence_parallel(model, group, size: int) -> int:
    """Route every Bumblebee attention layer of `model` (under LoRA and Fabric wrappers too) through
    Ulysses over `group`; returns how many layers. Heads that do not divide by `size` are refused."""
    from bumblecore.model.bumblebee import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        check_heads_divide(layer.num_heads, layer.num_kv_heads, size, "the model")
        layer.ulysses = UlyssesAttention(layer.attention_kernel, group, layer.num_kv_heads)
    return len(layers)
