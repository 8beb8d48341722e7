"""Training on packs (`--pack-len`) and PackMIL (`--strategy packmil`)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

import slidemil.models as models
from conftest import bag_dataset, fit_config, planted_bags, run_config
from slidemil.train.strategies import apply_strategy
from slidemil.train.strategies.packmil import focal_bce
from slidemil.train.trainer import fit


def _fit_state(pack_len):
    torch.manual_seed(0)
    model = models.create("abmil", 32, 2, hidden_dim=16, dropout=0.0)
    cfg = fit_config(epochs=2, batch_size=6, pack_len=pack_len, scheduler="none", select="last")
    fit(model, bag_dataset(planted_bags(12, seed=3)), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    return model.state_dict()


def test_a_packed_step_is_the_padded_batch_step():
    padded, packed = _fit_state(None), _fit_state(200)
    for k, v in padded.items():
        if k == "attention.w.bias":   # softmax ignores a shift: its gradient is round-off, which Adam scales up
            continue
        torch.testing.assert_close(packed[k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_packmil_splits_each_bag_and_mixes_the_hyperslide_target_as_official():
    torch.manual_seed(0)
    model = apply_strategy(models.create("abmil", 8, 2, dropout=0.0), "packmil").train()
    x = torch.randn(10, 8)
    main, residual = model.split(x)
    assert len(main) == 4 and len(residual) == 6          # int(10 * token_dropout 0.4) instances to the main part
    assert sorted(torch.cat([main, residual])[:, 0].tolist()) == sorted(x[:, 0].tolist())
    assert model.split(x[:1])[0].shape == (1, 8)          # a one-instance bag goes whole to both branches

    bags = [torch.randn(10, 8) for _ in range(3)]
    target = torch.tensor([0, 1, 1])
    out = model.forward_bags(bags, 100)
    assert out.logits.shape == (3, 2)                                   # one prediction per bag
    res = out.extras["residual"]
    assert res.logits.shape == (1, 2)                                   # the three residual parts: one hyperslide
    torch.testing.assert_close(out.extras["members"], torch.ones(1, 3))
    task_loss = torch.nn.functional.cross_entropy
    expected = task_loss(out.logits, target) + 0.2 * focal_bce(res.logits, torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(model.loss(out, target, task_loss), expected)
    # several hyperslides: packs of 12 tokens hold two residual parts (6 each)
    out = model.forward_bags(bags, 12)
    torch.testing.assert_close(out.extras["members"], torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    model.eval()
    alone = model(bags[0][None]).logits                                 # inference: the bag alone, unpacked
    torch.testing.assert_close(alone, model.model(bags[0][None]).logits)


def test_focal_residual_loss_is_the_official_formula():
    logits, target = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    torch.testing.assert_close(focal_bce(logits, target), (0.25 * (1 - torch.exp(-bce)) ** 2 * bce).mean())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [None, "packmil"])
def test_packed_cv_run_learns_the_planted_task(feature_cohort, tmp_path, strategy):
    from slidemil.train.cv import run_cv

    out = tmp_path / "run"
    root, _ = feature_cohort
    run_cv(run_config(root, out, model="abmil", pack_len=256, batch_size=6, strategy=strategy))
    preds = pd.read_csv(out / "predictions.csv")
    auc = roc_auc_score(preds["label"] == "positive", preds["prob_positive"])
    assert auc >= 0.85, auc
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["pack_len"] == 256 and cfg["strategy"] == strategy
