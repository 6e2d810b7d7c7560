"""Tiled MLP and activation offload (model/tiling.py): the same loss and gradients as the untiled model,
one chunk's MLP intermediates alive at a time in forward and backward (weak references to them say
which are alive), and the training keys' refusals."""

import weakref

import pytest
import torch
from tiny import make_tiny_model

from bumblecore.model.tiling import check_long_context, enable_long_context


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tiles", [2, 3, 7])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_equals_untiled_loss_and_every_gradient(tiles, checkpointing):
    """Tiled over 2 rows x 37 tokens (chunks of unequal size), with and without gradient checkpointing
    (then with activation offload too: on CPU its copies are plain host tensors)."""
    model = make_tiny_model(vocab_size=128).train()
    model.set_gradient_checkpointing(checkpointing)
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(0))
    expected_loss, expected = loss_and_grads(model, ids)
    enable_long_context(model, tiles, activation_offload=checkpointing)
    assert all(layer.mlp.tiles == tiles for layer in model.model.layers)
    loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    with torch.no_grad():  # inference tiles too (no recompute): the same logits
        torch.testing.assert_close(model(ids), make_untiled(model)(ids))


def test_tiled_mlp_under_lora_equals_untiled():
    """peft's LoRA layers inside the tiled MLP: the same loss and adapter gradients."""
    from bumblecore.model.lora import apply_lora

    model = make_tiny_model(vocab_size=128).train()
    model = apply_lora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # B starts at zero: make the adapters count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 128, (2, 29), generator=torch.Generator().manual_seed(1))
    expected_loss, expected = loss_and_grads(model, ids)
    enable_long_context(model.get_base_model(), 4)
    loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected.keys() and any("lora_A" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], msg=name)


def make_untiled(model):
    enable_long_context(model, 0)
    return model


def test_one_chunk_of_intermediates_alive_in_forward_and_backward():
    """Each new gate output (a chunk's first intermediate) finds every earlier one of its layer dead:
    in forward (not kept for backward) and in backward (each chunk recomputed, used and freed before the
    next). Untiled, the forward keeps every layer's gate for backward."""
    torch.manual_seed(0)
    model = make_tiny_model(vocab_size=128).train()
    mlp = model.model.layers[0].mlp
    alive_at_each_call, gates = [], []

    def remember(module, inputs, output):
        alive_at_each_call.append(sum(ref() is not None for ref in gates))
        gates.append(weakref.ref(output))

    mlp.gate_proj.register_forward_hook(remember)
    ids = torch.randint(0, 128, (1, 64))
    loss_and_grads(model, ids)
    assert alive_at_each_call == [0]  # untiled: one call; its gate is kept until backward
    alive_at_each_call.clear(), gates.clear()
    enable_long_context(model, 4)
    logits = model(ids)
    assert alive_at_each_call == [0, 0, 0, 0]  # forward: 4 chunks, none kept
    logits.sum().backward()
    assert alive_at_each_call == [0] * 8  # backward: 4 recomputes, one at a time


def test_refusals_name_the_key():
    check_long_context(4, activation_offload=False, gradient_checkpointing=False, device_type="cpu")
    check_long_context(0, activation_offload=True, gradient_checkpointing=True, device_type="cuda")
    with pytest.raises(ValueError, match="tiled_mlp must be >= 0"):
        check_long_context(-1, False, False, "cpu")
    with pytest.raises(ValueError, match="activation_offload: true .* needs enable_gradient_checkpointing: true"):
        check_long_context(0, True, False, "cuda")
    with pytest.raises(ValueError, match="activation_offload: true moves activations .* this run is on cpu"):
        check_long_context(0, True, True, "cpu")
