"""Ctrl-C in a training loop: finish the step, save, stop (exit 130); twice: stop at once."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[threading.Event]:
    """``with deferred_interrupt() as stop:`` — the first SIGINT sets ``stop`` for the loop
    to read between steps; a second one raises ``KeyboardInterrupt`` at once.

    The previous handler is back in place on exit. Outside the main thread (where Python
    delivers no signals) ``stop`` is never set.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        # None: the previous handler was not installed from Python; the default is the best guess
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
