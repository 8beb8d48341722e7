"""OTSurv: the transport plan meets the semi-relaxed marginals of the paper, rho follows the official
curriculum, the instance scores explain the logits exactly, and it learns a planted hazard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.conftest import fit_config

import slidemil.models as M
from slidemil.data.bags import BagDataset
from slidemil.data.synthetic import outcome_directions, planted_outcomes, severity_bag
from slidemil.evaluate.survival import harrell_c
from slidemil.models.otsurv import rho_schedule
from slidemil.nn.sinkhorn import semi_relaxed_sinkhorn
from slidemil.tasks import TaskConfig, create_task
from slidemil.train.trainer import fit, infer


@pytest.mark.parametrize("rho", [0.1067, 0.5, 1.0])
def test_plan_meets_the_marginal_constraints(rho):
    """Within the official 1000 iterations: rows (patches) send exactly 1/N;
    the dummy column absorbs exactly 1 - rho, so the prototypes get rho
    in all; each prototype's share is only softly held to rho/K (KL relaxation), so it may differ."""
    cost = torch.rand(70, 16, generator=torch.Generator().manual_seed(0))
    plan = semi_relaxed_sinkhorn(cost, rho, keep_dummy=True)
    assert torch.allclose(plan.sum(1), torch.full((70,), 1 / 70, dtype=plan.dtype), atol=1e-7)
    assert abs(float(plan[:, -1].sum()) - (1 - rho)) < 1e-9
    assert abs(float(plan[:, :-1].sum()) - rho) < 1e-5
    assert float((plan[:, :-1].sum(0) - rho / 16).abs().max()) > 1e-4
    assert (plan >= 0).all()


def test_rho_curriculum_is_the_official_sigmoid_ramp():
    assert abs(rho_schedule(0, 100) - (0.1 + math.exp(-5))) < 1e-12
    assert abs(rho_schedule(50, 100) - (0.1 + math.exp(-5 * 0.25))) < 1e-12
    assert rho_schedule(100, 100) == 1.0 and rho_schedule(500, 100) == 1.0
    model = M.create("otsurv", in_dim=8, n_outputs=1)
    assert model.train().rho() < 0.11 and model.eval().rho() == 1.0


def test_the_plan_is_divided_by_rho_so_the_prototypes_receive_a_unit_mass():
    """Method step 5: the plan without its dummy column is divided by rho, so early in the curriculum (a tenth
    of the mass transported) the prototype features F = Pi^T H keep the scale they have at rho = 1."""
    torch.manual_seed(0)
    model = M.create("otsurv", in_dim=12, n_outputs=1)
    h = torch.randn(50, model.prototypes.weight.shape[1])
    for rho in (0.1067, 0.5, 1.0):
        plan = model.transport(h, rho)
        assert abs(float(plan.sum()) - 1.0) < 1e-4, (rho, float(plan.sum()))


def test_instance_contributions_add_up_to_the_logits():
    """z = sum_i alpha_i h_i + b 1: the logits are the sum of the per-patch contributions plus constants."""
    torch.manual_seed(0)
    model = M.create("otsurv", in_dim=12, n_outputs=2).eval()
    out = model(torch.randn(1, 40, 12))
    const = model.classifier(model.linear.bias.expand(model.classifier.in_features))
    torch.testing.assert_close(out.logits[0], out.extras["instance_logits"][0].sum(-1) + const, atol=1e-5, rtol=1e-5)


def planted_survival_bags(n, seed, dim=32):
    rng = np.random.default_rng(seed)
    proto, grade = outcome_directions(dim, seed=99)
    severity = rng.uniform(0, 1, n)
    outcome = planted_outcomes(rng, severity, "survival")
    return [severity_bag(rng, r, proto, grade, int(rng.integers(30, 70)))[0] for r in severity], outcome


@pytest.mark.slow
def test_otsurv_learns_a_planted_hazard():
    """Cox loss over batches of 16 as the official recipe; the test C-index against the planted outcome."""
    torch.manual_seed(0)
    train_x, train_y = planted_survival_bags(96, seed=1)
    test_x, test_y = planted_survival_bags(60, seed=2)
    cfg = fit_config(task="survival", survival_loss="cox", batch_size=16, epochs=12, patience=12, lr=1e-3)
    task = create_task(TaskConfig(task="survival", survival_loss="cox"))
    state = task.fit_state(train_y.assign(case_id=[f"p{i}" for i in range(len(train_y))]))
    model = M.create("otsurv", in_dim=32, n_outputs=1, max_iter=50, rampup_epochs=2)
    targets = list(zip(train_y["time"], train_y["event"]))
    fit(model, BagDataset.from_arrays(train_x, targets), None, cfg, torch.device("cpu"),
        torch.Generator().manual_seed(0), task=task, task_state=state)
    risk = infer(model, BagDataset.from_arrays(test_x, [0] * len(test_x)), torch.device("cpu")).logits[:, 0]
    c = harrell_c(test_y["time"], test_y["event"], risk)
    assert c >= 0.7, f"OTSurv test C-index {c:.3f}"


