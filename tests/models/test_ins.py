"""INS: partial-label disambiguation that never flips a negative bag's instance, prototypes as the official
sequential update, and an instance classifier that finds the planted witnesses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from conftest import bag_dataset, planted_bags
from slidemil import models
from slidemil.models.ins import update_confidence, update_prototypes
from slidemil.train.config import TrainConfig
from slidemil.train.trainer import fit, infer


def test_confidence_update_never_gives_a_negative_bag_instance_the_positive_label():
    cand_neg = torch.tensor([[1.0, 0.0]]).repeat(5, 1)
    conf = torch.tensor([[1.0, 0.0]]).repeat(5, 1)
    proto_scores = torch.tensor([[0.01, 0.99]]).repeat(5, 1)      # the prototypes say "positive" ...
    for _ in range(50):
        conf = update_confidence(conf, proto_scores, cand_neg, 0.8, negative_bag=True)
    assert torch.equal(conf, torch.tensor([[1.0, 0.0]]).repeat(5, 1))   # ... and nothing moves
    cand_pos = torch.ones(5, 2)
    conf = torch.full((5, 2), 0.5)
    for _ in range(30):
        conf = update_confidence(conf, proto_scores, cand_pos, 0.8, negative_bag=False)
    assert (conf[:, 1] > 0.99).all()                                # a positive bag's instance may move


def test_prototype_update_equals_the_official_sequential_loop():
    torch.manual_seed(0)
    protos, q = F.normalize(torch.randn(2, 8), dim=1), F.normalize(torch.randn(7, 8), dim=1)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    expected = protos.clone()
    for feat, label in zip(q, labels):
        expected[label] = expected[label] * 0.9 + 0.1 * feat
    torch.testing.assert_close(update_prototypes(protos, q, labels, 0.9), F.normalize(expected, dim=1))


def test_confidence_momentum_and_key_network_follow_the_official_schedules():
    """The label-confidence momentum goes linearly from 0.95 at the first epoch toward 0.8 (official
    `conf_ema_m = epoch / epochs * (0.8 - 0.95) + 0.95`), and after each step the key network is the EMA
    k <- 0.999 k + 0.001 q of the query network (MoCo)."""
    model = models.create("ins", 8, 2)
    model.n_epochs = 10
    momenta = []
    for epoch in (0, 5, 9):
        model.epoch = epoch
        momenta.append(model._conf_momentum)
    assert momenta == pytest.approx([0.95, 0.875, 0.815])
    key = model._new_key()
    before = [p.detach().clone() for p in key.parameters()]
    with torch.no_grad():
        for q in model.parameters():
            q.add_(1.0)
    model.step_end()
    for k, k0, q in zip(key.parameters(), before, model.parameters()):
        torch.testing.assert_close(k, 0.999 * k0 + 0.001 * q.detach())


@pytest.mark.slow
def test_ins_learns_the_task_and_its_instance_scores_find_the_witnesses():
    # 48 bags, 12 epochs at 1e-3 with a 1024-key queue: 7 s (bag AUROC 0.93, instance AUROC 0.93); the contract
    # test trains the default INS on 80 bags
    torch.manual_seed(0)
    train, test = planted_bags(48, seed=1), planted_bags(40, seed=3)
    cfg = TrainConfig(features="-", labels="-", out="-", epochs=12, lr=1e-3, warmup_epochs=0)
    model = models.create("ins", in_dim=32, n_outputs=2, queue=1024)
    fit(model, bag_dataset(train), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    # every instance of a negative training bag keeps the negative label
    negatives = [f"bag{i}" for i, b in enumerate(train) if b[1] == 0]
    assert all(torch.equal(model.confidence[s].argmax(1), torch.zeros(len(model.confidence[s]), dtype=torch.long))
               for s in negatives)
    # the bag head was refitted to the selected weights' eval-mode outputs on the training bags (fit_end)
    seen = infer(model, bag_dataset(train), torch.device("cpu"))
    scale, bias = model.bag_scale.clone(), model.bag_bias.clone()
    log_bag = (torch.from_numpy(seen.logits) - bias) / scale
    model.bag_scale.fill_(1.0)
    model.bag_bias.zero_()
    model.calibrate(log_bag, torch.tensor([b[1] for b in train]))
    assert abs(float(model.bag_scale) - float(scale)) < 1e-2 * float(scale)
    res = infer(model, bag_dataset(test), torch.device("cpu"), keep_scores=True)
    y = np.array([b[1] for b in test])
    assert roc_auc_score(y, res.probs[:, 1]) >= 0.9
    inst = np.concatenate([b[2] for b in test]) > 0
    assert roc_auc_score(inst, np.concatenate(res.instance_scores)) >= 0.9


def test_ins_refuses_other_tasks_and_instance_subsampling():
    from slidemil.errors import InputError
    from slidemil.train.trainer import FitContext

    model = models.create("ins", 8, 2)
    ds = bag_dataset(planted_bags(4, dim=8))
    for bad in ({"task": "regression", "target_col": "t"}, {"max_instances": 10}, {"instance_dropout": 0.5}):
        cfg = TrainConfig(features="-", labels="-", out="-", **bad)
        with pytest.raises(InputError, match="ins"):
            model.fit_start(FitContext(ds, cfg, torch.device("cpu")))


def test_bag_head_is_platt_scaled_to_the_training_bags():
    """Mean instance probabilities of 0.30 vs 0.34 (one fold's scale) become probabilities either side of 0.5,
    and, the bags being separable, near Platt's smoothed targets 5/6 and 1/6 rather than at 0 and 1 (hard
    targets saturate them on a fold-specific cut, which ruined the pooled AUROC of 5-fold runs)."""
    model = models.create("ins", 8, 2)
    p_pos = torch.tensor([0.34, 0.35, 0.33, 0.345])
    p_neg = torch.tensor([0.30, 0.31, 0.295, 0.305])
    pos = torch.stack([1 - p_pos, p_pos], 1)
    neg = torch.stack([1 - p_neg, p_neg], 1)
    model.calibrate(torch.cat([pos, neg]).log(), torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]))
    calibrated = torch.softmax(model.bag_scale * torch.cat([pos, neg]).log() + model.bag_bias, 1)[:, 1]
    assert (calibrated[:4] > 0.5).all() and (calibrated[4:] < 0.5).all()
    assert (calibrated[:4] < 0.9).all() and (calibrated[4:] > 0.1).all()
    assert abs(float(calibrated[:4].mean()) - 5 / 6) < 0.05 and abs(float(calibrated[4:].mean()) - 1 / 6) < 0.05


@pytest.mark.parametrize("with_labels", [False, True])
def test_contrastive_loss_in_blocks_equals_the_whole_matrix(with_labels):
    """The loss over blocks of anchors (bounded memory on 50k-instance bags) has the whole matrix's value and
    gradients; the self-similarity of each anchor is excluded at its own column in every block."""
    from slidemil.models.ins import contrastive_loss

    torch.manual_seed(0)
    n, queue_len, dim = 300, 64, 16
    q0, k0 = (torch.nn.functional.normalize(torch.randn(n, dim), dim=1) for _ in range(2))
    queue = torch.nn.functional.normalize(torch.randn(queue_len, dim), dim=1)
    pseudo = torch.randint(0, 2, (n,)) if with_labels else None
    queue_pseudo = torch.randint(0, 2, (queue_len,))
    values, grads = [], []
    for rows in (n, 64, 7):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        loss = contrastive_loss(q, k, queue, pseudo, queue_pseudo, rows=rows)
        loss.backward()
        values.append(loss.detach())
        grads.append((q.grad, k.grad))
    for value, (gq, gk) in zip(values[1:], grads[1:]):
        torch.testing.assert_close(value, values[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gq, grads[0][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gk, grads[0][1], rtol=1e-4, atol=1e-6)
