"""AEM: the negative-entropy term and attention that spreads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import bag_dataset, planted_bags
from slidemil import models
from slidemil.train.config import TrainConfig
from slidemil.train.trainer import fit, infer


@pytest.mark.slow
def test_aem_adds_negative_entropy_and_spreads_attention():
    from slidemil.train.strategies import apply_strategy

    torch.manual_seed(0)
    base = models.create("abmil", in_dim=32, n_outputs=2).eval()
    wrapped = apply_strategy(base, "aem", lamda=0.5)
    x, y = torch.randn(1, 30, 32), torch.tensor([1])
    out = wrapped(x)
    p = out.instance_scores
    expected = F.cross_entropy(out.logits, y) + 0.5 * (p * p.log()).sum()
    torch.testing.assert_close(wrapped.loss(out, y, F.cross_entropy), expected)
    with pytest.raises(ValueError, match="does not pool by attention"):
        apply_strategy(models.create("mean_pool", 8, 2), "aem")

    def entropy_after_training(lamda):
        torch.manual_seed(0)
        m = apply_strategy(models.create("abmil", in_dim=32, n_outputs=2), "aem", lamda=lamda)
        cfg = TrainConfig(features="-", labels="-", out="-", epochs=6, lr=5e-4, warmup_epochs=0)
        fit(m, bag_dataset(planted_bags(60, seed=1)), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
        res = infer(m, bag_dataset(planted_bags(20, seed=5)), torch.device("cpu"), keep_scores=True)
        return np.mean([-(s * np.log(s + 1e-12)).sum() for s in res.instance_scores])

    assert entropy_after_training(1.0) > entropy_after_training(0.0) + 0.05
