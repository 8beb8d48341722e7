"""TransMIL and Nyström attention: pseudo-inverse; token blocks, streaming and row bands change nothing but memory."""

from __future__ import annotations

import torch

from slidemil import models


def test_nystrom_pinv_converges():
    from slidemil.nn.nystrom import iterative_pinv

    a = torch.softmax(torch.randn(3, 12, 12), -1).double()
    torch.testing.assert_close(iterative_pinv(a, 30), torch.linalg.pinv(a), atol=1e-6, rtol=1e-6)


def test_transmil_streaming_changes_nothing_but_memory(monkeypatch):
    """Above `checkpoint_above` the layers and PPEG run in token blocks / row bands recomputed in backward
    (TransMIL at 50k within memory): logits, attention scores and every parameter's gradient are those
    of the whole-sequence computation."""
    import slidemil.models.transmil as tm
    import slidemil.nn.nystrom as ny

    monkeypatch.setattr(ny, "_BLOCK", 64)        # several token blocks ...
    monkeypatch.setattr(tm, "_BAND_TOKENS", 40)  # ... and row bands (side 18: bands of 2 rows)
    model = models.create("transmil", in_dim=16, n_outputs=2, checkpoint_above=10).train()
    x = torch.randn(1, 300, 16)
    runs = []
    for threshold in (10, 10**9):
        model.checkpoint_above = threshold
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        out = model(x)
        (out.logits.sum() + out.instance_scores.square().sum()).backward()
        runs.append((out.logits.detach(), out.instance_scores.detach(),
                     {k: p.grad.clone() for k, p in model.named_parameters()}))
    (logits, scores, grads), (ref_logits, ref_scores, ref_grads) = runs
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(scores, ref_scores)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_nystrom_blocks_change_nothing(monkeypatch):
    """Blocks of tokens, and blocks recomputed in backward (`stream`), give the same output, attention row
    and gradients as one block."""
    import slidemil.nn.nystrom as ny

    torch.manual_seed(0)
    attn = ny.NystromAttention(32, heads=4, dim_head=8, landmarks=16).train()
    attn.to_out[1].p = 0.0
    x = torch.randn(1, 700, 32, requires_grad=True)
    results = []
    for block, stream in ((10**9, False), (64, False), (64, True)):
        monkeypatch.setattr(ny, "_BLOCK", block)
        out, row = attn(x, query_row=0, stream=stream)
        grad, = torch.autograd.grad(out.square().sum(), x)
        results.append((out.detach(), row.detach(), grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert abs(float(results[0][1].sum()) - 1.0) < 1e-3, "the class token's attention row sums to one"


def _one_piece_nystrom(attn, x, query_row):
    """The Nyström attention as the paper writes it, every matrix whole (the reference for the blocked code)."""
    import torch.nn.functional as F

    from slidemil.nn.nystrom import iterative_pinv

    n, m, h, d = x.shape[1], attn.landmarks, attn.heads, attn.dim_head
    pad = (-n) % m
    xp = F.pad(x, (0, 0, pad, 0))
    valid = torch.arange(n + pad) >= pad
    q, k, v = (t.view(1, n + pad, h, d).transpose(1, 2) for t in attn.to_qkv(xp).chunk(3, -1))
    q = q * d ** -0.5
    seg = (n + pad) // m
    counts = valid.view(m, seg).sum(-1).float()
    has = counts > 0
    q_l = q.reshape(1, h, m, seg, d).sum(-2) / counts.clamp_min(1)[:, None]
    k_l = k.reshape(1, h, m, seg, d).sum(-2) / counts.clamp_min(1)[:, None]
    neg = -torch.finfo(x.dtype).max
    attn1 = (q @ k_l.transpose(-1, -2)).masked_fill(~has[None, :], neg).softmax(-1)
    pinv = iterative_pinv((q_l @ k_l.transpose(-1, -2)).masked_fill(~(has[:, None] & has[None, :]), neg).softmax(-1))
    attn3 = (q_l @ k.transpose(-1, -2)).masked_fill(~(has[:, None] & valid[None, :]), neg).softmax(-1)
    out = attn1 @ pinv @ attn3 @ v + attn.res_conv(v)
    out = attn.to_out(out.transpose(1, 2).reshape(1, n + pad, -1))[:, pad:]
    row = (attn1[:, :, pad + query_row:pad + query_row + 1] @ pinv @ attn3)[0, :, 0, pad:].mean(0)
    return out, row


def test_key_and_query_blocks_equal_the_one_piece_formula(monkeypatch):
    """softmax(Q~ K^T) V summed over key blocks with a shared log-sum-exp, and softmax(Q K~^T) in query
    blocks (TransMIL at 50k within memory), give the one-piece formula's output, row and gradients,
    with empty landmarks (n = 20, 16 landmarks: 12 padded positions; n = 145 in 3 blocks: the first landmark is all
    padding) and without (n = 700), streamed or not, alone and as the pre-norm residual block."""
    import slidemil.nn.nystrom as ny

    torch.manual_seed(0)
    attn = ny.NystromAttention(32, heads=4, dim_head=8, landmarks=16).train()
    attn.to_out[1].p = 0.0
    norm = torch.nn.LayerNorm(32)
    monkeypatch.setattr(ny, "_BLOCK", 64)
    for n in (20, 145, 700):
        x = torch.randn(1, n, 32, requires_grad=True)
        for stream in (False, True):
            for prenorm in (None, norm):
                out, row = attn(x, query_row=0, prenorm=prenorm, stream=stream)
                ref_out, ref_row = _one_piece_nystrom(attn, x if prenorm is None else norm(x), 0)
                if prenorm is not None:
                    ref_out = x + ref_out
                torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(row, ref_row, atol=1e-5, rtol=1e-5)
                grad, = torch.autograd.grad(out.square().sum(), x)
                ref_grad, = torch.autograd.grad(ref_out.square().sum(), x)
                torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)
