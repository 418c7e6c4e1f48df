"""Figures shared by the trackers (after every task) and the report: the accuracy-matrix heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def matrix_figure(matrix: Sequence[Sequence[float | None]], title: str) -> Any:
    """A heatmap of a per-task matrix in percent (rows: after task t, columns: task j; ``None`` blank), with
    the values written in the cells up to 12 tasks. The caller closes it (``matplotlib.pyplot.close``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    n = values.shape[1] if values.ndim == 2 else 0
    fig, ax = plt.subplots(figsize=(max(3.2, 1.2 + 0.45 * n), max(2.8, 1.0 + 0.4 * n)), dpi=100)
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
    if n <= 12:
        for (t, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, t, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    ax.set_xlabel("task j")
    ax.set_ylabel("after task t")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
