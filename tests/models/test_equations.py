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


def _ln(ln, x):
    return torch.nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _softmax_attention_block(layer, x):
    """TransLayer x + Attn(LN(x)) with attention exact (a sequence under the landmark count): softmax(Q K^T /
    sqrt(d)) V plus the depth-wise residual convolution of V over the sequence, heads concatenated, W_out.
    Returns the block's output and the attention [heads, n, n]."""
    attn = layer.attn
    n, h, d = x.shape[0], attn.heads, attn.dim_head
    q, k, v = (t.view(n, h, d).transpose(0, 1) for t in (_ln(layer.norm, x) @ attn.to_qkv.weight.T).chunk(3, -1))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
    conv = attn.res_conv
    res = torch.nn.functional.conv2d(v[None], conv.weight, padding=(conv.kernel_size[0] // 2, 0), groups=h)[0]
    out = (a @ v + res).transpose(0, 1).reshape(n, h * d)
    return x + out @ attn.to_out[0].weight.T + attn.to_out[0].bias, a


def test_transmil_is_shao_2021_algorithm_1():
    """h = ReLU(W x); square to M = ceil(sqrt N)^2 by repeating the first M - N tokens; class token first;
    TransLayer; PPEG on the sqrt M x sqrt M grid in list order: x + DWConv7(x) + DWConv5(x) + DWConv3(x);
    TransLayer; LayerNorm; classify the class token. Scores: the class token's last attention row, heads
    averaged, a repeated token's share added to the instance it copies."""
    model = models.create("transmil", in_dim=24, n_outputs=3, hidden_dim=32, heads=4).eval()
    with torch.no_grad():
        out = model(X)
        n = X.shape[1]
        h = torch.relu(X[0] @ model.fc1[0].weight.T + model.fc1[0].bias)
        side = math.ceil(math.sqrt(n))                                              # 37 -> 7 x 7 = 49
        h = torch.cat([h, h[:side * side - n]])                                     # repeat the first 12
        t = torch.cat([model.cls_token[0], h])
        t, _ = _softmax_attention_block(model.layer1, t)
        grid = t[1:].T.reshape(1, -1, side, side)                                   # row-major, list order
        pe = grid + sum(torch.nn.functional.conv2d(grid, c.weight, c.bias, padding=c.kernel_size[0] // 2,
                                                   groups=grid.shape[1]) for c in model.ppeg.convs)
        t = torch.cat([t[:1], pe.reshape(grid.shape[1], -1).T])
        t, a = _softmax_attention_block(model.layer2, t)
        logits = _ln(model.norm, t[0]) @ model.classifier.weight.T + model.classifier.bias
        row = a[:, 0, 1:].mean(0)                                                   # the class token's row
        scores = row[:n].clone()
        scores[:side * side - n] += row[n:]
    assert [c.kernel_size[0] for c in model.ppeg.convs] == [7, 5, 3]
    torch.testing.assert_close(out.logits[0], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.instance_scores[0], scores, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("distill", ["AFS", "MaxS", "MaxMinS"])
def test_dtfd_is_zhang_2022_double_tier(distill):
    """h = ReLU(W x) (no bias); the bag's instances in M = 4 pseudo-bags (the fixed evaluation permutation);
    tier 1 per pseudo-bag: gated attention a, f = sum a_k h_k, its logits; CAM p_k = softmax(W_1 (a_k h_k));
    distilled per pseudo-bag: f (AFS), the instance of highest positive-class p_k (MaxS), and that of lowest
    too (MaxMinS); tier 2: gated attention over the distilled features and its classifier. Instance scores:
    the positive class's CAM probability."""
    model = models.create("dtfd", in_dim=24, n_outputs=2, distill=distill).eval()
    with torch.no_grad():
        out = model(X)
        n = X.shape[1]
        h = torch.relu(X[0] @ model.reduce[0].weight.T)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(model.eval_seed))
        pseudo, distilled, cam = [], [], torch.zeros(n)
        for idx in torch.tensor_split(order, 4):
            hg = h[idx]
            a = torch.softmax(_gated(model.tier1.attention, hg)[:, 0], 0)
            f = a @ hg
            pseudo.append(f @ model.tier1.classifier.weight.T + model.tier1.classifier.bias)
            p = torch.softmax((a[:, None] * hg) @ model.tier1.classifier.weight.T, -1)[:, 1]
            cam[idx] = p
            top, low = hg[p.argmax()], hg[p.argmin()]
            distilled += {"AFS": [f], "MaxS": [top], "MaxMinS": [top, low]}[distill]
        d = torch.stack(distilled)
        a2 = torch.softmax(_gated(model.tier2.attention, d)[:, 0], 0)
        logits = (a2 @ d) @ model.tier2.classifier.weight.T + model.tier2.classifier.bias
    torch.testing.assert_close(out.logits[0], logits)
    torch.testing.assert_close(out.extras["pseudo_logits"][0], torch.stack(pseudo))
    torch.testing.assert_close(out.instance_scores[0], cam)


def test_dtfd_loss_is_the_pseudo_bags_mean_plus_the_slide_term():
    """Zhang et al. 2022 Sec. 3: L = mean over pseudo-bags of CE(tier-1 logits, the bag's label) + CE(tier 2)."""
    import torch.nn.functional as F

    model = models.create("dtfd", in_dim=24, n_outputs=2).eval()
    out = model(torch.cat([X, X.flip(1)]))
    target = torch.tensor([1, 0])
    tier1 = torch.stack([F.cross_entropy(out.extras["pseudo_logits"][b], target[b].repeat(4)) for b in range(2)])
    torch.testing.assert_close(model.loss(out, target, F.cross_entropy), tier1.mean() + F.cross_entropy(out.logits, target))


def _mamba_block(block, h):
    """A Mamba block with SR-Mamba's second branch (Yang et al. 2024, Sec. 2.2) written out around its two S6
    branches: the forward branch on h; the other on h zero-padded to a multiple of R and read column-major
    from the (n' / R) x R matrix, its outputs put back at the positions they were read from; summed, out_proj."""
    y = block.forward_branch(h, block.in_proj, block.window, block.chunk)
    if block.reordered_branch is not None:
        n, rate = h.shape[1], block.rate
        padded = math.ceil(n / rate) * rate
        order = [r * rate + c for c in range(rate) for r in range(padded // rate)]
        out = block.reordered_branch(torch.nn.functional.pad(h, (0, 0, 0, padded - n))[:, order], block.in_proj,
                                     block.window, block.chunk)
        back = torch.empty_like(out)
        back[:, order] = out
        y = y + back[:, :n]
    return y @ block.out_proj.weight.T


@pytest.mark.parametrize("name", ["mambamil", "lbmamba"])
def test_mamba_models_compose_their_layers_as_the_papers(name):
    """h = GELU(W x); per layer h + Block(LN(h)), a flipped layer (LBMamba's alternate layers) scanning the
    reversed sequence and reversing its output back; LN; attention w^T tanh(V h); classifier."""
    model = models.create(name, in_dim=24, n_outputs=2, dim=32).eval()
    with torch.no_grad():
        out = model(X)
        h = torch.nn.functional.gelu(X @ model.embed[0].weight.T + model.embed[0].bias)
        for i, block in enumerate(model.blocks):
            inner = _ln(model.norms[i], h)
            h = h + (_mamba_block(block, inner.flip(1)).flip(1) if i % 2 and name == "lbmamba" else _mamba_block(block, inner))
        h = _ln(model.norm, h)[0]
        att = model.attention
        a = torch.softmax((torch.tanh(h @ att.VU.weight.T + att.VU.bias) @ att.w.weight.T)[:, 0], 0)
        logits = (a @ h) @ model.classifier.weight.T + model.classifier.bias
    assert model.flips == ([False, True] if name == "lbmamba" else [False, False])
    torch.testing.assert_close(out.instance_scores[0], a)
    torch.testing.assert_close(out.logits[0], logits)
