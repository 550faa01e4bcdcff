"""SIGTERM and SIGHUP end a run the way Ctrl-C does: cleanly, with exit code 128 + n.

Python turns only SIGINT into an exception (KeyboardInterrupt); SIGTERM (``kill``, job
schedulers, ``docker stop``) and SIGHUP (a closed terminal) would kill the process on the
spot and leave a half-written temporary file. :func:`stop_on_signals` raises
:class:`Interrupted` for them instead, so every ``finally`` and
:func:`galip.runtime.atomic.atomic_path` cleans up, then prints one line and exits with
128 + the signal number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP), as shells do.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """A termination signal arrived; like KeyboardInterrupt, not caught by ``except Exception``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_critical = {"depth": 0, "pending": None}


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A signal arriving within the block is raised when the block ends, not inside it.

    For a few lines that must not be cut in two, such as creating a temporary file and
    recording its name (:func:`galip.runtime.atomic.atomic_path`): raised in between, the
    file would exist with nobody left to remove it. (Blocking the signal with
    ``pthread_sigmask`` is not enough: onnxruntime's threads would still receive it.)
    Only the main thread defers: handlers run there, and a signal held back for another
    thread would be raised in that thread (a batch's writer), killing it while the main
    thread waits on it forever.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _critical["depth"] += 1
    try:
        yield
    finally:
        _critical["depth"] -= 1
        pending = _critical["pending"]
        if _critical["depth"] == 0 and pending is not None:
            _critical["pending"] = None
            raise Interrupted(pending)


def _raise(signum: int, frame) -> None:
    # Later signals must not cut the clean-up short: ignore them from now on (SIGKILL still works).
    for number in HANDLED:
        signal.signal(number, signal.SIG_IGN)
    if _critical["depth"]:
        _critical["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP/SIGINT unwind the stack; then one line, exit 128 + n.

    Ctrl-C is handled by the same handler (not KeyboardInterrupt), so that :func:`critical`
    holds it back too. Outside the main thread (where handlers cannot be installed) it only
    converts.
    """
    installed = {}
    if threading.current_thread() is threading.main_thread():
        installed = {number: signal.signal(number, _raise) for number in HANDLED}
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as stop:
        number = stop.signum if isinstance(stop, Interrupted) else int(signal.SIGINT)
        sys.stderr.write(f"interrupted by {signal.Signals(number).name}: stopped before the end, "
                         "no partial file left\n")
        raise SystemExit(128 + number) from None
    finally:
        for number, previous in installed.items():
            if previous is not None:   # None: installed outside Python, cannot be restored
                signal.signal(number, previous)
