"""CLAM: the instance loss and the smooth top-1 SVM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slidemil import models


def test_clam_instance_loss_uses_true_class_branch_and_clamps_k():
    torch.manual_seed(0)
    model = models.create("clam_mb", in_dim=8, n_outputs=2, k_sample=8).eval()
    x = torch.randn(1, 5, 8)  # fewer instances than k_sample: must not crash
    out = model(x)
    loss = model.loss(out, torch.tensor([1]), F.cross_entropy)
    assert torch.isfinite(loss)
    # bag_weight=1 leaves the task loss alone
    model.bag_weight = 1.0
    target = torch.tensor([1])
    torch.testing.assert_close(model.loss(out, target, F.cross_entropy), F.cross_entropy(out.logits, target))


def test_smooth_svm_matches_definition():
    from slidemil.models.clam import smooth_top1_svm

    logits = torch.tensor([[2.0, 0.5], [0.1, 0.3]])
    target = torch.tensor([0, 1])
    expected = torch.stack([torch.logsumexp(torch.tensor([0.0, 1 + 0.5 - 2.0]), 0),
                            torch.logsumexp(torch.tensor([1 + 0.1 - 0.3, 0.0]), 0)]).mean()
    torch.testing.assert_close(smooth_top1_svm(logits, target), expected)


def test_clam_defaults_are_the_official_commands_svm_and_subtyping_for_subtyping_tasks():
    """`--inst_loss svm` always; `--subtyping` (negatives from the other classes' branches) for > 2 classes."""
    binary, three = models.create("clam_sb", 8, 2), models.create("clam_mb", 8, 3)
    assert binary.inst_loss == three.inst_loss == "svm"
    assert not binary.subtyping and three.subtyping
    assert models.create("clam_sb", 8, 2, subtyping=True).subtyping
