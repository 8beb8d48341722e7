"""Each aggregator's forward pass equals its paper's equations written out here from its own weights
(../shared/methods/ cards), in eval mode: what a learning test cannot see (a missing gate, a wrong scale,
another critical instance) changes these numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from slidemil import models

torch.manual_seed(0)
X = torch.randn(1, 37, 24)


def _gated(att, h):
    """Ilse et al. 2018 eq. (9): w^T (tanh(V h) * sigm(U h)); V and U are the two halves of the fused VU."""
    v, u = (h @ att.VU.weight.T + att.VU.bias).chunk(2, dim=-1)
    return (torch.tanh(v) * torch.sigmoid(u)) @ att.w.weight.T + (att.w.bias if att.w.bias is not None else 0)


@pytest.mark.parametrize("gated", [True, False])
def test_abmil_is_ilse_eq_8_or_9(gated):
    model = models.create("abmil", in_dim=24, n_outputs=3, gated=gated).eval()
    with torch.no_grad():
        out = model(X)
        h = torch.relu(X[0] @ model.embed[0].weight.T + model.embed[0].bias)            # h_k = ReLU(W_1 x_k)
        att = model.attention
        raw = (_gated(att, h) if gated else
               torch.tanh(h @ att.VU.weight.T + att.VU.bias) @ att.w.weight.T + att.w.bias)[:, 0]
        a = torch.softmax(raw, 0)                                                        # eq. (8)/(9)
        z = a @ h                                                                        # z = sum_k a_k h_k
        logits = z @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(out.instance_scores[0], a)
    torch.testing.assert_close(out.logits[0], logits)


def test_dsmil_is_li_2021_sec_3_1():
    """Stream 1: c_i = W_0 x_i, s_max = max c; critical m = argmax c; stream 2: q_i = tanh(W_2 ReLU(W_1 x_i)),
    U_i = softmax(<q_i, q_m> / sqrt(|q|)), b = sum U_i x_i, s_bag = Conv1d(b); binary logits [0, s_bag]."""
    model = models.create("dsmil", in_dim=24, n_outputs=2).eval()
    with torch.no_grad():
        out = model(X)
        x = X[0]
        c = (x @ model.instance_classifier.weight.T + model.instance_classifier.bias)[:, 0]
        m = int(c.argmax())
        l1, l2 = model.q[0], model.q[2]
        q = torch.tanh(torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)
        u = torch.softmax(q @ q[m] / math.sqrt(q.shape[1]), 0)
        b = u @ x
        s_bag = (model.fcc.weight[0, 0] * b).sum() + model.fcc.bias[0]
    torch.testing.assert_close(out.instance_scores[0], u)
    torch.testing.assert_close(out.logits[0], torch.stack([torch.zeros(()), s_bag]))
    torch.testing.assert_close(out.extras["max_logits"][0, 1], c.max())


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_clam_is_lu_2021_gated_attention_per_branch(name):
    """h = ReLU(W_1 x); gated attention (one branch, or one per class); SB: logits = W_c sum_k a_k h_k; MB:
    logit_c = w_c . sum_k a_{c,k} h_k. Instance scores: the predicted class's branch."""
    model = models.create(name, in_dim=24, n_outputs=3).eval()
    with torch.no_grad():
        out = model(X)
        h = torch.relu(X[0] @ model.embed[0].weight.T + model.embed[0].bias)
        a = torch.softmax(_gated(model.attention, h), 0)                                  # [N, branches]
        if name == "clam_sb":
            logits = (a[:, 0] @ h) @ model.classifier.weight.T + model.classifier.bias
            scores = a[:, 0]
        else:
            logits = torch.stack([(a[:, c] @ h) @ clf.weight[0] + clf.bias[0] for c, clf in enumerate(model.classifiers)])
            scores = a[:, int(logits.argmax())]
    torch.testing.assert_close(out.logits[0], logits)
    torch.testing.assert_close(out.instance_scores[0], scores)


def test_mean_and_max_pooling_are_their_definitions():
    with torch.no_grad():
        mean = models.create("mean_pool", in_dim=24, n_outputs=2).eval()
        maxp = models.create("max_pool", in_dim=24, n_outputs=2).eval()
        for model, pool in ((mean, lambda h: h.mean(0)), (maxp, lambda h: h.max(0).values)):
            layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            h = torch.relu(X[0] @ layers[0].weight.T + layers[0].bias)
            logits = pool(h) @ layers[-1].weight.T + layers[-1].bias
            torch.testing.assert_close(model(X).logits[0], logits)
