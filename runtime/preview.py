"""A PNG preview: source and translation, the middle slice along each axis (RAS+ display).

matplotlib is imported only when a preview is drawn, through the Agg canvas (no pyplot,
no GUI backend, no global state); the PNG is written atomically.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import ConfigError, OutputError
from .geometry import to_canonical
from .intensity import IntensityMap

VIEWS = ("sagittal", "coronal", "axial")   # middle slice along canonical axis 0, 1, 2


def require_matplotlib() -> None:
    """ConfigError with the install hint when matplotlib is missing (check before inference)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--preview needs matplotlib, which is not installed; "
                          "pip install matplotlib (or drop --preview)")


def middle_slices(data: np.ndarray, affine: np.ndarray,
                  centre: tuple[int, int, int] | None = None) -> list[tuple[np.ndarray, float]]:
    """The middle slice along each RAS+ axis (or the slices through voxel ``centre`` of
    ``data``), transposed for display (rows = the later axis, drawn bottom-up), with its
    pixel aspect (row spacing / column spacing)."""
    data_c, affine_c, ornt = to_canonical(np.asarray(data), affine)
    zooms = np.sqrt((affine_c[:3, :3] ** 2).sum(axis=0))
    at = [n // 2 for n in data_c.shape[:3]]
    if centre is not None:
        for axis, (c_axis, flip) in enumerate(ornt.astype(int)):
            n = data_c.shape[c_axis]
            at[c_axis] = n - 1 - centre[axis] if flip < 0 else centre[axis]
    views = []
    for axis in range(3):
        plane = np.take(data_c, at[axis], axis=axis).T   # (later axis, earlier axis)
        rows, cols = [a for a in range(3) if a != axis][::-1]
        views.append((plane, float(zooms[rows] / zooms[cols])))
    return views


def write_preview(path: str | os.PathLike, source: np.ndarray, output: np.ndarray, affine: np.ndarray, *,
                  source_map: IntensityMap, output_map: IntensityMap, labels: tuple[str, str] = ("source", "output"),
                  title: str = "", overwrite: bool = False, centre: tuple[int, int, int] | None = None) -> Path:
    """Write a 2 × 3 PNG: rows ``source`` and ``output`` (both (X, Y, Z) on ``affine``), columns
    sagittal, coronal, axial through the middle (or voxel ``centre``); grey levels span each
    row's intensity map (lo → black, hi → white).

    Raises OutputError for an existing file without ``overwrite`` or a failed write.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: expected a new preview file, found an existing one; "
                          "pass --overwrite or choose another path")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for row, (volume, imap, label) in enumerate(((source, source_map, labels[0]), (output, output_map, labels[1]))):
        for col, (plane, aspect) in enumerate(middle_slices(volume, affine, centre)):
            ax = axes[row, col]
            ax.imshow(plane, cmap="gray", vmin=imap.lo, vmax=imap.hi, origin="lower", aspect=aspect,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(VIEWS[col])
            if col == 0:
                ax.set_ylabel(label)
    if title:
        fig.suptitle(title)
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png")
    except OSError as exc:
        raise OutputError(f"{path}: could not write the preview ({exc.strerror or exc}); "
                          "check the folder's permissions and free space") from None
    return path
