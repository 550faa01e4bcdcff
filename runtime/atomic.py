"""Atomic file writes: a reader never sees a half-written output, and nothing is clobbered.

Kept apart from the CLI helpers so that library code (volume I/O, bundles, checkpoints)
does not import typer or rich.

Temporary files are named ``.<target name>.galip-tmp-<random><suffix>`` and hold an
exclusive ``flock`` for as long as their writer lives. The kernel drops that lock when
the process dies, even by SIGKILL, so an unlocked temporary file is recognisably stale:
:func:`clean_stale` (run by every :func:`atomic_path` and folder probe) removes it.
Without ``overwrite`` the final name is created by ``link`` then ``unlink``; ``link``
fails if the name exists, so a file that appeared while we were writing (another run,
another tool) is never replaced.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import OutputError
from .signals import critical

TEMP_TAG = ".galip-tmp-"
#: An unlocked temporary file younger than this may be one whose writer has not taken its
#: lock yet (the microseconds between mkstemp and flock): leave it alone.
STALE_AFTER_S = 2.0
#: link() errors meaning "this file system has no hard links" (FAT, some network/FUSE mounts).
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}

try:
    import fcntl
except ImportError:   # Windows: no flock; stale files are then never recognised as stale
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _lock(fd: int) -> bool:
    """Take an exclusive non-blocking lock on ``fd``; False when another process holds one."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove galip temporary files in ``folder`` left by dead writers; return them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and TEMP_TAG in entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or \
                    time.time() - entry.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            if _lock(fd):   # nobody holds it: its writer is gone
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _temp(target: Path, suffix: str) -> tuple[int, Path]:
    """A new, locked temporary file beside ``target``: ``(open descriptor, path)``."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name[:100]}{TEMP_TAG}", suffix=suffix, dir=target.parent)
    _lock(fd)
    return fd, Path(name)


def probe_writable(folder: Path, name: str) -> None:
    """Create and remove a temporary file in ``folder`` (cleaning stale ones); OSError if it cannot."""
    clean_stale(folder)
    with critical():
        fd, probe = _temp(folder / name, ".probe")
        os.close(fd)
        probe.unlink()


def check_name(path: Path, suffixes: tuple[str, ...], what: str) -> None:
    """OutputError unless ``path``'s name ends in one of ``suffixes`` and has a stem before it."""
    name = path.name.lower()
    if not name.endswith(suffixes):
        raise OutputError(f"{path}: expected a name ending in {' or '.join(suffixes)} for the {what}, "
                          f"found {path.name!r}; rename it")
    if name in suffixes:
        raise OutputError(f"{path}: expected the {what} file name to have a stem before {path.name}, found only "
                          f"the extension (a hidden file); give it a name such as out{path.name}")


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` onto ``target``; without ``overwrite`` never replace a file."""
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputError(f"{target}: expected a new file, found one that appeared while this run was writing "
                          "(another run?); it was left untouched; pass --overwrite or choose another path") from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if target.exists():   # no hard links here: check, then rename (a narrow race remains)
            raise OutputError(f"{target}: expected a new file, found one that appeared while this run was "
                              "writing; it was left untouched; pass --overwrite or choose another path") from None
        os.rename(tmp, target)
        return
    tmp.unlink()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; move it onto ``target`` on success.

    Nothing is left behind on failure or on an exception such as KeyboardInterrupt (and
    what a SIGKILL leaves is removed by the next writer in that folder). ``suffix`` defaults
    to the target's full suffix (``.nii.gz`` stays ``.nii.gz`` so writers that look at the
    extension behave). The file gets the permissions a plain ``open(target, "w")`` would
    (mkstemp makes 0600). ``overwrite=False`` raises OutputError instead of replacing a
    file that exists at the end, even one created while we were writing.
    """
    target = Path(target)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    clean_stale(target.parent)
    fd, tmp = -1, None
    try:
        with critical():   # a signal is delivered once fd and tmp are set, inside this try
            fd, tmp = _temp(target, suffix)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _publish(tmp, target, overwrite)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    finally:
        if fd >= 0:
            os.close(fd)
