"""SC-MIL: the SupCon loss, the curriculum, and learning an imbalanced planted task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import bag_dataset, fit_config, planted_bags
from slidemil import models
from slidemil.train.strategies import apply_strategy
from slidemil.train.trainer import FitContext, fit, infer


def test_supcon_matches_its_definition_and_skips_anchors_without_positives():
    from slidemil.train.strategies.sc import supcon_loss

    torch.manual_seed(0)
    z = F.normalize(torch.randn(4, 8), dim=-1)
    y = torch.tensor([0, 0, 1, 2])                            # anchors 2 and 3 have no positive
    loss = supcon_loss(z, y, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 0.1)
    logits = z @ z.T / 0.1
    expected = []
    for i, j in [(0, 1), (1, 0)]:
        others = [k for k in range(4) if k != i]
        expected.append(-(logits[i, j] - torch.logsumexp(logits[i, others], 0)))
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    assert supcon_loss(z[2:], y[2:], torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 0.1) is None


def test_sc_curriculum_moves_from_contrast_to_classifier():
    torch.manual_seed(0)
    model = apply_strategy(models.create("abmil", 32, 2), "sc").train()
    ds = bag_dataset(planted_bags(6, seed=1))
    model.fit_start(FitContext(ds, fit_config(epochs=10), torch.device("cpu")))
    alphas = []
    for epoch in range(10):
        model.epoch_start(epoch, 10)
        alphas.append(model.alpha)
    assert alphas[0] == 1.0 and all(a > b for a, b in zip(alphas, alphas[1:])) and alphas[-1] == 0.0
    # an anchor without a same-label partner contributes the classifier term with weight 1 - alpha, not 1
    model.epoch_start(3, 10)
    lone = model(ds[0].x[None])
    plain = model.model.loss(lone, torch.tensor([ds[0].y]), F.cross_entropy)
    model.bank = (model.bank[0][:0], model.bank[1][:0])
    torch.testing.assert_close(model.loss(lone, torch.tensor([ds[0].y]), F.cross_entropy), (1 - model.alpha) * plain)
    model.epoch_start(0, 10)
    x = torch.stack([ds[i].x[:20] for i in range(4)])
    y = torch.tensor([ds[i].y for i in range(4)])
    out = model(x)
    loss = model.loss(out, y, F.cross_entropy)
    loss.backward()
    assert model.model.classifier.weight.grad is None or not model.model.classifier.weight.grad.abs().sum(), \
        "at alpha = 1 only the contrastive term trains"
    assert model.projection[0].weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_sc_learns_an_imbalanced_planted_task():
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    bags = [b for b in planted_bags(120, seed=1) if b[1] == 0 or np.random.default_rng(len(b[0])).random() < 0.4]
    model = apply_strategy(models.create("abmil", 32, 2), "sc")
    fit(model, bag_dataset(bags), None, fit_config(epochs=12, lr=5e-4), torch.device("cpu"), torch.Generator().manual_seed(0))
    test = planted_bags(60, seed=3)
    res = infer(model, bag_dataset(test), torch.device("cpu"))
    assert roc_auc_score([b[1] for b in test], res.probs[:, 1]) >= 0.9
