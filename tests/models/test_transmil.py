"""TransMIL and Nyström attention: pseudo-inverse, checkpointing and query blocks change nothing but memory."""

from __future__ import annotations

import torch

from slidemil import models


def test_nystrom_pinv_converges():
    from slidemil.nn.nystrom import iterative_pinv

    a = torch.softmax(torch.randn(3, 12, 12), -1).double()
    torch.testing.assert_close(iterative_pinv(a, 30), torch.linalg.pinv(a), atol=1e-6, rtol=1e-6)


def test_transmil_checkpointing_changes_nothing_but_memory():
    model = models.create("transmil", in_dim=16, n_outputs=2, checkpoint_above=10).train()
    x = torch.randn(1, 300, 16)
    grads = []
    for threshold in (10, 10**9):
        model.checkpoint_above = threshold
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        out = model(x)
        out.logits.sum().backward()
        grads.append((out.logits.detach(), model.fc1[0].weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_nystrom_query_blocks_change_nothing(monkeypatch):
    """Building softmax(Q K~^T) a block of queries at a time (memory at N = 50k) gives the same output,
    attention row and gradients as one block."""
    import slidemil.nn.nystrom as ny

    torch.manual_seed(0)
    attn = ny.NystromAttention(32, heads=4, dim_head=8, landmarks=16).train()
    attn.to_out[1].p = 0.0
    x = torch.randn(1, 700, 32, requires_grad=True)
    results = []
    for block in (10**9, 64):
        monkeypatch.setattr(ny, "_QUERY_BLOCK", block)
        out, row = attn(x, query_row=0)
        grad, = torch.autograd.grad(out.square().sum(), x)
        results.append((out.detach(), row.detach(), grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert abs(float(results[0][1].sum()) - 1.0) < 1e-3, "the class token's attention row sums to one"
