"""ACMIL: STKIM masking acts before the softmax."""

from __future__ import annotations

import torch

from slidemil import models


def test_acmil_masking_removes_top_instances_from_the_softmax():
    torch.manual_seed(0)
    model = models.create("acmil", in_dim=16, n_outputs=2, n_masked_patch=10, mask_drop=0.6).train()
    x = torch.randn(1, 40, 16)
    out = model(x)
    a, raw = out.extras["attention"][0], out.extras["attention_logits"][0]     # [K, N]
    for k in range(model.n_token):
        hidden = torch.nonzero(a[k] == 0).flatten()
        assert len(hidden) == 6, "floor(10 * 0.6) of the top-10 are masked per branch"
        assert set(hidden.tolist()) <= set(raw[k].topk(10).indices.tolist())
        torch.testing.assert_close(a[k].sum(), torch.tensor(1.0))
    assert (model.eval()(x).extras["attention"] > 0).all(), "no masking at evaluation"
