"""Pictures of a heatmap: the score field over the slide thumbnail, and the top and bottom tiles."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from slidemil.slides.reader import Slide, read_at
from slidemil.slides.tissue import TissueMask
from slidemil.utils.figures import new_figure


def heatmap_figure(tissue: TissueMask, field: np.ndarray, shown: np.ndarray, title: str, colorbar_label: str,
                   cmap: str = "jet", alpha: float = 0.5, note: str | None = None) -> Figure:
    """Scores in [0, 1] over the thumbnail, on tissue only, with a colour bar saying what the scale is and,
    for models whose scores are not spatial evidence, a note under the image."""
    h, w = shown.shape
    fig, ax = new_figure((10, 10 * h / w + 0.8), dpi=max(72, min(200, int(w / 10))))
    ax.imshow(tissue.thumbnail)
    overlay = np.where(shown, field, np.nan)
    im = ax.imshow(overlay, cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    cb.set_label(colorbar_label, fontsize=8, wrap=True)
    if note:
        ax.text(0.0, -0.01, f"Note: {note}.", transform=ax.transAxes, va="top", fontsize=8, wrap=True)
    return fig


def top_tiles_figure(slide: Slide, coords: np.ndarray, scores: np.ndarray, size0: int, size: int, k: int,
                     title: str) -> Figure:
    """The k highest- and k lowest-scoring tiles at the run's resolution, each titled with its score."""
    k = min(k, len(coords) // 2 or 1)
    order = np.argsort(-scores)
    picks = [("top", i) for i in order[:k]] + [("bottom", i) for i in order[::-1][:k]]
    fig, axes = new_figure((2 * k, 4.6), 2, k, squeeze=False)
    for j, (row, i) in enumerate(picks):
        ax = axes[0 if row == "top" else 1, j % k]
        ax.imshow(read_at(slide, int(coords[i, 0]), int(coords[i, 1]), size0, size))
        ax.set_title(f"{scores[i]:.2f}", fontsize=8)
        ax.set_axis_off()
    axes[0, 0].text(-0.1, 0.5, "highest", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "lowest", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(title, fontsize=10)
    return fig
