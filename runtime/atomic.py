"""Atomic file writes: a reader never sees a half-written output.

Kept apart from the CLI helpers so that library code (volume I/O, bundles, checkpoints)
does not import typer or rich.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it onto ``target`` on success.

    Nothing is left behind on failure. ``suffix`` defaults to the target's full suffix
    (``.nii.gz`` stays ``.nii.gz`` so writers that look at the extension behave). The
    file gets the permissions a plain ``open(target, "w")`` would (mkstemp makes 0600).
    """
    target = Path(target)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
