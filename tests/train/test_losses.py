"""Chunked cross-entropy against the closed form: F.cross_entropy over full logits."""

import pytest
import torch
import torch.nn.functional as F

from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.train.losses import chunked_cross_entropy, shift_targets


class SoftcappedHead(torch.nn.Module):
    """A head whose last op (tanh) keeps its own output for backward: its logits must not be overwritten."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(50, 16) * 0.3)

    def forward(self, x):
        return torch.tanh(x @ self.weight.t())


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "softcapped"])
def test_chunked_equals_full_logits_loss_and_gradients(kind):
    """The loss's own backward (softmax - one-hot in the logits' memory for a plain Linear) equals
    autograd through F.cross_entropy over the full logits."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    head = SoftcappedHead() if kind == "softcapped" else torch.nn.Linear(16, 50, bias=kind == "linear_bias")
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    targets = shift_targets(labels)

    total, count = chunked_cross_entropy(hidden, head, targets, chunk_tokens=5)
    (total / count).backward()
    got_hidden, got_head = hidden.grad.clone(), head.weight.grad.clone()

    hidden.grad, head.weight.grad = None, None
    logits = head(hidden)[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    expected.backward()
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total / count, expected)
    torch.testing.assert_close(got_hidden, hidden.grad)
    torch.testing.assert_close(got_head, head.weight.grad)


def test_shift_does_not_cross_documents():
    labels = torch.tensor([[5, 6, 7, 8, 9, 10]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert shift_targets(labels, segments).tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]]


def test_no_targets_gives_zero_with_graph():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    total, count = chunked_cross_entropy(hidden, torch.nn.Linear(8, 10), torch.full((2, 4), IGNORE_INDEX))
    assert count == 0 and total.item() == 0.0
    total.backward()
    assert hidden.grad is not None


def test_kto_loss_equals_its_closed_form():
    import math

    from bumblecore.train.losses import kto_loss, kto_reference_point

    g = torch.Generator().manual_seed(0)
    policy = -torch.rand(6, generator=g, dtype=torch.float64) * 20
    reference = policy + (torch.rand(6, generator=g, dtype=torch.float64) - 0.5) * 4
    desirable = torch.tensor([True, False, True, True, False, False])
    mismatched_policy = -torch.rand(6, generator=g, dtype=torch.float64) * 20
    mismatched_reference = mismatched_policy - torch.rand(6, generator=g, dtype=torch.float64)
    z = kto_reference_point(mismatched_policy, mismatched_reference)
    expected_z = max(0.0, sum((mismatched_policy - mismatched_reference).tolist()) / 6)
    assert z.item() == pytest.approx(expected_z, rel=1e-12) and not z.requires_grad
    beta, wd, wu = 0.1, 1.0, 1.33

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    got = kto_loss(policy, reference, desirable, z, beta, wd, wu)
    for i in range(6):
        r = policy[i].item() - reference[i].item()
        want = (
            wd * (1 - sigmoid(beta * (r - expected_z))) if desirable[i] else wu * (1 - sigmoid(beta * (expected_z - r)))
        )
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    # The first step, policy == reference: r = 0 and z = 0, so every loss is half its weight.
    first = kto_loss(policy, policy, desirable, kto_reference_point(policy, policy), beta, wd, wu)
    assert torch.allclose(first, torch.where(desirable, 0.5 * wd, 0.5 * wu).double())


def _rank_calls_the_head_as_often(rank: int, port: int, queue) -> None:
    """One of 2 gloo ranks: a head whose weight carries ZeRO-3's partition marker (ds_id) and whose every
    call all-gathers, as DeepSpeed's pre-forward hook does; rank 0 holds 9 targets, rank 1 none."""
    import torch.distributed as dist

    from bumblecore.train.losses import chunked_cross_entropy_by_source, chunked_token_logps

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(1, 12, 16, requires_grad=True)
    targets = torch.randint(0, 50, (1, 12))
    targets[0, 9 if rank == 0 else 0 :] = IGNORE_INDEX
    sources = torch.arange(12)[None] % 2
    plain = [
        chunked_cross_entropy(hidden, head, targets, chunk_tokens=4)[0],
        chunked_cross_entropy_by_source(hidden, head, targets, sources, 2, per_source=True, chunk_tokens=4)[0],
        chunked_token_logps(hidden, head, targets, chunk_tokens=4),
    ]
    head.weight.ds_id = 0  # from here on the loss must agree its head calls with the other rank
    calls = []
    head.register_forward_pre_hook(lambda *_: calls.append(dist.all_gather([torch.empty(1)] * 2, torch.ones(1))))
    agreed = [
        chunked_cross_entropy(hidden, head, targets, chunk_tokens=4)[0],
        chunked_cross_entropy_by_source(hidden, head, targets, sources, 2, per_source=True, chunk_tokens=4)[0],
        chunked_token_logps(hidden, head, targets, chunk_tokens=4),
    ]
    sum(value.sum() for value in agreed).backward()  # every rank's graph reaches its hidden states
    same = all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(agreed, plain))
    queue.put((rank, len(calls), same, hidden.grad is not None))
    dist.destroy_process_group()


@pytest.mark.slow  # starts 2 processes
def test_ranks_call_a_zero3_head_equally_often_and_the_losses_do_not_change():
    """9 targets in chunks of 4 need 3 head calls per loss; the rank with no targets calls it 3 times too
    (3 losses: 9 calls, and 9 more recomputing the chunks in backward), else the all-gathers would not pair up."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.start_processes(_rank_calls_the_head_as_often, args=(port, queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get(timeout=60) for _ in range(2))
    assert results == [(0, 18, True, True), (1, 18, True, True)]
