"""Matplotlib figures without pyplot: `Figure` objects render with the Agg canvas and are saved
atomically, so importing slidemil never changes the plotting backend of a notebook or application."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from slidemil.utils.io import atomic_path


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, dpi: float | None = None,
               squeeze: bool = True):
    """(figure, axes) as `pyplot.subplots` returns them, but owned by no global state."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig: Figure, path: str | os.PathLike, **kwargs) -> Path:
    """PNG at `path` (written under a temporary name, then renamed)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **kwargs)
    return Path(path)
