"""Shared plumbing for the typer CLIs: one-line errors, exit code 2, atomic writes."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console

from .errors import GalipError

err_console = Console(stderr=True)


def fail(error: GalipError) -> "typer.Exit":
    """Print ``error`` as one line on stderr and return the exit to raise (code 2)."""
    err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    return typer.Exit(code=error.exit_code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ``GalipError`` raised inside the block into one line and exit code 2."""
    try:
        yield
    except GalipError as error:
        raise fail(error) from None


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it onto ``target`` on success.

    Nothing is left behind on failure, so a reader never sees a half-written file.
    ``suffix`` defaults to the target's full suffix (``.nii.gz`` stays ``.nii.gz`` so
    writers that look at the extension behave).
    """
    target = Path(target)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def is_interactive() -> bool:
    return sys.stderr.isatty()
