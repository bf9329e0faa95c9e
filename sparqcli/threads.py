"""Background threads that Ctrl-C and SIGTERM cannot break.

sparq's handlers for SIGINT and SIGTERM raise in the main thread, wherever it is. Raised inside
`threading`'s own locks (starting a thread, waiting for an event), such an exception can leave
them half-released: runs then hung or printed a traceback. So the main thread starts threads and
waits for them with those signals blocked, in short waits; a signal that arrives meanwhile is
handled between two waits, in plain Python code. Started threads inherit the blocked signals, so
the kernel delivers them to the main thread only.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_POLL_SECONDS = 0.05


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Blocks SIGINT and SIGTERM in the main thread for the block; pending ones follow it."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_sigmask"
    ):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_daemon(target: Callable[[], object], name: str) -> threading.Thread:
    """Returns a started daemon thread running `target` (it never receives SIGINT/SIGTERM)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    with signals_deferred():
        thread.start()
    return thread


def wait_until(done: Callable[[float], bool]) -> None:
    """Calls `done(timeout)` (a bounded wait, True once finished) until it returns True."""
    while True:
        with signals_deferred():
            if done(_POLL_SECONDS):
                return
