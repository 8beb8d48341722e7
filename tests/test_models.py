"""Model-level behaviour: masks honoured, instance scores, learning a planted-signal task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from slidemil import models
from slidemil.data.bags import Bag, BagDataset, collate_bags
from slidemil.config import TrainConfig
from slidemil.train.trainer import fit, infer

from conftest import planted_bags

FIRST_SET = ["mean_pool", "max_pool", "instance_max", "abmil", "clam_sb", "clam_mb", "transmil", "dsmil"]
ALL = models.available()  # every registered model gets the behavioural tests below
# Learning rates for the 12-epoch budget of these tests. TransMIL uses its paper's 2e-4 (at 1e-3 it is
# unstable). DSMIL has no embedding layer: its linear instance classifier on raw features moves slowly,
# and within 12 epochs it solves the task only with a larger step (0.67 AUROC at 2e-3, 0.94 at 5e-3).
LR = {"transmil": 2e-4, "dsmil": 5e-3, "mambamil": 1e-4, "lbmamba": 1e-4, "rrt": 2e-4}
# The sequence models memorise an 80-bag cohort within two epochs (Mamba: train loss 0.04, test AUROC
# 0.81-0.89 by learning rate; R²T at its paper's 2e-4: 0.63-0.78 by seed). With 160 bags they generalise
# (mambamil 0.97 at 1e-4, rrt 0.94 at 2e-4).
TRAIN_BAGS = {"mambamil": 160, "lbmamba": 160, "rrt": 160}


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
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
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


def _dataset(bags):
    return BagDataset.from_arrays([b[0] for b in bags], [b[1] for b in bags])


@pytest.mark.parametrize("name", ALL)
def test_learns_planted_signal(name):
    """A correct MIL model separates bags holding ~10% witness instances from background bags."""
    torch.manual_seed(0)
    train = planted_bags(TRAIN_BAGS.get(name, 80), seed=1)
    val = planted_bags(20, seed=2)
    test = planted_bags(60, seed=3)
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=12, lr=LR.get(name, 5e-4), patience=12,
                      warmup_epochs=0)
    model = models.create(name, in_dim=32, n_outputs=2)
    gen = torch.Generator().manual_seed(0)
    fit(model, _dataset(train), _dataset(val), cfg, torch.device("cpu"), gen)
    res = infer(model, _dataset(test), torch.device("cpu"), keep_scores=True)
    y = np.array([b[1] for b in test])
    auc = roc_auc_score(y, res.probs[:, 1])
    assert auc >= 0.9, f"{name} test AUROC {auc:.3f}"


@pytest.mark.parametrize("name", ["abmil", "clam_sb", "instance_max", "dsmil", "evidence_attn"])
def test_instance_scores_point_at_witnesses(name):
    """After training, the top-scored instances of positive bags are far more often the planted witnesses
    than chance (witnesses are 10% of a bag; a scorer that ignores them lands near 0.1)."""
    torch.manual_seed(0)
    train = planted_bags(80, seed=1)
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=10, lr=LR.get(name, 5e-4), warmup_epochs=0)
    model = models.create(name, in_dim=32, n_outputs=2)
    fit(model, _dataset(train), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    test = [b for b in planted_bags(30, seed=4) if b[1] == 1]
    res = infer(model, _dataset(test), torch.device("cpu"), keep_scores=True)
    hits = []
    for (x, _, inst), scores in zip(test, res.instance_scores):
        k = int(inst.sum())
        top = np.argsort(-scores)[:k]
        hits.append(inst[top].mean())
    assert np.mean(hits) >= 0.4, f"{name}: only {np.mean(hits):.2f} of top-scored instances are witnesses"


def test_multiclass_learning_abmil():
    torch.manual_seed(0)
    train, test = planted_bags(120, n_classes=3, seed=1), planted_bags(60, n_classes=3, seed=3)
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=12, lr=5e-4, warmup_epochs=0)
    model = models.create("abmil", in_dim=32, n_outputs=3)
    fit(model, _dataset(train), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    res = infer(model, _dataset(test), torch.device("cpu"))
    y = np.array([b[1] for b in test])
    assert roc_auc_score(y, res.probs, multi_class="ovr") >= 0.9


def test_instance_max_binary_is_max_of_instance_logits():
    model = models.create("instance_max", in_dim=8, n_outputs=2).eval()
    x = torch.randn(1, 30, 8)
    with torch.no_grad():
        out = model(x)
        inst = model.instance_net(x)[0, :, 0]
    assert torch.allclose(out.logits[0, 1], inst.max())
    assert out.logits[0, 0] == 0


def test_clam_instance_loss_uses_true_class_branch_and_clamps_k():
    torch.manual_seed(0)
    model = models.create("clam_mb", in_dim=8, n_outputs=2, k_sample=8).eval()
    x = torch.randn(1, 5, 8)  # fewer instances than k_sample: must not crash
    out = model(x)
    loss = model.loss(out, torch.tensor([1]), F.cross_entropy)
    assert torch.isfinite(loss)
    # bag_weight=1 leaves the task loss alone
    model.bag_weight = 1.0
    torch.testing.assert_close(model.loss(out, torch.tensor([1]), F.cross_entropy), F.cross_entropy(out.logits, torch.tensor([1])))


def test_smooth_svm_matches_definition():
    from slidemil.models.clam import smooth_top1_svm

    logits = torch.tensor([[2.0, 0.5], [0.1, 0.3]])
    target = torch.tensor([0, 1])
    expected = torch.stack([torch.logsumexp(torch.tensor([0.0, 1 + 0.5 - 2.0]), 0),
                            torch.logsumexp(torch.tensor([1 + 0.1 - 0.3, 0.0]), 0)]).mean()
    torch.testing.assert_close(smooth_top1_svm(logits, target), expected)


def test_nystrom_pinv_converges():
    from slidemil.nn.nystrom import iterative_pinv

    a = torch.softmax(torch.randn(3, 12, 12), -1).double()
    torch.testing.assert_close(iterative_pinv(a, 30), torch.linalg.pinv(a), atol=1e-6, rtol=1e-6)


def test_unknown_model_and_argument_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.create("nope", 8, 2)
    with pytest.raises(ValueError, match="takes no argument"):
        models.create("abmil", 8, 2, bogus=1)


def test_fast_dropout_is_dropout():
    from slidemil.nn.attention import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.25).train()
    x = torch.ones(400, 512)
    y = drop(x)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert abs(y.mean().item() - 1.0) < 0.02
    torch.manual_seed(0)
    assert torch.equal(drop(x), y), "not reproducible under a seed"
    assert torch.equal(drop.eval()(x), x)


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
        fit(m, _dataset(planted_bags(60, seed=1)), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
        res = infer(m, _dataset(planted_bags(20, seed=5)), torch.device("cpu"), keep_scores=True)
        return np.mean([-(s * np.log(s + 1e-12)).sum() for s in res.instance_scores])

    assert entropy_after_training(1.0) > entropy_after_training(0.0) + 0.05


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


def test_abmilx_attention_plus_adds_similarity_weighted_scores():
    torch.manual_seed(0)
    model = models.create("abmilx", in_dim=16, n_outputs=2, inner_dim=32, n_heads=4).eval()
    xh = torch.randn(4, 20, 8)
    a, a_plus = model.head_scores(xh)
    q, k = model.qk(model.norm(xh)).chunk(2, dim=-1)
    sim = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    v = model.v.weight[0, 0] * a + model.v.bias[0]
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
