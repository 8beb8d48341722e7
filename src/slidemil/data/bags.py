"""Bags for training: a dataset over slides (or patients) and a padding collate with masks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from slidemil.data.cohort import Cohort
from slidemil.errors import InputError
from slidemil.features.store import read_features
from slidemil.utils.memory import release_free_heap

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


GPU_CACHE_FRACTION = 0.6   # share of the GPU's free memory bags may take (the rest: activations, optimizer)


def free_gpu_memory(device: torch.device) -> int:
    """Bytes free on `device` now (0 when it is not a CUDA device)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


TRIM_BYTES = 8 * 2**20     # a bag at least this large (float32, in host memory) is followed by a heap trim


class BagCache:
    """Bags kept in memory up to `budget` bytes, shared by the datasets of a run (keyed by feature files,
    so the train, validation and test parts and every fold reuse one read). Bags are kept as stored
    (float16 stays float16) in the order they are first read; once the budget is full, further bags
    go to the `spill` cache if there is one, else are read from disk on every access. Under uniform random
    access a fixed set serves as many hits as any eviction policy, without churn; memory stays at the
    budget however large the cohort. In host memory the budget also covers the float32 copy of the bag in
    use (`reserve`: the largest bag seen, as float32), so that it bounds the bags the process holds, not only
    the cached ones.

    `device`: where the features live. A CUDA device keeps them on the GPU (no copy per step); `pin` keeps
    host-memory features in page-locked memory, so that their copy to a GPU runs asynchronously. Coordinates
    always stay in host memory (they only go to files)."""

    def __init__(self, budget: float = float("inf"), device: torch.device | None = None, pin: bool = False,
                 spill: BagCache | None = None):
        self.budget, self.used, self.items, self.reserve = budget, 0, {}, 0
        self.device, self.pin, self.spill = device, pin, spill

    @classmethod
    def of_size(cls, gigabytes: float | None) -> BagCache:
        """`gigabytes` of cache; None: half of the memory available now."""
        budget = gigabytes * 1e9 if gigabytes is not None else 0.5 * available_memory()
        return cls(budget)

    @classmethod
    def for_run(cls, gigabytes: float | None, device: torch.device, where: str = "auto") -> BagCache:
        """The cache of a training run on `device`. `where` (--cache-device): `cuda` keeps bags on the GPU up
        to GPU_CACHE_FRACTION of its free memory (also capped by `gigabytes` when given), then spills to
        pinned host memory; `cpu` keeps them in host memory (pinned when training on a GPU); `auto` is `cuda`
        when training on a GPU, else `cpu`. `gigabytes` 0 turns caching off."""
        if where == "cuda" and device.type != "cuda":
            raise InputError(f"--cache-device cuda needs training on a GPU; the run trains on {device} "
                             f"(use --cache-device cpu or auto)")
        host = cls.of_size(gigabytes)
        if gigabytes == 0:
            return host
        on_gpu = device.type == "cuda" and where in ("auto", "cuda")
        host.pin = device.type == "cuda"
        if not on_gpu:
            return host
        budget = GPU_CACHE_FRACTION * free_gpu_memory(device)
        if gigabytes is not None:
            budget = min(budget, gigabytes * 1e9)
        return cls(budget, device=device, spill=host)

    def get(self, key):
        hit = self.items.get(key)
        if hit is None and self.spill is not None:
            return self.spill.get(key)
        return hit

    def put(self, key, value: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep `value` if it fits (else offer it to the spill cache); returns the bag as kept."""
        x, coords = value
        size = sum(t.numel() * t.element_size() for t in value if t is not None)
        if key in self.items:
            return self.items[key]
        if self.device is None and not self.pin:   # a CPU run's float32 copy of the bag in use is in host memory
            self.reserve = max(self.reserve, x.numel() * 4)     # too (a GPU run's is on the GPU): keep room for it
        if self.used + size + self.reserve > self.budget:
            return self.spill.put(key, value) if self.spill is not None else value
        if self.device is not None:
            x = x.to(self.device)
        elif self.pin and not x.is_pinned():
            x = x.pin_memory()
        self.items[key], self.used = (x, coords), self.used + size
        return x, coords


class BagDataset(Dataset):
    """Reads each bag from its feature file(s); keeps them in `cache` (a `BagCache`, or True for an
    unbounded one) when given.

    `max_instances` draws a random subset of a bag's instances on every access, and `instance_dropout` p
    keeps a random int(N (1 - p)) of them (at least one), as DSMIL's `dropout_patches` (training only: the
    caller never sets either for validation, test or prediction, so those always see the whole bag).
    `transform` maps each bag's features on access (the fold's standardisation); the cache keeps them raw.
    `device`: where bags are handed out. A bag in host memory goes there as stored (float16 stays float16:
    half the bytes over the bus) on a side stream, so that its copy overlaps the GPU's work on the bag
    before; it is converted and transformed on the device.
    """

    def __init__(self, units, max_instances: int | None = None, cache: BagCache | bool = True, seed: int = 0,
                 transform=None, instance_dropout: float = 0.0, device: torch.device | None = None):
        self.units = list(units)
        self.device = device if device is not None and device.type == "cuda" else None
        self._copy_stream = None
        self._trim = False          # the last bag was large and in host memory: give its pages back first
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
        """Every bag's whole feature matrix as stored (float16 stays float16), untransformed (to fit statistics
        on: reduce with a float64 accumulator, not a float64 copy of a 40k-instance bag)."""
        return (self._load(i)[0] for i in range(len(self)))

    def lengths(self) -> list[int]:
        """Every bag's instance count as stored (before `max_instances` or instance dropout)."""
        return [len(x) for x in self.raw_bags()]

    def _key(self, i: int):
        return tuple(self.units[i][1]) or ("array", id(self), i)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A bag as stored (float16 stays float16) with its coords, from the cache or the files."""
        if self.cache is not None and (hit := self.cache.get(self._key(i))) is not None:
            return hit
        try:
            bags = [read_features(p, keep_float16=True) for p in self.units[i][1]]
        except Exception as exc:   # every file was checked before the run: it changed or vanished since
            why = str(exc).split(": ", 1)[-1] if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            raise InputError(f"feature file(s) of {self.units[i][0]} ({', '.join(self.units[i][1])}) could not be read "
                             f"during the run ({why}): changed or removed since it started? Restore them and "
                             f"finish the run with --resume") from exc
        # one file (a slide bag) is taken as read; only a patient's several slides are concatenated
        join = (lambda arrays: arrays[0]) if len(bags) == 1 else np.concatenate
        x = torch.from_numpy(join([b.features for b in bags]))
        coords = None
        if all(b.coords is not None for b in bags):
            coords = torch.from_numpy(join([b.coords for b in bags]))
        if self.cache is not None:
            x, coords = self.cache.put(self._key(i), (x, coords))
        return x, coords

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on the dataset's GPU: copied on a side stream the compute stream then waits for (the host runs
        ahead of the GPU, so the copy of the next bag overlaps the current step). Not in DataLoader workers:
        they hand host tensors to the main process, which moves them."""
        if self.device is None or x.device == self.device or get_worker_info() is not None:
            return x
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            moved = x.to(self.device, non_blocking=x.is_pinned())
        compute.wait_stream(self._copy_stream)
        moved.record_stream(compute)
        return moved

    def __getitem__(self, i: int) -> Bag:
        # the step before freed its bag and activations (hundreds of MB for a 40k-instance bag): glibc keeps
        # such memory resident unless told. Only after a large bag in host memory: a trim walks the whole
        # heap (0.7 ms on 2 cores, 10% of a 200-instance CV; more in a GPU process) and small bags leave
        # little to give back
        if self._trim:
            release_free_heap()
        x, coords = self._load(i)
        x = self._to_device(x).float()                   # float16 in memory, float32 for the model
        self._trim = x.device.type == "cpu" and x.numel() * 4 >= TRIM_BYTES
        n = len(x)
        if self.instance_dropout:
            n = max(1, int(n * (1 - self.instance_dropout)))
        if self.max_instances:
            n = min(n, self.max_instances)
        if n < len(x):
            keep = np.sort(self.rng.choice(len(x), n, replace=False))
            keep_t = torch.from_numpy(keep)
            x = x[keep_t.to(x.device)]
            coords = coords[keep_t] if coords is not None else None
        if self.transform is not None:
            x = self.transform(x)
        return Bag(self.units[i][0], x, self.units[i][2], coords)


def collate_bags(bags: list[Bag]) -> dict:
    """Pad bags to the longest one; `mask` is True for real instances. A single bag is not copied (a view
    with a batch axis: one bag of 40k x 1024 instances is 164 MB of float32)."""
    if len(bags) == 1:
        b = bags[0]
        return {"ids": [b.unit_id], "x": b.x[None], "mask": torch.ones(1, len(b.x), dtype=torch.bool, device=b.x.device),
                "coords": b.coords[None] if b.coords is not None else None, "y": _stack_targets([b.y])}
    n = max(len(b.x) for b in bags)
    d = bags[0].x.shape[1]
    device = bags[0].x.device          # bags kept on a GPU are padded there
    x = torch.zeros(len(bags), n, d, dtype=bags[0].x.dtype, device=device)
    mask = torch.zeros(len(bags), n, dtype=torch.bool, device=device)
    have_coords = all(b.coords is not None for b in bags)
    coords = torch.zeros(len(bags), n, 2, dtype=torch.long) if have_coords else None
    for i, b in enumerate(bags):
        x[i, : len(b.x)] = b.x.to(device)
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
