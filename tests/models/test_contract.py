"""The contract every registered model keeps: masks honoured, gradients, determinism, learning a planted task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from conftest import bag_dataset, planted_bags
from slidemil import models
from slidemil.data.bags import Bag, collate_bags
from slidemil.train.config import TrainConfig
from slidemil.train.trainer import fit, infer

FIRST_SET = ["mean_pool", "max_pool", "instance_max", "abmil", "clam_sb", "clam_mb", "transmil", "dsmil"]


ALL = models.available()  # every registered model gets the behavioural tests below


# Learning rates for the 12-epoch budget of these tests. TransMIL uses its paper's 2e-4 (at 1e-3 it is
# unstable). DSMIL has no embedding layer: its linear instance classifier on raw features moves slowly,
# and within 12 epochs it solves the task only with a larger step (0.67 AUROC at 2e-3, 0.94 at 5e-3).
LR = {"transmil": 2e-4, "dsmil": 5e-3, "mambamil": 3e-4, "lbmamba": 2e-4, "rrt": 2e-4}


# R²T memorises an 80-bag cohort within two epochs (at its paper's 2e-4: test AUROC 0.63-0.78 by seed) and
# generalises with 160 bags (0.94). The Mamba models needed 160 bags too until their attention head kept
# PyTorch's init (docs/protocol.md); with it, 80 bags and 4 epochs suffice (measured 2026-12-02, 1 thread:
# mambamil at dim 256 0.999 in 18 s, at 384 1.000 in 29 s; lbmamba at dim 256 0.994 in 14 s; 160 bags took
# 69 s and 57 s). With the official Xavier head the same budget scores 0.552 and 0.812, so this test also
# guards the head's init.
TRAIN_BAGS = {"rrt": 160}
EPOCHS = {"mambamil": 4, "lbmamba": 4, "rrt": 8, "ins": 8}   # rrt: 0.94 at 8 epochs as at 12; ins 0.98 at 8
# OTSurv differentiates through its Sinkhorn iterations (~500 to converge at the official tol 1e-10, ~0.25 s
# per bag); 50 iterations bring the row marginals within 1e-4 and learn the same task in a fifth of the time.
# R²T at dim 256 learns the same task as at its default 512 (0.934 vs 0.932) in 50 s instead of 121 s, and
# TransMIL 256 wide as 512 wide (0.990 vs 0.971) in 24 s instead of 62 s (measured 2026-12-02, 1 thread).
ARGS = {"otsurv": {"max_iter": 50}, "mambamil": {"dim": 256}, "lbmamba": {"dim": 256}, "rrt": {"dim": 256},
        "transmil": {"hidden_dim": 256}}


def test_first_set_is_registered():
    assert set(FIRST_SET) <= set(models.available())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n_outputs", [2, 3])
def test_padding_does_not_change_output(name, n_outputs):
    torch.manual_seed(0)
    model = models.create(name, in_dim=16, n_outputs=n_outputs).eval()
    a, b = torch.randn(23, 16), torch.randn(9, 16)
    batch = collate_bags([Bag("a", a, 0, None), Bag("b", b, 1, None)])
    # padded rows hold large garbage, not zeros, so a model that reads them cannot pass by luck
    batch["x"][~batch["mask"]] = 50.0 * torch.randn(int((~batch["mask"]).sum()), 16)
    with torch.no_grad():
        padded = model(batch["x"], batch["mask"])
        alone = [model(t[None]) for t in (a, b)]
    for i, out in enumerate(alone):
        torch.testing.assert_close(padded.logits[i], out.logits[0], atol=1e-5, rtol=1e-5)
        k = out.instance_scores.shape[1]
        torch.testing.assert_close(padded.instance_scores[i, :k], out.instance_scores[0], atol=1e-5, rtol=1e-5)
        assert torch.all(padded.instance_scores[i, k:] == 0)


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = models.create(name, in_dim=16, n_outputs=2).train()
    # 300 instances: R²T's 8 x 8 regions are 1 x 1 below 256 instances (its EPEG and CR-MSA then
    # carry no signal, as in the official code), and 300 is still cheap for the quadratic models
    x = torch.randn(2, 300, 16)
    out = model(x)
    model.loss(out, torch.tensor([0, 1]), F.cross_entropy).backward()
    # ABMIL's attention bias (kept for its checkpoints) shifts every logit equally, which the softmax ignores:
    # its gradient is 0 up to round-off, sometimes exactly 0, so only its presence in the graph is checked
    shift_only = {"attention.w.bias"}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or (not p.grad.abs().sum() and n not in shift_only))]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_a_seed(name):
    """Same seed, same initialisation, same training-mode output and loss (dropout, masking, pseudo-bags
    and sampling all draw from torch's seeded generator)."""
    x, y = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([1])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = models.create(name, in_dim=16, n_outputs=2).train()
        out = model(x)
        runs.append((out.logits.detach(), model.loss(out, y, F.cross_entropy).detach()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_learns_planted_signal(name):
    """A correct MIL model separates bags holding ~10% witness instances from background bags."""
    torch.manual_seed(0)
    train = planted_bags(TRAIN_BAGS.get(name, 80), seed=1)
    val = planted_bags(20, seed=2)
    test = planted_bags(60, seed=3)
    epochs = EPOCHS.get(name, 12)
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=epochs, lr=LR.get(name, 5e-4), patience=epochs,
                      warmup_epochs=0)
    model = models.create(name, in_dim=32, n_outputs=2, **ARGS.get(name, {}))
    gen = torch.Generator().manual_seed(0)
    fit(model, bag_dataset(train), bag_dataset(val), cfg, torch.device("cpu"), gen)
    res = infer(model, bag_dataset(test), torch.device("cpu"), keep_scores=True)
    y = np.array([b[1] for b in test])
    auc = roc_auc_score(y, res.probs[:, 1])
    assert auc >= 0.9, f"{name} test AUROC {auc:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["abmil", "clam_sb", "instance_max", "dsmil", "evidence_attn"])
def test_instance_scores_point_at_witnesses(name):
    """After training, the top-scored instances of positive bags are far more often the planted witnesses
    than chance (witnesses are 10% of a bag; a scorer that ignores them lands near 0.1)."""
    torch.manual_seed(0)
    train = planted_bags(80, seed=1)
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=10, lr=LR.get(name, 5e-4), warmup_epochs=0)
    model = models.create(name, in_dim=32, n_outputs=2)
    fit(model, bag_dataset(train), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    test = [b for b in planted_bags(30, seed=4) if b[1] == 1]
    res = infer(model, bag_dataset(test), torch.device("cpu"), keep_scores=True)
    hits = []
    for (_, _, inst), scores in zip(test, res.instance_scores):
        k = int(inst.sum())
        top = np.argsort(-scores)[:k]
        hits.append(inst[top].mean())
    assert np.mean(hits) >= 0.4, f"{name}: only {np.mean(hits):.2f} of top-scored instances are witnesses"


@pytest.mark.slow
def test_multiclass_learning_abmil():
    torch.manual_seed(0)
    train, test = planted_bags(120, n_classes=3, seed=1), planted_bags(60, n_classes=3, seed=3)
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=12, lr=5e-4, warmup_epochs=0)
    model = models.create("abmil", in_dim=32, n_outputs=3)
    fit(model, bag_dataset(train), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    res = infer(model, bag_dataset(test), torch.device("cpu"))
    y = np.array([b[1] for b in test])
    assert roc_auc_score(y, res.probs, multi_class="ovr") >= 0.9


def test_unknown_model_and_argument_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.create("nope", 8, 2)
    with pytest.raises(ValueError, match="takes no argument"):
        models.create("abmil", 8, 2, bogus=1)
