"""The survival losses against hand-computed values and against scikit-survival's Cox fit."""

from __future__ import annotations

import math

import numpy as np
import torch
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from slidemil.tasks.survival import cox_loss, nll_risk, nll_survival_loss

LOGITS = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(3.0), 0.0]])   # hazards [.5,.5], [.5,.5], [.75,.5]
BINS = torch.tensor([1, 0, 0])
EVENT = torch.tensor([1.0, 0.0, 1.0])


def test_nll_matches_the_hand_computed_three_patient_example():
    """Event in bin 1: -(log S_0 + log h_1) = 2 log 2; censored in bin 0: -log S_0 = log 2; event in
    bin 0: -(log 1 + log h_0) = -log 0.75."""
    per_patient = np.array([2 * math.log(2), math.log(2), -math.log(0.75)])
    assert float(nll_survival_loss(LOGITS, BINS, EVENT)) == np.float32(per_patient.mean())
    # alpha weighs the uncensored terms again: (1 - a)(all) + a(uncensored)
    alpha = 0.5
    weighted = (1 - alpha) * per_patient + alpha * per_patient * EVENT.numpy()
    assert abs(float(nll_survival_loss(LOGITS, BINS, EVENT, alpha)) - weighted.mean()) < 1e-6


def test_nll_risk_is_minus_the_sum_of_survival():
    risk, s = nll_risk(LOGITS.numpy())
    assert np.allclose(s[0], [0.5, 0.25]) and np.allclose(s[2], [0.25, 0.125])
    assert np.allclose(risk, [-0.75, -0.75, -0.375])


def test_cox_breslow_keeps_tied_times_in_one_risk_set():
    """Risks (1, 0, 2), times (5, 3, 3), events (1, 1, 0): the event at 5 has risk set {1} (term 0); the
    event at 3 shares time 3 with a censored patient, who stays in its risk set (Breslow):
    loss = log(e + 1 + e^2) / 2. Sorting the tie the other way must not change it."""
    expected = math.log(math.e + 1 + math.e ** 2) / 2
    for order in ([0, 1, 2], [0, 2, 1], [2, 1, 0]):
        r = torch.tensor([1.0, 0.0, 2.0])[order]
        t = torch.tensor([5.0, 3.0, 3.0])[order]
        e = torch.tensor([1.0, 1.0, 0.0])[order]
        assert abs(float(cox_loss(r, t, e)) - expected) < 1e-6
    assert cox_loss(torch.zeros(3), torch.ones(3), torch.zeros(3)) is None


def test_cox_minimiser_equals_scikit_survival_breslow_fit():
    """Minimising our loss over a linear risk beta^T x recovers CoxPHSurvivalAnalysis(ties='breslow')."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 2))
    time = np.round(rng.exponential(np.exp(-(x @ [0.8, -0.5]))) * 4) + 1   # rounded: many ties
    event = rng.uniform(size=80) < 0.7
    reference = CoxPHSurvivalAnalysis(ties="breslow", alpha=0.0).fit(x, Surv.from_arrays(event, time)).coef_
    beta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)
    xt, tt, et = torch.tensor(x), torch.tensor(time), torch.tensor(event, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = cox_loss((xt @ beta).double(), tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    assert np.allclose(beta.detach().numpy(), reference, atol=2e-3), (beta, reference)
