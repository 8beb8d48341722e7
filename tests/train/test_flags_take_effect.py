"""Every trainer flag changes the training it is given to: a flag that silently does nothing is a wrong
result a user cannot see. (`--class-weights balanced` once cancelled out at one bag a step.)

The trainer alone (`fit` on in-memory bags with a validation split); flags the cross-validation applies
around it (instance dropout, max instances, seed, standardisation) have tests of their own."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from conftest import bag_dataset, planted_bags
from slidemil import models
from slidemil.train.config import TrainConfig
from slidemil.train.trainer import fit

BASE = dict(epochs=12, lr=1e-3, min_epochs=3, patience=2, smooth=2, warmup_epochs=0)
FLAGS = {
    "lr": dict(lr=3e-3), "weight_decay": dict(weight_decay=0.1), "scheduler none": dict(scheduler="none"),
    "scheduler plateau": dict(scheduler="plateau"), "warmup_epochs": dict(warmup_epochs=3),
    "patience": dict(patience=6), "min_epochs": dict(min_epochs=8), "smooth": dict(smooth=1),
    "select last": dict(select="last"), "monitor val_metric": dict(monitor="val_metric"),
    "batch_size": dict(batch_size=4), "accum_steps": dict(accum_steps=4), "grad_clip": dict(grad_clip=0.01),
    "balanced_sampling": dict(balanced_sampling=True), "class_weights balanced": dict(class_weights="balanced"),
    "pack_len": dict(pack_len=64, batch_size=4), "epochs": dict(epochs=16),
}


def _train(**flags):
    bags = planted_bags(48, dim=16, seed=3, signal=1.0, bag_size=(10, 20))
    train = [b for b in bags if b[1] == 0][:16] + [b for b in bags if b[1] == 1][:6]      # imbalanced
    val = planted_bags(10, dim=16, seed=9, signal=1.0, bag_size=(10, 20))
    torch.manual_seed(0)
    model = models.create("abmil", in_dim=16, n_outputs=2)
    cfg = TrainConfig(features="-", labels="-", out="-", **(BASE | flags))
    result = fit(model, bag_dataset(train), bag_dataset(val), cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    return model.state_dict(), result.history.drop(columns="seconds")


@pytest.fixture(scope="module")
def reference():
    return _train()


@pytest.mark.slow
@pytest.mark.parametrize("flag", FLAGS)
def test_the_flag_changes_the_weights_or_the_training_curve(reference, flag):
    weights, history = _train(**FLAGS[flag])
    # beyond float rounding: the old class weighting multiplied and divided by the same weight, which moved
    # the weights by ~1e-8 and nothing else
    moved = max(float((weights[k].float() - reference[0][k].float()).abs().max()) for k in weights)
    same_history = history.shape == reference[1].shape and bool(
        (history - reference[1]).abs().max().max() < 1e-5)
    assert moved > 1e-4 or not same_history, f"{flag} trained as without it (weights moved {moved:.1e})"


@pytest.mark.slow
def test_the_reference_run_is_reproducible(reference):
    """Otherwise a difference above could be noise rather than the flag."""
    weights, history = _train()
    assert all(torch.equal(weights[k], reference[0][k]) for k in weights)
    pd.testing.assert_frame_equal(history, reference[1])
