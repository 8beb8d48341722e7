"""Key mechanisms of the literature methods of issue 4: R²T-MIL, MambaMIL/LBMamba, MHIM, SC, HistAug."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slidemil import models
from slidemil.config import TrainConfig
from slidemil.data.bags import BagDataset
from slidemil.train.build import build_model
from slidemil.train.strategies import apply_strategy
from slidemil.train.trainer import FitContext, fit, infer

from conftest import planted_bags


def _dataset(bags):
    return BagDataset.from_arrays([b[0] for b in bags], [b[1] for b in bags])


def _cfg(**kw):
    return TrainConfig(features="-", labels="-", out="-", warmup_epochs=0, **kw)


# --- selective scan ------------------------------------------------------------------------------

def _scan_inputs(b=2, d=6, n=4, L=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(b, d, L), delta=r(b, d, L), A=-torch.rand(d, n, generator=g) * 2, B=r(b, n, L), C=r(b, n, L),
                D=r(d), z=r(b, d, L), delta_bias=r(d), delta_softplus=True)


@pytest.mark.parametrize("window", [1, 5, 8])
@pytest.mark.parametrize("chunk", [1024, 16, 7, 1])
def test_chunked_scan_matches_the_naive_loop(window, chunk):
    """The chunked scan (L = 53 is a multiple of neither chunk nor window) equals the recurrence run
    one step at a time, values and gradients, to 1e-4."""
    from slidemil.nn.ssm import selective_scan, selective_scan_reference

    inp = _scan_inputs()
    for k in ("u", "delta", "B"):
        inp[k].requires_grad_(True)
    grads = []
    for scan in (lambda: selective_scan_reference(**inp, window=window),
                 lambda: selective_scan(**inp, window=window, chunk=chunk)):
        y = scan()
        (y * torch.cos(y)).sum().backward()   # .backward(): the chunks are re-entrant checkpoints
        grads.append((y.detach(), *(inp[k].grad.clone() for k in ("u", "delta", "B"))))
        for k in ("u", "delta", "B"):
            inp[k].grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_scan_carries_state_between_calls():
    from slidemil.nn.ssm import selective_scan

    inp = _scan_inputs(L=40)
    whole = selective_scan(**inp)
    first = {k: (v[..., :25] if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in inp.items()}
    second = {k: (v[..., 25:] if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in inp.items()}
    y1, h = selective_scan(**first, return_state=True)
    y2 = selective_scan(**second, h0=h)
    torch.testing.assert_close(torch.cat([y1, y2], -1), whole, atol=1e-5, rtol=1e-5)


def test_lbmamba_window_one_is_the_forward_scan():
    from slidemil.nn.ssm import selective_scan, selective_scan_reference

    inp = _scan_inputs()
    plain = selective_scan_reference(**inp, window=0)
    torch.testing.assert_close(selective_scan(**inp, window=1), plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(selective_scan(**inp, window=8), plain, atol=1e-3), "the local backward state is used"
    torch.manual_seed(0)
    lb = models.create("lbmamba", 16, 2, dim=32, window=1).eval()
    torch.manual_seed(0)
    mamba = models.create("lbmamba", 16, 2, dim=32, window=1, n_layers=2).eval()
    x = torch.randn(1, 30, 16)
    torch.testing.assert_close(lb(x).logits, mamba(x).logits)


def test_lbmamba_backward_state_only_looks_inside_its_window():
    """Changing the input at position 20 changes outputs before it only within its window [16, 24)."""
    from slidemil.nn.ssm import selective_scan

    inp = _scan_inputs(b=1)
    base = selective_scan(**inp, window=8)
    inp["u"] = inp["u"].clone()
    inp["u"][..., 20] += 3.0
    changed = (selective_scan(**inp, window=8) - base).abs().amax((0, 1)) > 1e-6
    assert not changed[:16].any() and changed[16:21].all() and changed[21:].all()


def test_sr_mamba_reordering_is_a_permutation_and_its_inverse_restores_order():
    from slidemil.models.mambamil import reorder_index

    for n, rate in [(53, 5), (40, 10), (7, 3), (1, 5)]:
        order, inverse, padded = reorder_index(n, rate)
        assert padded % rate == 0 and padded - n < rate
        assert torch.equal(order.sort().values, torch.arange(padded))
        seq = torch.arange(padded)
        assert torch.equal(seq[order][inverse], seq)
        # column-major reading of the (padded / R) x R row-major matrix: 0, R, 2R, ..., then 1, R+1, ...
        assert order[: padded // rate].tolist() == list(range(0, padded, rate))
        assert order[padded // rate] == 1 if padded > rate else True


def test_mamba_streaming_in_pieces_changes_nothing():
    from slidemil.models.mambamil import MambaBlock

    torch.manual_seed(0)
    for kw in ({"rate": 5}, {"window": 8}):
        block = MambaBlock(16, 4, 4, 2, chunk=1024, **kw).train()
        x = torch.randn(1, 53, 16, requires_grad=True)
        y1 = block(x)
        y1.sum().backward()
        g1, w1 = x.grad.clone(), block.in_proj.weight.grad.clone()
        x.grad, block.in_proj.weight.grad = None, None
        block.chunk = 8
        y2 = block(x)
        y2.sum().backward()
        g2, w2 = x.grad.clone(), block.in_proj.weight.grad.clone()
        torch.testing.assert_close(w1, w2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_mamba_parameters_out_of_weight_decay():
    from slidemil.train.trainer import param_groups

    model = models.create("mambamil", 16, 2, dim=32)
    groups = param_groups(model, 1e-4)
    no_decay = {id(p) for p in groups[1]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in no_decay) == (name.endswith(("A_log", ".D", "dt_proj.bias"))), name


# --- R²T-MIL ------------------------------------------------------------------------------------

def test_rrt_regions_roundtrip_and_partition():
    from slidemil.models.rrt import from_regions, region_grid, to_regions

    for n, k in [(100, 8), (1000, 8), (37, 4)]:
        side, r = region_grid(n, k)
        assert side % k == 0 and side * side >= n and r == side // k
        x = torch.randn(n, 3)
        regions = to_regions(x, side, r)
        assert regions.shape == (k * k, r * r, 3)
        torch.testing.assert_close(from_regions(regions, side, r, n), x)
    # region 0 holds the top-left r x r block of the row-major grid
    side, r = region_grid(64, 4)
    idx = to_regions(torch.arange(64.0)[:, None], side, r)[0, :, 0]
    assert idx.tolist() == [0, 1, 8, 9]


def test_rrt_regional_attention_stays_inside_regions():
    from slidemil.models.rrt import RegionMSA

    torch.manual_seed(0)
    layer = RegionMSA(16, 4, 0.0, region_num=2, region_size=0, epeg_k=3).eval()
    x = torch.randn(64, 16)                                   # 8 x 8 grid, four 4 x 4 regions
    y = layer(x)
    x2 = x.clone()
    x2[63] += 5.0                                             # bottom-right region only
    changed = (layer(x2) - y).abs().amax(1) > 1e-6
    grid = torch.arange(64).view(8, 8)
    bottom_right = set(grid[4:, 4:].flatten().tolist())
    assert set(changed.nonzero()[:, 0].tolist()) == bottom_right


def test_rrt_epeg_convolves_the_attention_logits():
    from slidemil.models.rrt import InnerAttention

    torch.manual_seed(0)
    attn = InnerAttention(16, 4, 0.0, epeg_k=5).eval()
    x = torch.randn(3, 10, 16)
    with_pe = attn(x)
    with torch.no_grad():
        attn.pe.weight.zero_()
        attn.pe.bias.zero_()
    plain = attn(x)
    q, k, v = attn.qkv(x).view(3, 10, 3, 4, 4).permute(2, 0, 3, 1, 4)
    expected = attn.proj((((q * 0.5) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(3, 10, 16))
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_pe, plain, atol=1e-4)


def test_rrt_region_groups_bound_memory_without_changing_results(monkeypatch):
    import slidemil.models.rrt as rrt

    torch.manual_seed(0)
    model = models.create("rrt", 16, 2, dim=32, heads=4, crmsa_heads=4).train()
    x = torch.randn(1, 500, 16)
    outs = []
    for limit in (1 << 30, 1000):
        monkeypatch.setattr(rrt, "_MAX_ATTN_ELEMENTS", limit)
        torch.manual_seed(1)
        model.zero_grad()
        out = model(x)
        out.logits.sum().backward()
        outs.append((out.logits.detach(), model.reembed.project[0].weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_reembed_rrt_in_front_of_any_aggregator():
    from sklearn.metrics import roc_auc_score

    from slidemil.data.bags import Bag, collate_bags

    torch.manual_seed(0)
    small = {"dim": 64, "heads": 4, "crmsa_heads": 4}
    model = build_model({"model": "transmil", "reembed": "rrt", "reembed_args": small}, 32, 2).eval()
    assert model.model.in_dim == 64 and model.attention_scores
    a, b = torch.randn(23, 32), torch.randn(9, 32)
    batch = collate_bags([Bag("a", a, 0, None), Bag("b", b, 1, None)])
    with torch.no_grad():
        padded = model(batch["x"], batch["mask"])
        torch.testing.assert_close(padded.logits[1], model(b[None]).logits[0], atol=1e-5, rtol=1e-5)
    model = build_model({"model": "abmil", "reembed": "rrt", "reembed_args": small}, 32, 2)
    fit(model, _dataset(planted_bags(80, seed=1)), None, _cfg(epochs=10, lr=5e-4), torch.device("cpu"),
        torch.Generator().manual_seed(0))
    test = planted_bags(40, seed=3)
    res = infer(model, _dataset(test), torch.device("cpu"))
    assert roc_auc_score([b[1] for b in test], res.probs[:, 1]) >= 0.9
    with pytest.raises(ValueError, match="unknown re-embedding"):
        build_model({"model": "abmil", "reembed": "nope"}, 32, 2)


# --- MHIM ---------------------------------------------------------------------------------------

def test_hard_instance_mask_drops_top_scored_instances():
    from slidemil.train.strategies.mhim import hard_instance_mask

    scores = torch.arange(100.0)[None]                        # instance 99 scores highest
    mask = torch.ones(1, 100, dtype=torch.bool)
    keep = hard_instance_mask(scores, mask, ratio_h=0.1, ratio_hr=0.5)
    dropped = (~keep[0]).nonzero()[:, 0]
    assert len(dropped) == 5 and (dropped >= 90).all()
    keep = hard_instance_mask(scores, mask, ratio_h=0.0, ratio_hr=0.5, ratio_l=0.2)
    assert (~keep[0]).nonzero()[:, 0].tolist() == list(range(20))
    # padding is never "kept" and a bag keeps at least one instance
    mask[0, 50:] = False
    keep = hard_instance_mask(scores, mask, ratio_h=1.0, ratio_hr=1.0)
    assert not keep[0, 50:].any() and keep[0].sum() == 1


def _mhim(model_name="abmil", **kw):
    torch.manual_seed(0)
    model = apply_strategy(models.create(model_name, 32, 2), "mhim", **kw)
    ds = _dataset(planted_bags(20, seed=1))
    model.fit_start(FitContext(ds, _cfg(epochs=2), torch.device("cpu")))
    return model, ds


def test_mhim_teacher_is_updated_only_by_ema():
    model, ds = _mhim(baseline_epochs=0, mm=0.9)
    model.train()
    model.epoch_start(0, 2)                                   # the student becomes the teacher
    teacher = model.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in teacher.parameters() for q in model.parameters()), "teacher not in the optimiser"
    assert "teacher" not in dict(model.named_children()) and not any(k.startswith("teacher") for k in model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in teacher.parameters()]
    x, y = ds[0].x[None], torch.tensor([ds[0].y])
    out = model(x)
    model.loss(out, y, F.cross_entropy).backward()
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(teacher.parameters(), before)), "teacher moved before the EMA"
    model.step_end()
    for t, b, s in zip(teacher.parameters(), before, model.model.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s.detach())


def test_mhim_student_never_sees_the_masked_hard_instances():
    model, ds = _mhim(baseline_epochs=0, mask_ratio_h=0.2, mask_ratio_hr=1.0, mrh_sche=False)
    model.train()
    model.epoch_start(0, 2)
    x = ds[1].x[None]
    with torch.no_grad():
        t_scores = model.teacher(x).instance_scores[0]
    out = model(x)
    n_top = math.ceil(x.shape[1] * 0.2)
    top = t_scores.topk(n_top).indices
    assert (out.instance_scores[0, top] == 0).all()
    assert out.extras["teacher_embedding"] is not None and out.extras["teacher_embedding"].shape == out.extras["embedding"].shape
    assert (model.eval()(x).instance_scores[0] > 0).all(), "no masking at inference"


def test_mhim_v2_cam_scoring_and_merge_run():
    model, ds = _mhim(baseline_epochs=0, scoring="cam", merge_ratio=0.8, merge_k=2)
    model.train()
    model.epoch_start(0, 2)
    x, y = ds[0].x[None], torch.tensor([ds[0].y])
    out = model(x)
    # mask_ratio_h 0.01 of ~50 instances: 1 top instance, half of it masked -> none; 80% kept + 2 merged
    assert out.instance_scores.shape[1] == int(round(0.8 * x.shape[1])) + 2
    loss = model.loss(out, y, F.cross_entropy)
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="scoring"):
        apply_strategy(models.create("abmil", 8, 2), "mhim", scoring="vote")


def test_mhim_teacher_init_refuses_a_baseline_with_other_splits(tmp_path):
    from slidemil.errors import InputError
    from slidemil.models.checkpoint import save_model

    base = tmp_path / "baseline"
    baseline = models.create("abmil", 32, 2)
    save_model(base / "fold_0", baseline, {"model": "abmil", "model_args": {}, "in_dim": 32, "n_outputs": 2})
    (base / "splits.csv").write_text("slide_id,fold,role\na,0,test\nb,0,train\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "splits.csv").write_text("slide_id,fold,role\nb,0,test\na,0,train\n")
    model = apply_strategy(models.create("abmil", 32, 2), "mhim", teacher_init=str(base))
    ctx = FitContext(_dataset(planted_bags(4)), _cfg(epochs=1), torch.device("cpu"), 0, run)
    with pytest.raises(InputError, match="leakage"):
        model.fit_start(ctx)
    (run / "splits.csv").write_text("slide_id,fold,role\na,0,test\nb,0,train\n")
    model.fit_start(ctx)
    assert model.active and torch.equal(model.teacher.classifier.weight, baseline.classifier.weight)


# --- SC-MIL -------------------------------------------------------------------------------------

def test_supcon_matches_its_definition_and_skips_anchors_without_positives():
    from slidemil.train.strategies.sc import supcon_loss

    torch.manual_seed(0)
    z = F.normalize(torch.randn(4, 8), dim=-1)
    y = torch.tensor([0, 0, 1, 2])                            # anchors 2 and 3 have no positive
    loss = supcon_loss(z, y, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 0.1)
    logits = z @ z.T / 0.1
    expected = []
    for i, j in [(0, 1), (1, 0)]:
        others = [k for k in range(4) if k != i]
        expected.append(-(logits[i, j] - torch.logsumexp(logits[i, others], 0)))
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    assert supcon_loss(z[2:], y[2:], torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 0.1) is None


def test_sc_curriculum_moves_from_contrast_to_classifier():
    torch.manual_seed(0)
    model = apply_strategy(models.create("abmil", 32, 2), "sc").train()
    ds = _dataset(planted_bags(6, seed=1))
    model.fit_start(FitContext(ds, _cfg(epochs=10), torch.device("cpu")))
    alphas = []
    for epoch in range(10):
        model.epoch_start(epoch, 10)
        alphas.append(model.alpha)
    assert alphas[0] == 1.0 and all(a > b for a, b in zip(alphas, alphas[1:])) and alphas[-1] < 0.2
    model.epoch_start(0, 10)
    x = torch.stack([ds[i].x[:20] for i in range(4)])
    y = torch.tensor([ds[i].y for i in range(4)])
    out = model(x)
    loss = model.loss(out, y, F.cross_entropy)
    loss.backward()
    assert model.model.classifier.weight.grad is None or not model.model.classifier.weight.grad.abs().sum(), \
        "at alpha = 1 only the contrastive term trains"
    assert model.projection[0].weight.grad.abs().sum() > 0


def test_sc_learns_an_imbalanced_planted_task():
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    bags = [b for b in planted_bags(120, seed=1) if b[1] == 0 or np.random.default_rng(len(b[0])).random() < 0.4]
    model = apply_strategy(models.create("abmil", 32, 2), "sc")
    fit(model, _dataset(bags), None, _cfg(epochs=12, lr=5e-4), torch.device("cpu"), torch.Generator().manual_seed(0))
    test = planted_bags(60, seed=3)
    res = infer(model, _dataset(test), torch.device("cpu"))
    assert roc_auc_score([b[1] for b in test], res.probs[:, 1]) >= 0.9


# --- feature augmentation -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["feature_noise", "feature_dropout", "instance_mixup"])
def test_feature_augmentations_act_in_training_only(name):
    torch.manual_seed(0)
    model = apply_strategy(models.create("mean_pool", 8, 2), name)
    seen = []
    model.model.forward = lambda x, mask=None, coords=None: seen.append(x.clone()) or models.MILOutput(x.sum(1)[:, :2], None)
    x = torch.randn(1, 30, 8)
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, 25:] = False
    model.train()(x, mask)
    model.eval()(x, mask)
    assert not torch.equal(seen[0][0, :25], x[0, :25]) and torch.equal(seen[0][0, 25:], x[0, 25:])
    assert torch.equal(seen[1], x)
    if name == "instance_mixup":  # each row lies on a segment between two real rows, nearer its own
        d_own = (seen[0][0, :25] - x[0, :25]).norm(dim=1)
        assert (d_own <= 0.5 * torch.cdist(x[0, :25], x[0, :25]).max() + 1e-6).all()


def test_histaug_transforms_and_generator():
    from slidemil.augment.histaug import (TRANSFORMS, GeneratorConfig, HistAugGenerator, apply_transforms,
                                          sample_params)

    g = torch.Generator().manual_seed(0)
    params = sample_params(64, g)
    assert sorted(params["order"][0].tolist()) == list(range(len(TRANSFORMS)))
    applied = np.mean([float(params["hflip"][i] > 0) for i in range(64)])
    assert 0.5 < applied < 0.95                               # P = 0.75
    img = torch.rand(3, 32, 32)
    one = {k: v[:1] for k, v in params.items()}
    for k in params:
        if k != "order":
            one[k] = torch.zeros_like(one[k])
    assert torch.equal(apply_transforms(img, one, 0), img), "no transform applied = identity"
    one["hflip"] = torch.ones_like(one["hflip"])
    assert torch.equal(apply_transforms(img, one, 0), img.flip(-1))
    gen = HistAugGenerator(GeneratorConfig(dim=32, depth=2))
    z = torch.randn(10, 32)
    wsi = gen(z, sample_params(1, g))
    inst = gen(z, sample_params(10, g))
    assert wsi.shape == inst.shape == (10, 32)
