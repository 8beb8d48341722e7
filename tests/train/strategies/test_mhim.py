"""MHIM-MIL: hard-instance masks, the EMA teacher, v2 scoring and merge, teacher_init leakage checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import bag_dataset, fit_config, planted_bags
from slidemil import models
from slidemil.train.strategies import apply_strategy
from slidemil.train.trainer import FitContext


def test_hard_instance_mask_drops_top_scored_instances():
    from slidemil.train.strategies.mhim import hard_instance_mask

    scores = torch.arange(100.0)[None]                        # instance 99 scores highest
    mask = torch.ones(1, 100, dtype=torch.bool)
    # the official select_mask_fn: pool = top ceil(N * r_h / hr), of which ceil(pool * hr) are masked
    keep = hard_instance_mask(scores, mask, ratio_h=0.1, ratio_hr=0.5)
    dropped = (~keep[0]).nonzero()[:, 0]
    assert len(dropped) == 10 and (dropped >= 80).all()
    # the v1 default (r_h 0.01, hr 0.5) masks one of the top two even in a 100-instance bag (it used to mask none
    # below ~150 instances)
    dropped = (~hard_instance_mask(scores, mask, ratio_h=0.01, ratio_hr=0.5)[0]).nonzero()[:, 0]
    assert len(dropped) == 1 and dropped[0] >= 98
    # r_h / hr > 1: the whole bag is the pool and r_h the random share
    assert (~hard_instance_mask(scores, mask, ratio_h=0.6, ratio_hr=0.5)[0]).sum() == 60
    # random masking first, then hard masking counted on the whole bag, as the official get_mask passes the
    # earlier mask's indices (ceil(100 * 0.1) = the top 10; counting on the 50 left would take the top 5)
    torch.manual_seed(0)
    keep = hard_instance_mask(scores, mask, ratio_h=0.1, ratio_hr=1.0, ratio_random=0.5)
    assert not keep[0, 90:].any() and 50 <= (~keep[0]).sum() <= 60
    # after low masking of half the bag, the hard count is still on all 200: ceil(200 * 0.02) = 4 (was 2)
    big = torch.arange(200.0)[None]
    dropped = ~hard_instance_mask(big, torch.ones(1, 200, dtype=torch.bool), 0.02, 1.0, ratio_l=0.5)[0]
    assert dropped.sum() == 104 and dropped[196:].all() and not dropped[100:196].any()
    # low masking is counted on the whole bag too: with random masking at 0.5, ceil(100 * 0.2) = 20 lowest
    keep = hard_instance_mask(scores, mask, ratio_h=0.0, ratio_hr=0.5, ratio_l=0.2, ratio_random=0.5)
    assert not keep[0, :20].any()
    keep = hard_instance_mask(scores, mask, ratio_h=0.0, ratio_hr=0.5, ratio_l=0.2)
    assert (~keep[0]).nonzero()[:, 0].tolist() == list(range(20))
    # padding is never "kept" and a bag keeps at least one instance
    mask[0, 50:] = False
    keep = hard_instance_mask(scores, mask, ratio_h=1.0, ratio_hr=1.0)
    assert not keep[0, 50:].any() and keep[0].sum() == 1


def test_cam_scores_add_the_first_class_bias_to_every_class_as_official():
    from slidemil.train.strategies.mhim import cam_scores

    torch.manual_seed(0)
    clf = torch.nn.Linear(16, 2)
    with torch.no_grad():
        clf.bias.copy_(torch.tensor([0.3, -0.3]))
    h, a = torch.randn(1, 40, 16), torch.softmax(torch.randn(1, 40), -1)
    official = torch.softmax(F.linear(a[..., None] * h, clf.weight) + clf.bias[0], -1).amax(-1)
    torch.testing.assert_close(cam_scores(a, h, clf), official)
    # the bias cancels: the top instances are those of the bias-free scores, unlike per-class biases
    per_class_bias = torch.softmax(clf(a[..., None] * h), -1).amax(-1)
    bias_free = torch.softmax(F.linear(a[..., None] * h, clf.weight), -1).amax(-1)
    assert set(cam_scores(a, h, clf)[0].topk(10).indices.tolist()) == set(bias_free[0].topk(10).indices.tolist())
    assert set(per_class_bias[0].topk(10).indices.tolist()) != set(bias_free[0].topk(10).indices.tolist())


def _mhim(model_name="abmil", **kw):
    torch.manual_seed(0)
    model = apply_strategy(models.create(model_name, 32, 2), "mhim", **kw)
    ds = bag_dataset(planted_bags(20, seed=1))
    model.fit_start(FitContext(ds, fit_config(epochs=2), torch.device("cpu")))
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
    model, ds = _mhim(baseline_epochs=0, mask_ratio_h=0.2, mask_ratio_hr=1.0, mrh_sche=False, mask_ratio=0.0)
    model.train()
    model.epoch_start(0, 2)
    x = ds[1].x[None]
    with torch.no_grad():
        t_scores = model.teacher(x).instance_scores[0]
    out = model(x)
    n_top = math.ceil(x.shape[1] * 0.2)
    top = t_scores.topk(n_top).indices
    assert (out.instance_scores[0, top] == 0).all()
    assert out.extras["teacher_embedding"] is not None and out.extras["teacher_embedding"].shape == out.bag_embedding.shape
    assert (model.eval()(x).instance_scores[0] > 0).all(), "no masking at inference"


def test_mhim_v2_cam_scoring_and_merge_run():
    model, ds = _mhim(baseline_epochs=0, scoring="cam", merge_ratio=0.8, merge_k=2, mask_ratio=0.0)
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
    from slidemil.rundir import RunDir

    base = tmp_path / "baseline"
    baseline = models.create("abmil", 32, 2)
    save_model(base / "fold_0", baseline, {"model": "abmil", "model_args": {}, "in_dim": 32, "n_outputs": 2})
    (base / "splits.csv").write_text("slide_id,fold,role\na,0,test\nb,0,train\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "splits.csv").write_text("slide_id,fold,role\nb,0,test\na,0,train\n")
    model = apply_strategy(models.create("abmil", 32, 2), "mhim", teacher_init=str(base))
    ctx = FitContext(bag_dataset(planted_bags(4)), fit_config(epochs=1), torch.device("cpu"), 0, RunDir(run))
    with pytest.raises(InputError, match="leakage"):
        model.fit_start(ctx)
    (run / "splits.csv").write_text("slide_id,fold,role\na,0,test\nb,0,train\n")
    model.fit_start(ctx)
    assert model.active and torch.equal(model.teacher.classifier.weight, baseline.classifier.weight)


def test_mhim_defaults_are_the_official_c16_abmil_command():
    """v1 README, C16/ABMIL: --mask_ratio 0.5 --mask_ratio_h 0.01 --mask_ratio_hr 0.5 --mrh_sche --cl_alpha 0.1
    --init_stu_type fc; without teacher_init the teacher is the student after half the epochs."""
    model, _ = _mhim()
    assert (model.mask_ratio, model.mask_ratio_h, model.mask_ratio_hr, model.mrh_sche, model.cl_alpha,
            model.init_stu_type) == (0.5, 0.01, 0.5, True, 0.1, "fc")
    assert model.switch_epoch == 1                                 # fit_config(epochs=2) -> epoch 1
    model.train()
    model.epoch_start(0, 2)
    assert model.teacher is None
    model.epoch_start(1, 2)
    assert model.teacher is not None


def test_mhim_init_stu_type_fc_copies_only_the_instance_embedding(tmp_path):
    from slidemil.models.checkpoint import save_model
    from slidemil.rundir import RunDir

    base = tmp_path / "baseline"
    torch.manual_seed(1)
    baseline = models.create("abmil", 32, 2)
    save_model(base / "fold_0", baseline, {"model": "abmil", "model_args": {}, "in_dim": 32, "n_outputs": 2})
    (base / "splits.csv").write_text("slide_id,fold,role\na,0,test\nb,0,train\n")
    ctx = FitContext(bag_dataset(planted_bags(4)), fit_config(epochs=1), torch.device("cpu"), 0, RunDir(base))
    for kind, clf_copied in (("fc", False), ("all", True)):
        torch.manual_seed(0)
        model = apply_strategy(models.create("abmil", 32, 2), "mhim", teacher_init=str(base), init_stu_type=kind)
        model.fit_start(ctx)
        assert torch.equal(model.model.embed[0].weight, baseline.embed[0].weight)
        assert torch.equal(model.model.classifier.weight, baseline.classifier.weight) == clf_copied


def test_mhim_merge_works_in_the_embedding_space_on_normalised_tokens():
    """v2 merge: tokens are the model's instance embeddings (512-d for abmil, not the 32-d input), normalised
    before the cross-attention, so scaling them leaves the merged tokens unchanged."""
    from slidemil.train.strategies.mhim import Merge

    model, ds = _mhim(baseline_epochs=0, merge_ratio=0.5, merge_k=3, mask_ratio=0.0)
    assert model.merge.queries.shape == (3, 512)
    merge = Merge(512, 3, momentum=0.9).eval()
    tokens = torch.randn(20, 512)
    torch.testing.assert_close(merge(tokens), merge(10 * tokens + 0), atol=1e-4, rtol=1e-4)
    before = merge.queries.clone()
    merge.train()(tokens)
    assert not torch.equal(merge.queries, before), "queries follow the merged tokens by EMA in training"
    model.train()
    model.epoch_start(0, 2)
    seen = []
    hook = model.model.attention.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model(ds[0].x[None])
    hook.remove()
    assert seen[-1][-1] == 512 and seen[-1][1] == int(round(0.5 * ds[0].x.shape[0])) + 3
    with pytest.raises(ValueError, match="embedding"):
        apply_strategy(models.create("dsmil", 8, 2), "mhim", merge_ratio=0.5)


def test_v2_scoring_takes_the_v2_commands_defaults_unless_given():
    """scoring="cam" (v2) used v1's masking defaults; the official v2 command masks high scores only (no
    random masking), hr 1, no decay, consistency weight 0.5. A value the user gives still wins."""
    from slidemil.train.strategies.mhim import MHIM

    model = models.create("abmil", 8, 2)
    v1 = MHIM(model)
    assert (v1.mask_ratio, v1.mask_ratio_hr, v1.mrh_sche, v1.cl_alpha) == (0.5, 0.5, True, 0.1)
    v2 = MHIM(models.create("abmil", 8, 2), scoring="cam")
    assert (v2.mask_ratio, v2.mask_ratio_hr, v2.mrh_sche, v2.cl_alpha) == (0.0, 1.0, False, 0.5)
    mine = MHIM(models.create("abmil", 8, 2), scoring="cam", mask_ratio=0.3, cl_alpha=0.2)
    assert (mine.mask_ratio, mine.mask_ratio_hr, mine.cl_alpha) == (0.3, 1.0, 0.2)
