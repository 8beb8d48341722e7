"""`--compile`: torch.compile changes the speed of a step, not what the model learns or how it is saved."""

from __future__ import annotations

import pytest
import torch

from conftest import bag_dataset, fit_config, planted_bags
from slidemil import models
from slidemil.train.trainer import fit, infer

pytestmark = pytest.mark.slow  # compiles the model (a C++ build on CPU)


def _trained(compile_: bool):
    torch.manual_seed(0)
    model = models.create("abmil", in_dim=32, n_outputs=2, dropout=0.0)  # compiled dropout draws other masks
    cfg = fit_config(epochs=2, lr=5e-4, patience=2, compile=compile_)
    fit(model, bag_dataset(planted_bags(12, seed=1)), None, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    return model, infer(model, bag_dataset(planted_bags(6, seed=3)), torch.device("cpu")).probs


def test_compiled_training_learns_the_same_weights_under_the_same_names():
    plain, plain_probs = _trained(False)
    compiled, compiled_probs = _trained(True)
    assert compiled.state_dict().keys() == plain.state_dict().keys()       # checkpoints stay loadable
    torch.testing.assert_close(compiled_probs, plain_probs, atol=1e-4, rtol=1e-4)
    for name, value in plain.state_dict().items():
        if name == "attention.w.bias":   # softmax is shift-invariant: its gradient is rounding noise, which
            continue                     # Adam scales up to full steps in either run
        torch.testing.assert_close(compiled.state_dict()[name], value, atol=1e-4, rtol=1e-4, msg=name)
