"""Bags for training: a dataset over slides (or patients) and a padding collate with masks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from slidemil.data.cohort import Cohort
from slidemil.features.store import read_features

Target = int | float | tuple[float, ...]


@dataclass
class Bag:
    unit_id: str
    x: torch.Tensor  # [N, D]
    y: Target        # class index; or the task's target (survival: (time, event); regression: value)
    coords: torch.Tensor | None


def _target(row) -> Target:
    """One bag's target from the cohort's `target_cols` values: an int class index, a float, or a tuple."""
    if len(row) > 1:
        return tuple(float(v) for v in row)
    v = row[0]
    return int(v) if isinstance(v, (int, np.integer)) else float(v)


def bag_units(cohort: Cohort, bag_unit: str = "slide") -> list[tuple[str, list[str], Target]]:
    """(unit id, feature paths, target) per bag; `patient` concatenates a patient's slides."""
    table = cohort.table
    cols = list(cohort.target_cols)
    if bag_unit == "slide":
        return [(s, [p], _target(t)) for s, p, t in zip(table["slide_id"], table["feature_path"],
                                                        table[cols].itertuples(index=False, name=None))]
    if bag_unit != "patient":
        raise ValueError(f"bag_unit must be 'slide' or 'patient', not {bag_unit!r}")
    units = []
    for case, part in table.groupby("case_id", sort=False):
        targets = part[cols].drop_duplicates()
        if len(targets) > 1:
            raise ValueError(f"patient {case} has slides with different labels; --bag-unit patient needs one")
        units.append((str(case), list(part["feature_path"]), _target(tuple(targets.iloc[0]))))
    return units


def available_memory() -> int:
    """Bytes of memory the system can still give (physical pages available), 0 when unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class BagCache:
    """Bags kept in memory up to `budget` bytes, shared by the datasets of a run (keyed by feature files,
    so the train, validation and test parts and every fold reuse one read). Bags are kept as stored
    (float16 stays float16) in the order they are first read; once the budget is full, further bags
    are read from disk on every access. Under uniform random access a fixed set serves as many hits as
    any eviction policy, without churn; memory stays at the budget however large the cohort."""

    def __init__(self, budget: float = float("inf")):
        self.budget, self.used, self.items = budget, 0, {}

    @classmethod
    def of_size(cls, gigabytes: float | None) -> BagCache:
        """`gigabytes` of cache; None: half of the memory available now."""
        budget = gigabytes * 1e9 if gigabytes is not None else 0.5 * available_memory()
        return cls(budget)

    def get(self, key):
        return self.items.get(key)

    def put(self, key, value: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        size = sum(t.numel() * t.element_size() for t in value if t is not None)
        if key not in self.items and self.used + size <= self.budget:
            self.items[key], self.used = value, self.used + size


class BagDataset(Dataset):
    """Reads each bag from its feature file(s); keeps them in `cache` (a `BagCache`, or True for an
    unbounded one) when given.

    `max_instances` draws a random subset of a bag's instances on every access, and `instance_dropout` p
    keeps a random int(N (1 - p)) of them (at least one), as DSMIL's `dropout_patches` (training only: the
    caller never sets either for validation, test or prediction, so those always see the whole bag).
    `transform` maps each bag's features on access (the fold's standardisation); the cache keeps them raw.
    """

    def __init__(self, units, max_instances: int | None = None, cache: BagCache | bool = True, seed: int = 0,
                 transform=None, instance_dropout: float = 0.0):
        self.units = list(units)
        self.max_instances = max_instances
        self.instance_dropout = instance_dropout
        self.cache = BagCache() if cache is True else (cache or None)
        self.rng = np.random.default_rng(seed)
        self.transform = transform

    @classmethod
    def from_arrays(cls, bags, labels, max_instances: int | None = None, seed: int = 0) -> BagDataset:
        """An in-memory dataset of [N, D] arrays (synthetic tasks, tests): nothing is read from disk."""
        ds = cls([(f"bag{i}", [], _target(tuple(np.atleast_1d(y)))) for i, y in enumerate(labels)], max_instances,
                 cache=True, seed=seed)
        for i, b in enumerate(bags):
            ds.cache.put(ds._key(i), (torch.as_tensor(np.asarray(b, np.float32)), None))
        return ds

    def __len__(self) -> int:
        return len(self.units)

    def labels(self) -> np.ndarray:
        """The bags' targets: [n] class indices or values, [n, k] for tuple targets (survival)."""
        return np.array([u[2] for u in self.units])

    def raw_bags(self):
        """Every bag's whole feature matrix (float32), untransformed (to fit statistics on)."""
        return (self._load(i)[0].float() for i in range(len(self)))

    def _key(self, i: int):
        return tuple(self.units[i][1]) or ("array", id(self), i)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A bag as stored (float16 stays float16) with its coords, from the cache or the files."""
        if self.cache is not None and (hit := self.cache.get(self._key(i))) is not None:
            return hit
        bags = [read_features(p, keep_float16=True) for p in self.units[i][1]]
        x = torch.from_numpy(np.concatenate([b.features for b in bags]))
        coords = None
        if all(b.coords is not None for b in bags):
            coords = torch.from_numpy(np.concatenate([b.coords for b in bags]))
        if self.cache is not None:
            self.cache.put(self._key(i), (x, coords))
        return x, coords

    def __getitem__(self, i: int) -> Bag:
        x, coords = self._load(i)
        x = x.float()                                    # float16 in memory, float32 for the model
        n = len(x)
        if self.instance_dropout:
            n = max(1, int(n * (1 - self.instance_dropout)))
        if self.max_instances:
            n = min(n, self.max_instances)
        if n < len(x):
            keep = np.sort(self.rng.choice(len(x), n, replace=False))
            keep_t = torch.from_numpy(keep)
            x = x[keep_t]
            coords = coords[keep_t] if coords is not None else None
        if self.transform is not None:
            x = self.transform(x)
        return Bag(self.units[i][0], x, self.units[i][2], coords)


def collate_bags(bags: list[Bag]) -> dict:
    """Pad bags to the longest one; `mask` is True for real instances."""
    n = max(len(b.x) for b in bags)
    d = bags[0].x.shape[1]
    x = torch.zeros(len(bags), n, d, dtype=bags[0].x.dtype)
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    have_coords = all(b.coords is not None for b in bags)
    coords = torch.zeros(len(bags), n, 2, dtype=torch.long) if have_coords else None
    for i, b in enumerate(bags):
        x[i, : len(b.x)] = b.x
        mask[i, : len(b.x)] = True
        if have_coords:
            coords[i, : len(b.x)] = b.coords
    return {"ids": [b.unit_id for b in bags], "x": x, "mask": mask, "coords": coords,
            "y": _stack_targets([b.y for b in bags])}


def collate_list(bags: list[Bag]) -> dict:
    """The bags as a list of [n_i, D] tensors, unpadded (`xs`), for training on packs."""
    return {"ids": [b.unit_id for b in bags], "xs": [b.x for b in bags], "y": _stack_targets([b.y for b in bags])}


def _stack_targets(ys: list[Target]) -> torch.Tensor:
    """Class indices as int64 [B] (cross-entropy); anything else as float32 [B] or [B, k]."""
    y = torch.as_tensor(np.asarray(ys))
    return y.float() if y.is_floating_point() else y.long()
