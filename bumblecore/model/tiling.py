"""Long samples on one device: the MLP computed over the sequence in tiles, and the checkpointed
layers' inputs offloaded to host memory.

Tiled MLP (`tiled_mlp: K`). A gated MLP makes three intermediate-wide tensors per token (gate, up and
their product), ~3 x intermediate_size / hidden_size (about 16x for Qwen2.5) the width of its input:
at long sequences the largest activation of a layer. Tiled, the tokens go through the MLP in K chunks,
each under a non-reentrant checkpoint: the forward keeps only each chunk's input (a view of the
layer's own input), and backward recomputes one chunk at a time (autograd runs one chunk's branch to
its end before the next: its nodes are all newer than the previous chunk's), so one chunk's
intermediates are alive at a time, forward and backward. The result and the gradients are the untiled
MLP's (each token's MLP is independent of the others; the weight gradients are summed over chunks).
DeepSpeed's TiledMLP does the same with its own backward that calls autograd per shard; ours keeps
autograd's, so DDP's and ZeRO's gradient hooks fire once per weight, as for any module.

Activation offload (`activation_offload: true`, with gradient checkpointing, CUDA). A checkpointed layer
keeps only its inputs; with offload those wait in pinned host memory (torch's save_on_cpu around the
checkpoint call: the checkpoint saves its inputs under it, and the layer's recompute in backward runs
outside it, on the GPU), so the GPU holds one layer's activations instead of every layer's input.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint


def tiled_mlp(mlp, x: torch.Tensor, tiles: int) -> torch.Tensor:
    """mlp.untiled(x) over the tokens of x (..., hidden) in `tiles` chunks, one chunk's intermediates
    alive at a time (recomputed per chunk in backward when gradients are wanted)."""
    tokens = x.reshape(-1, x.shape[-1])
    recompute = torch.is_grad_enabled()
    parts = [
        checkpoint(mlp.untiled, part, use_reentrant=False) if recompute else mlp.untiled(part)
        for part in tokens.chunk(tiles)
    ]
    return torch.cat(parts).view(*x.shape[:-1], -1)


def checkpointed_layer(layer, *inputs, offload: bool = False):
    """A decoder layer under a non-reentrant checkpoint; with `offload`, its saved inputs go to
    pinned host memory until backward needs them."""
    pinned = torch.cuda.is_available()  # page-locked host memory copies back asynchronously
    with torch.autograd.graph.save_on_cpu(pin_memory=pinned) if offload else contextlib.nullcontext():
        return checkpoint(layer, *inputs, use_reentrant=False)


def enable_long_context(model, tiles: int = 0, activation_offload: bool = False) -> None:
    """Tile every MLP of a Bumblebee (`tiles` > 1) and offload its checkpointed activations
    (`check_long_context` says when that is refused)."""
    for layer in model.model.layers:
        layer.mlp.tiles = tiles
    model.activation_offload = activation_offload


def check_long_context(tiles: int, activation_offload: bool, gradient_checkpointing: bool, device_type: str) -> None:
    """The training keys' refusals, before anything is written (errors name the key)."""
    if tiles < 0:
        raise ValueError(f"tiled_mlp must be >= 0 (0 or 1: the MLP untiled; K: K chunks), got {tiles}")
    if not activation_offload:
        return
    if not gradient_checkpointing:
        raise ValueError(
            "activation_offload: true offloads the checkpointed layers' inputs to host memory, so it needs "
            "enable_gradient_checkpointing: true"
        )
    if device_type != "cuda":
        raise ValueError(
            f"activation_offload: true moves activations from GPU memory to host memory; this run is on "
            f"{device_type}, where activations are in host memory already (set it to false)"
        )
