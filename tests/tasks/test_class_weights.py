"""`--class-weights balanced`: each bag's cross-entropy weighted n / (C n_c), also at one bag a step.

torch's `cross_entropy(weight=...)` divides by the step's summed weights, so with one bag a step (the
default) the weight cancelled and a balanced run trained bit for bit as an unweighted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import bag_dataset, fit_config, planted_bags
from slidemil.tasks import TaskConfig, create_task


def _loss(class_weights: str, targets):
    return create_task(TaskConfig(class_weights=class_weights)).loss({}, np.asarray(targets), torch.device("cpu"), 2)


def test_a_one_bag_step_is_weighted_by_its_class():
    targets = [0] * 30 + [1] * 10                      # balanced weights: 40 / (2 * 30) and 40 / (2 * 10)
    logits = torch.tensor([[0.3, -0.2]])
    plain = {y: float(F.cross_entropy(logits, torch.tensor([y]))) for y in (0, 1)}
    weighted, unweighted = _loss("balanced", targets), _loss("none", targets)
    assert float(weighted(logits, torch.tensor([1]))) == pytest.approx(2.0 * plain[1])
    assert float(weighted(logits, torch.tensor([0]))) == pytest.approx(40 / 60 * plain[0])
    assert float(unweighted(logits, torch.tensor([1]))) == pytest.approx(plain[1])
    # several bags a step: the mean of the weighted losses (a scikit-learn objective's sample weighting)
    both = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    ce = F.cross_entropy(both, torch.tensor([0, 1]), reduction="none")
    assert float(weighted(both, torch.tensor([0, 1]))) == pytest.approx(float((ce * torch.tensor([40 / 60, 2.0])).mean()))


@pytest.mark.slow
def test_balanced_weights_move_a_model_trained_one_bag_a_step_toward_the_minority_class():
    from slidemil import models
    from slidemil.train.trainer import fit, infer

    bags = planted_bags(80, dim=32, seed=3, signal=0.8)
    train = [b for b in bags if b[1] == 0][:36] + [b for b in bags if b[1] == 1][:9]     # 20% positive
    test = planted_bags(40, dim=32, seed=4, signal=0.8)
    mean_positive = {}
    for weights in ("none", "balanced"):
        torch.manual_seed(0)
        model = models.create("mean_pool", in_dim=32, n_outputs=2)
        fit(model, bag_dataset(train), None, fit_config(epochs=12, lr=1e-3, class_weights=weights),
            torch.device("cpu"), torch.Generator().manual_seed(0))
        mean_positive[weights] = float(infer(model, bag_dataset(test), torch.device("cpu")).probs[:, 1].mean())
    # unweighted, the model leans toward the 80% majority; weighted, the minority counts as much in total
    assert mean_positive["balanced"] > mean_positive["none"] + 0.1, mean_positive
