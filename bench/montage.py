"""The quality montage: one row per direction, columns source | output | truth | best baseline,
each as a mid axial and a mid sagittal plane (matplotlib, Agg, written atomically).

Planes come scaled by their volume's brain 99th percentile (:func:`galip.bench.quality._views`)
and are shown on one grey scale [0, 1], so a bright background or a flat output shows as such.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from galip.runtime.atomic import atomic_path
from galip.runtime.errors import ConfigError, OutputError

COLUMNS = ("source", "output", "truth")
PLANES = ("axial", "sagittal")


def write_montage(path: Path, views: dict[str, dict[str, list[np.ndarray]]], best: dict[str, str],
                  title: str = "") -> Path:
    """``views[direction][column] = [axial, sagittal]`` 2-D planes; ``best[direction]`` names
    the baseline shown in the last column. Rows in ``views``' order."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the montage needs matplotlib: pip install 'galip[bench]'") from None
    rows = list(views)
    n_cols = (len(COLUMNS) + 1) * len(PLANES)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, 1.8 * len(rows) + 0.6), squeeze=False)
    for r, direction in enumerate(rows):
        columns = [*COLUMNS, best[direction]]
        for c, column in enumerate(columns):
            for p, plane in enumerate(PLANES):
                ax = axes[r, c * len(PLANES) + p]
                # (i, j) planes of RAS voxels: transpose and flip so anterior/superior are up.
                ax.imshow(np.asarray(views[direction][column][p]).T, cmap="gray", vmin=0.0, vmax=1.0,
                          origin="lower", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if p == 0:
                    ax.set_title(column if c < len(COLUMNS) else f"best (PSNR): {column}", fontsize=7, loc="left")
            if c == 0:
                axes[r, 0].set_ylabel(direction.replace("->", "→"), fontsize=9)
    fig.suptitle(f"{title}  (axial | sagittal per column; grey 0 to brain 99th percentile)", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        plt.close(fig)
    return path
