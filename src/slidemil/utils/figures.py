"""Matplotlib figures without pyplot: `Figure` objects render with the Agg canvas and are saved
atomically, so importing slidemil never changes the plotting backend of a notebook or application."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.text import Text

from slidemil.utils.io import atomic_path


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, dpi: float | None = None,
               squeeze: bool = True):
    """(figure, axes) as `pyplot.subplots` returns them, but owned by no global state."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig: Figure, path: str | os.PathLike, **kwargs) -> Path:
    """PNG at `path` (written under a temporary name, then renamed). Every text is drawn literally: class
    names, slide ids and site names are user text, and matplotlib would read `$...$` in them as TeX (a
    class named `$\\frac$` crashed the report after training). Tick labels made while drawing take the same
    setting from a context that ends with the save."""
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    with matplotlib.rc_context({"text.parse_math": False}), atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **kwargs)
    return Path(path)
