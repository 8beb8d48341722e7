"""The bag cache: bounded by bytes, float16 kept as float16, shared by datasets, the same bags from memory
and from disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidemil.data.bags import BagCache, BagDataset
from slidemil.errors import InputError
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
    in_use = 100 * 32 * 4                                      # the float32 copy of the bag in use
    cache = BagCache(budget=2.5 * one_bag + in_use)
    ds = BagDataset(units, cache=cache)
    first = [ds[i].x for i in range(len(ds))]
    assert len(cache.items) == 2 and cache.used == 2 * one_bag and cache.used + cache.reserve <= cache.budget
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


def test_instance_dropout_keeps_a_fresh_random_share_of_each_bag():
    """DSMIL's dropout_patches: int(N (1 - p)) distinct rows of the bag, drawn anew at every access; with
    --max-instances as well, the smaller of the two."""
    bag = np.arange(100, dtype=np.float32)[:, None].repeat(4, 1)
    ds = BagDataset.from_arrays([bag], [1])
    ds.instance_dropout = 0.6
    first, second = ds[0].x, ds[0].x
    assert len(first) == len(second) == 40
    assert len(set(first[:, 0].tolist())) == 40                 # distinct rows of the bag, in bag order
    assert torch.equal(first[:, 0], first[:, 0].sort().values)
    assert not torch.equal(first, second)                      # a new draw at every access
    ds.max_instances = 25
    assert len(ds[0].x) == 25
    assert ds.lengths() == [100]                               # the bag as stored, not as handed out
    ds.instance_dropout, ds.max_instances = 0.0, None
    assert torch.equal(ds[0].x, torch.from_numpy(bag))         # off: the whole bag


def test_a_full_cache_spills_to_the_next_tier_and_serves_from_both(tmp_path):
    """--cache-device cuda keeps bags on the GPU up to its budget and the rest in (pinned) host memory: two
    tiers with one interface; here both tiers are host memory, so the test runs without a GPU."""
    units = _bags(tmp_path, n=5)
    one_bag = 100 * 32 * 2 + 100 * 2 * 8
    host = BagCache()
    first = BagCache(budget=2.5 * one_bag + 100 * 32 * 4, spill=host)
    ds = BagDataset(units, cache=first)
    values = [ds[i].x for i in range(5)]
    assert len(first.items) == 2 and len(host.items) == 3     # the first two in the first tier, the rest spilled
    for i in range(5):                                          # every bag served from memory, unchanged
        assert first.get(ds._key(i)) is not None
        assert torch.equal(ds[i].x, values[i])


def test_run_cache_on_a_cpu_run(tmp_path):
    """On a CPU run `auto` and `cpu` keep bags in (unpinned) host memory, `--cache-gb 0` keeps none, and
    `--cache-device cuda` is refused with the flags that work."""
    cpu = torch.device("cpu")
    for where in ("auto", "cpu"):
        cache = BagCache.for_run(2.0, cpu, where)
        assert cache.device is None and not cache.pin and cache.spill is None and cache.budget == 2e9
    assert BagCache.for_run(0, cpu).budget == 0
    with pytest.raises(InputError, match="--cache-device cpu or auto"):
        BagCache.for_run(None, cpu, "cuda")


@pytest.mark.parametrize(("subsample", "n"), [({}, 70), ({"max_instances": 25}, 25), ({"instance_dropout": 0.5}, 35)])
def test_each_instance_keeps_its_own_coordinates(tmp_path, subsample, n):
    """Heatmaps, spatial models and the attention files place instance k at coords[k]: a patient's bag joins its
    slides' rows and coordinates in the same order, and a subsampled bag keeps the coordinates of the rows it
    keeps. Here every feature row holds its own (x, y), so any misalignment shows."""
    rng = np.random.default_rng(0)
    paths = []
    for s, rows in enumerate((40, 30)):
        coords = np.stack([rng.integers(0, 10_000, rows), np.full(rows, s * 100_000)], 1)
        path = tmp_path / f"p0_s{s}.h5"
        write_features(path, coords.astype(np.float32), coords, {"encoder": "x"}, dtype="float32")
        paths.append(str(path))
    ds = BagDataset([("p0", paths, 1)], **subsample)
    for _ in range(3):                                         # a fresh draw at every access
        bag = ds[0]
        assert len(bag.x) == n
        torch.testing.assert_close(bag.x, bag.coords.float())
