"""Shared plumbing for the typer CLIs: one-line errors and exit code 2."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer
from rich.console import Console

from .atomic import atomic_path  # noqa: F401  (re-exported for CLI modules)
from .errors import GalipError

err_console = Console(stderr=True)


def fail(error: GalipError) -> "typer.Exit":
    """Print ``error`` as one line on stderr and return the exit to raise (code 2)."""
    err_console.print("[bold red]error:[/] ", end="")
    # The message is plain text: markup off, so "[data]" in "pip install 'galip[data]'" survives.
    err_console.print(str(error), markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code=error.exit_code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ``GalipError`` raised inside the block into one line and exit code 2."""
    try:
        yield
    except GalipError as error:
        raise fail(error) from None


def is_interactive() -> bool:
    return sys.stderr.isatty()
