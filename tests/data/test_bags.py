"""The bag cache: bounded by bytes, float16 kept as float16, shared by datasets, the same bags from memory
and from disk."""

from __future__ import annotations

import numpy as np
import torch

from slidemil.data.bags import BagCache, BagDataset
from slidemil.features.store import write_features


def _bags(tmp_path, n=6, rows=100, dim=32, dtype="float16"):
    rng = np.random.default_rng(0)
    units = []
    for i in range(n):
        path = tmp_path / f"s{i}.h5"
        write_features(path, rng.normal(size=(rows, dim)).astype(np.float32), np.zeros((rows, 2), int),
                       {"encoder": "x"}, dtype=dtype)
        units.append((f"s{i}", [str(path)], i % 2))
    return units


def test_cache_stays_within_its_byte_budget_and_keeps_float16(tmp_path):
    units = _bags(tmp_path)
    one_bag = 100 * 32 * 2 + 100 * 2 * 8                      # float16 features + int64 coords
    cache = BagCache(budget=2.5 * one_bag)
    ds = BagDataset(units, cache=cache)
    first = [ds[i].x for i in range(len(ds))]
    assert len(cache.items) == 2 and cache.used == 2 * one_bag <= cache.budget
    assert all(x.dtype == torch.float16 for x, _ in cache.items.values())     # as stored ...
    assert all(x.dtype == torch.float32 for x in first)                         # ... float32 for the model
    again = [ds[i].x for i in range(len(ds))]                 # 2 from memory, 4 from disk: the same values
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_datasets_share_one_cache_by_feature_file(tmp_path):
    units = _bags(tmp_path, n=4, dtype="float32")
    cache = BagCache()
    train, test = BagDataset(units[:3], cache=cache), BagDataset(units[1:], cache=cache)
    [train[i] for i in range(3)]
    assert len(cache.items) == 3
    [test[i] for i in range(3)]                                # two of its bags were already read by train
    assert len(cache.items) == 4
    assert BagCache.of_size(0).budget == 0 and BagCache.of_size(None).budget > 0
