"""R²T-MIL: regions, regional attention, EPEG, memory-bounded groups, and re-embedding in front of any model."""

from __future__ import annotations

import pytest
import torch

from conftest import bag_dataset, fit_config, planted_bags
from slidemil import models
from slidemil.models.build import build_model
from slidemil.train.trainer import fit, infer


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


def test_crmsa_is_the_papers_representatives_and_dispatch():
    """CR-MSA (Tang et al. 2024, Sec. 3.3; official CrossRegionAttntion), written out per region from phi: logits
    W = X phi [P, k]; representatives R = softmax_tokens(W)^T X; R' = self-attention across regions per
    representative index; token p gets sum_k minmax_tokens(W)_pk softmax_k(W)_pk R'_k."""
    from slidemil.models.rrt import CrossRegionMSA, region_grid, to_regions

    torch.manual_seed(0)
    layer = CrossRegionMSA(16, 4, 0.0, region_num=2, region_size=0, k=3, mlp=False).eval()
    x = torch.randn(60, 16)                                   # 8 x 8 grid (4 zero rows), four 4 x 4 regions
    side, r = region_grid(len(x), 2)
    regions = to_regions(x, side, r)                          # [4, 16, 16]
    with torch.no_grad():
        w = regions @ layer.phi.weight.T                      # [regions, P, k]
        reps = torch.stack([w[g].softmax(0).T @ regions[g] for g in range(4)])           # [regions, k, C]
        reps = layer.attn(reps.transpose(0, 1)).transpose(0, 1)
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        weight = (w - lo) / (hi - lo + 1e-8) * w.softmax(-1)  # [regions, P, k]
        expected = torch.einsum("gpk,gkc->gpc", weight, reps).reshape(2, 2, 4, 4, 16).permute(0, 2, 1, 3, 4)
        torch.testing.assert_close(layer(x), expected.reshape(64, 16)[:60])


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


@pytest.mark.slow
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
    fit(model, bag_dataset(planted_bags(80, seed=1)), None, fit_config(epochs=10, lr=5e-4), torch.device("cpu"),
        torch.Generator().manual_seed(0))
    test = planted_bags(40, seed=3)
    res = infer(model, bag_dataset(test), torch.device("cpu"))
    assert roc_auc_score([b[1] for b in test], res.probs[:, 1]) >= 0.9
    with pytest.raises(ValueError, match="unknown re-embedding"):
        build_model({"model": "abmil", "reembed": "nope"}, 32, 2)
