"""Chunked cross-entropy against the closed form: F.cross_entropy over full logits."""

import torch
import torch.nn.functional as F

from bumblecore.data.packing import IGNORE_INDEX
from bumblecore.train.losses import chunked_cross_entropy, shift_targets


def test_chunked_equals_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
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
