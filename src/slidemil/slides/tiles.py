"""Tiles of a slide at given coordinates, as a torch Dataset (what feature extraction and HistAug read),
and `TileStream`, the batches of slide after slide from worker processes that live across slides.

Worker processes read tiles; each opens the slide once (lazily, after the fork) and keeps the handle
for all its tiles. Tiles are read at the best pyramid level for the patch footprint and resized
straight to the encoder's input size.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from slidemil.slides.reader import open_slide, read_at


class PatchDataset(Dataset):
    """uint8 [3, out_size, out_size] tiles of `size0` level-0 pixels at each (x, y) of `coords`, each passed
    through `transform` when given."""

    def __init__(self, slide_path: str | Path, coords: np.ndarray, size0: int, out_size: int,
                 backend: str = "auto", mpp: float | None = None, transform=None):
        self.slide_path, self.coords = str(slide_path), np.asarray(coords)
        self.size0, self.out_size, self.backend, self.mpp = int(size0), int(out_size), backend, mpp
        self.transform = transform      # HxWx3 uint8 -> HxWx3 uint8 (stain normalisation)
        self._slide = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:  # one handle per worker process, opened after the fork
            self._slide = open_slide(self.slide_path, self.backend, self.mpp)
        x, y = self.coords[i]
        return _tile(self._slide, int(x), int(y), self.size0, self.out_size, self.transform)

    def source(self) -> TileSource:
        return TileSource(self.slide_path, self.size0, self.out_size, self.backend, self.mpp, self.transform)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None  # slide handles do not cross process boundaries
        return state


def _tile(slide, x: int, y: int, size0: int, out_size: int, transform) -> torch.Tensor:
    tile = read_at(slide, x, y, size0, out_size)
    if transform is not None:
        tile = transform(tile)
    return torch.from_numpy(np.require(tile, np.uint8, ["C", "W"])).permute(2, 0, 1)


@dataclass(frozen=True)
class TileSource:
    """What a worker needs to read a slide's tiles (sent once per batch with its coordinates)."""

    path: str
    size0: int
    out_size: int
    backend: str
    mpp: float | None
    transform: object = None


class _TileReader(Dataset):
    """Reads (source, x, y) items; keeps the handle of the slide it read last (one per worker)."""

    def __init__(self):
        self._path, self._slide = None, None

    def __getitem__(self, item) -> torch.Tensor:
        src, x, y = item
        if src.path != self._path:
            self._path, self._slide = src.path, open_slide(src.path, src.backend, src.mpp)
        return _tile(self._slide, x, y, src.size0, src.out_size, src.transform)

    def __getstate__(self):
        return {"_path": None, "_slide": None}


class _Items(Sampler):
    """The current slide's (source, x, y) items; set in the main process before each pass."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class TileStream:
    """Batches of uint8 [B, 3, S, S] tiles of one slide after another from worker processes started once
    (persistent DataLoader workers): starting workers for every slide costs ~0.3 s each, more than
    a small slide's tiles. `batches(dataset)` yields a `PatchDataset`'s tiles in order. A slide that
    cannot be read raises in the main process; the next slide's pass resets the workers' queues."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False):
        self._items = _Items()
        self.loader = DataLoader(_TileReader(), batch_size=batch_size, sampler=self._items, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, pin_memory=pin_memory)

    def batches(self, dataset: PatchDataset):
        src = dataset.source()
        if self.loader.num_workers:      # an item that cannot be pickled would hang the worker queue silently
            try:
                pickle.dumps(src)
            except Exception as exc:
                raise TypeError(f"the tile transform {src.transform!r} cannot be sent to worker processes "
                                f"({exc}); use a picklable (module-level) transform or --num-workers 0") from None
        self._items.items = [(src, int(x), int(y)) for x, y in dataset.coords]
        return iter(self.loader)
