"""DTFD-MIL: tier 2 reads detached tier-1 features; both distillation variants run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slidemil import models


def test_dtfd_tier2_sees_detached_tier1_features():
    torch.manual_seed(0)
    model = models.create("dtfd", in_dim=16, n_outputs=2).train()
    out = model(torch.randn(1, 40, 16))
    tier2_only = F.cross_entropy(out.logits, torch.tensor([1]))
    tier2_only.backward()
    assert all(p.grad is None or not p.grad.abs().sum() for p in list(model.reduce.parameters()) + list(model.tier1.parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tier2.parameters())
    assert len(out.extras["pseudo_logits"][0]) == 4


@pytest.mark.parametrize("distill", ["MaxS", "MaxMinS"])
def test_dtfd_distillation_variants_run(distill):
    model = models.create("dtfd", in_dim=16, n_outputs=3, distill=distill).eval()
    out = model(torch.randn(2, 25, 16))
    assert out.logits.shape == (2, 3) and torch.isfinite(model.loss(out, torch.tensor([0, 2]), F.cross_entropy))
