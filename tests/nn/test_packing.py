"""Packed training (`--pack-len`, PackMIL's packing): a pack must behave exactly as its bags run one by one."""

from __future__ import annotations

import pytest
import torch

import slidemil.models as models
from slidemil.models.registry import MODELS
from slidemil.nn.segments import Segments, pack_bags, segment_softmax

PACKABLE = [n for n in MODELS.available() if MODELS.info(n).cls.packable]


def _bags(sizes=(5, 9, 3, 12, 7, 1), dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in sizes]


def test_pack_bags_groups_in_order_without_overflow_and_cuts_long_bags():
    bags = _bags((5, 9, 3, 12, 7, 1))
    p = pack_bags(bags, 16)
    ids = p.segments.ids()
    assert p.segments.n == 6 and p.segments.sizes == [5, 9, 3, 12, 7, 1]
    # sequential grouping: [5, 9] (14), then 3 + 12 (15), then 7 + 1 (8)
    assert p.pack_of == [0, 0, 1, 1, 2, 2] and p.packs.sizes == [14, 15, 8]
    for i, b in enumerate(bags):                                   # every instance in place
        torch.testing.assert_close(p.tokens[ids == i], b)
    long = pack_bags([torch.arange(40.0)[:, None]], 10, torch.Generator().manual_seed(0))
    assert long.segments.sizes == [10] and len(long.tokens[:, 0].unique()) == 10


def test_segment_softmax_is_each_bags_own_softmax():
    scores = torch.randn(9, 2)                                     # two heads, kept apart
    seg = Segments([2, 3, 4])
    a = segment_softmax(scores, seg)
    for lo, hi in ((0, 2), (2, 5), (5, 9)):
        torch.testing.assert_close(a[lo:hi], torch.softmax(scores[lo:hi], 0))


@pytest.mark.parametrize("n_outputs", [2, 3])
@pytest.mark.parametrize("name", PACKABLE)
def test_packed_forward_equals_each_bag_alone_in_values_and_gradients(name, n_outputs):
    assert {"abmil", "dsmil", "mean_pool", "max_pool", "instance_max"} <= set(PACKABLE)
    torch.manual_seed(0)
    model = models.create(name, in_dim=16, n_outputs=n_outputs).eval()   # eval: no dropout noise
    bags = _bags()
    target = torch.tensor([i % n_outputs for i in range(len(bags))])

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits, target)

    model.zero_grad()
    ref = torch.cat([model(b[None]).logits for b in bags])
    loss_of(ref).backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = pack_bags(bags, 16)
    out = model.forward_packed(packed.tokens, packed.segments)
    loss_of(out.logits).backward()
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    for k, g in ref_grads.items():
        torch.testing.assert_close(model.get_parameter(k).grad, g, atol=1e-5, rtol=1e-4, msg=f"gradient of {k}")
    # the instance scores of each bag, read out of the pack, are that bag's own
    for i, b in enumerate(bags):
        own = model(b[None]).instance_scores[0]
        torch.testing.assert_close(out.instance_scores[packed.segments.ids() == i], own, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", PACKABLE)
def test_neighbours_never_leak_across_segments(name):
    torch.manual_seed(1)
    model = models.create(name, in_dim=16, n_outputs=2).eval()
    bags = _bags((4, 6, 5))
    packed = pack_bags(bags, 16)                       # one pack of 15
    base = model.forward_packed(packed.tokens, packed.segments).logits
    x = packed.tokens.clone()
    x[packed.segments.ids() == 1] *= 50                # a neighbour changes: the other bags do not
    moved = model.forward_packed(x, packed.segments).logits
    torch.testing.assert_close(moved[[0, 2]], base[[0, 2]])
    assert not torch.allclose(moved[1], base[1])


@pytest.mark.parametrize("reembed", ["rrt", "ads"])
def test_reembedded_packs_equal_each_bag_alone(reembed):
    """R²T runs each bag of a pack alone (PackMIL's packed RRTMIL), ADS pools its attention per bag."""
    from slidemil.models.build import build_model

    torch.manual_seed(0)
    model = build_model({"model": "abmil", "reembed": reembed}, 16, 2).eval()
    bags = _bags()
    packed = pack_bags(bags, 16)
    ref = torch.cat([model(b[None]).logits for b in bags])
    torch.testing.assert_close(model.forward_packed(packed.tokens, packed.segments).logits, ref, atol=1e-5, rtol=1e-5)


def test_models_that_cannot_pack_are_refused_with_the_packable_list():
    from conftest import fit_config

    assert {"transmil", "rrt", "mambamil", "lbmamba"} <= set(PACKABLE)   # transformer and SSM models pack
    with pytest.raises(ValueError, match="clam_sb.*packable models: .*abmil"):
        fit_config(model="clam_sb", pack_len=256)
    with pytest.raises(ValueError, match="strategy 'mhim' reads whole bags"):
        fit_config(model="abmil", strategy="mhim", pack_len=256)
    assert fit_config(model="transmil", reembed="rrt", pack_len=256).reembed == "rrt"
    with pytest.raises(ValueError, match="packmil.*give --pack-len"):
        fit_config(model="abmil", strategy="packmil")
    with pytest.raises(ValueError, match="packmil.*needs --task classification"):
        fit_config(model="abmil", strategy="packmil", pack_len=256, task="regression", target_col="y")
    assert fit_config(model="abmil", pack_len=256, task="regression", target_col="y").pack_len == 256


@pytest.mark.parametrize("name", ["feature_noise", "feature_dropout", "instance_mixup"])
def test_feature_augmentations_pack_bag_by_bag(name):
    """A pack is augmented one bag at a time: under the same random draws, the packed training forward equals
    the bags' own training forwards (so the noise scale and the mixup partners are each bag's own)."""
    from conftest import fit_config
    from slidemil.train.strategies.base import apply_strategy

    torch.manual_seed(0)
    model = apply_strategy(models.create("abmil", 8, 2, dropout=0.0), name).train()
    bags = [torch.randn(n, 8) * (1 + i) for i, n in enumerate((5, 9, 3))]
    torch.manual_seed(1)
    packed = model.forward_bags(bags, pack_len=64).logits
    torch.manual_seed(1)
    alone = torch.cat([model(b[None]).logits for b in bags])
    torch.testing.assert_close(packed, alone)
    clean = torch.cat([model.model(b[None]).logits for b in bags])
    assert not torch.allclose(packed, clean)                           # the augmentation did act
    assert fit_config(model="transmil", strategy=name, pack_len=256).pack_len == 256
