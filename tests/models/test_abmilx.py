"""ABMILX: attention plus and its chunked similarity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slidemil import models


def test_abmilx_attention_plus_adds_similarity_weighted_scores():
    torch.manual_seed(0)
    model = models.create("abmilx", in_dim=16, n_outputs=2, inner_dim=32, n_heads=4).eval()
    xh = torch.randn(4, 20, 8)
    a, a_plus = model.head_scores(xh)
    q, k = model.qk(model.norm(xh)).chunk(2, dim=-1)
    sim = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    v = model.v.weight[0, 0] * a
    torch.testing.assert_close(a_plus, a + (sim @ v[..., None])[..., 0], atol=1e-5, rtol=1e-5)
    plain = models.create("abmilx", in_dim=16, n_outputs=2, inner_dim=32, n_heads=4, attn_plus=False)
    a2, a2_plus = plain.head_scores(xh)
    assert torch.equal(a2, a2_plus)


def test_abmilx_chunked_similarity_matches_one_call():
    from slidemil.models.abmilx import similarity_pool

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 300, 8, requires_grad=True), torch.randn(2, 300, 8), torch.randn(2, 300, 1)
    full = F.scaled_dot_product_attention(q, k, v)
    chunked = similarity_pool(q, k, v, chunk=64)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    g1, = torch.autograd.grad(full.sum(), q)
    g2, = torch.autograd.grad(chunked.sum(), q)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_abmilx_follows_the_official_defaults_no_biases_no_projection_dropout_xavier():
    """Official DAttentionX defaults: mil_bias = attn_bias = False, proj_drop 0, Xavier-normal Linear weights."""
    torch.manual_seed(0)
    model = models.create("abmilx", in_dim=256, n_outputs=2)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 and all(m.bias is None for m in linears)
    drops = [m.p for m in model.proj.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.0]
    w = model.feature[0].weight                                   # Xavier normal: std sqrt(2 / (fan_in + fan_out))
    assert abs(float(w.detach().std()) - (2 / (256 + 512)) ** 0.5) < 0.003
