"""Feature-space augmentation: training only; HistAug's transforms and generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidemil import models
from slidemil.train.strategies import apply_strategy


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
    from slidemil.augment.histaug import TRANSFORMS, GeneratorConfig, HistAugGenerator, apply_transforms, sample_params

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


def test_histaug_transforms_follow_the_official_factory():
    """Official PatchAugmentation: continuous transforms always fire; HED is the per-channel shift
    (factors -2, 2, -3 times sigma 0.03, offset pi); gamma is 1 + v; 4 x 4 morphology; 15 px blur."""
    from slidemil.augment import histaug as H

    params = H.sample_params(200, torch.Generator().manual_seed(0))
    for name in H.CONTINUOUS:
        assert (params[name] != 0).all() and params[name].abs().max() <= 0.5
    img = torch.rand(3, 28, 28) * 0.8 + 0.1
    rgb = img.movedim(0, -1)
    hed = -torch.log(rgb + 3.14159) @ torch.linalg.inv(H._RGB_FROM_HED)
    shift = 0.4 * torch.tensor([-2.0, 2.0, -3.0]) * 0.03
    official = (torch.exp(-((hed * (1 + shift) + shift) @ H._RGB_FROM_HED)) - 3.14159).clamp(0, 1).movedim(-1, 0)
    torch.testing.assert_close(H._hed(img, 0.4), official)
    # the shift is per channel: not a uniform scaling of optical density
    od = (-torch.log((H._hed(img, 0.4).movedim(0, -1)) + 3.14159) @ torch.linalg.inv(H._RGB_FROM_HED))
    ratio = (od / hed).mean((0, 1))
    assert ratio[0] < 1 < ratio[1] and ratio[2] < 1
    one = {k: torch.zeros_like(v[:1]) for k, v in params.items()}
    one["order"] = params["order"][:1]
    one["gamma"] = torch.tensor([0.3])
    torch.testing.assert_close(H.apply_transforms(img, one, 0), img ** 1.3)
    dot = torch.zeros(3, 28, 28)
    dot[:, 10, 10] = 1.0
    assert int((H._morph(dot, 1.0)[0] > 0).sum()) == 16           # a 4 x 4 dilation of one pixel
    assert H._morph(1 - dot, -1.0)[0].eq(0).sum() == 16


def test_histaug_applies_the_transforms_in_their_sampled_order():
    """`order[t]` is the position at which transform t is applied (the generator embeds it per transform):
    gamma at position 0 and brightness at 1 is brightness(gamma(img)), the other way round gamma(brightness(img))."""
    from torchvision.transforms.v2 import functional as TF

    from slidemil.augment import histaug as H

    img = torch.rand(3, 16, 16) * 0.8 + 0.1
    g, b = H.TRANSFORMS.index("gamma"), H.TRANSFORMS.index("brightness")
    for first, second in ((g, b), (b, g)):
        params = {name: torch.zeros(1) for name in H.TRANSFORMS}
        params["gamma"], params["brightness"] = torch.tensor([0.4]), torch.tensor([0.3])
        rest = [t for t in range(len(H.TRANSFORMS)) if t not in (first, second)]
        order = torch.empty(len(H.TRANSFORMS), dtype=torch.long)
        order[first], order[second] = 0, 1
        order[rest] = torch.arange(2, len(H.TRANSFORMS)).flip(0)   # the others (not applied) in reverse
        params["order"] = order[None]
        expected = (TF.adjust_brightness(img ** 1.4, 1.3) if first == g else TF.adjust_brightness(img, 1.3) ** 1.4)
        torch.testing.assert_close(H.apply_transforms(img, params, 0), expected.clamp(0, 1))
