"""evidence_attn: the bag logit is the evidence pooled by its own softmax, one low-evidence instance lowers it by at
most 1 / (e beta), and beta has a floor."""

from __future__ import annotations

import math

import pytest
import torch

from slidemil import models


def _logit_with(model, x, evidence):
    """The bag logit z when one extra instance of the given evidence joins the bag (the pooling of forward)."""
    s = torch.cat([model.evidence(x)[0, :, 0], evidence.view(1)])
    a = torch.softmax(model.beta * s, 0)
    return (a * s).sum()


def test_one_low_evidence_instance_lowers_the_bag_logit_by_at_most_its_bound():
    torch.manual_seed(0)
    model = models.create("evidence_attn", in_dim=8, n_outputs=2, beta=0.5, beta_min=0.25).eval()
    with torch.no_grad():
        model.beta_raw.fill_(-30.0)                       # as if training had driven beta to its floor
        beta = float(model.beta)
        x = torch.randn(1, 1, 8)                          # a one-instance bag: where the bound is nearly tight
        z = model(x).logits[0, 1]
        drops = [float(z - _logit_with(model, x, e)) for e in torch.linspace(float(z) - 60, float(z), 600)]
    bound = 1 / (math.e * beta)
    assert beta == pytest.approx(0.25, abs=1e-6)
    assert max(drops) <= bound + 1e-5 and max(drops) > 0.5 * bound   # bounded, and the bound is near-tight


def test_beta_must_stay_above_its_floor():
    with pytest.raises(ValueError, match="beta > beta_min > 0"):
        models.create("evidence_attn", in_dim=8, n_outputs=2, beta=0.2, beta_min=0.25)


def test_the_bag_logit_is_each_instances_evidence_weighted_by_its_softmax():
    """z = sum_k softmax_k(beta s_k) s_k with s = f(x), for each bag of a padded batch (padding takes no weight)
    and for each class of a multi-class head; binary logits are [0, z]."""
    torch.manual_seed(0)
    for n_outputs in (2, 3):
        model = models.create("evidence_attn", in_dim=8, n_outputs=n_outputs, beta=2.0).eval()
        x = torch.randn(2, 9, 8)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[1, 6:] = False
        with torch.no_grad():
            out = model(x, mask)
            for b, n in enumerate((9, 6)):
                s = model.evidence(x[b, :n])                                  # [n, C']
                z = (torch.softmax(model.beta * s, 0) * s).sum(0)
                expected = torch.cat([torch.zeros(1), z]) if n_outputs == 2 else z
                torch.testing.assert_close(out.logits[b], expected, atol=1e-5, rtol=1e-5)
