"""Tiles of a slide at given coordinates, as a torch Dataset (what feature extraction and HistAug read).

Worker processes read tiles; each opens the slide once (lazily, after the fork) and keeps the handle
for all its tiles. Tiles are read at the best pyramid level for the patch footprint and resized
straight to the encoder's input size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

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
        tile = read_at(self._slide, int(x), int(y), self.size0, self.out_size)
        if self.transform is not None:
            tile = self.transform(tile)
        return torch.from_numpy(np.require(tile, np.uint8, ["C", "W"])).permute(2, 0, 1)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None  # slide handles do not cross process boundaries
        return state
