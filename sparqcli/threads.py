"""Background threads that Ctrl-C and SIGTERM cannot break.

sparq's handlers for SIGINT and SIGTERM raise in the main thread, wherever it is. Raised inside
`threading`'s own locks (starting a thread, waiting for an event), such an exception can leave
them half-released: runs then hung or printed a traceback. So the main thread starts threads and
waits for them in short waits during which those signals are only recorded; a recorded signal is
raised again right after, in plain Python code, and its handler runs there.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_POLL_SECONDS = 0.05


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds SIGINT and SIGTERM for the block (main thread); they are raised again after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        number: signal.signal(number, lambda n, _: pending.append(n)) for number in _SIGNALS
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(pending):
            signal.raise_signal(number)


def start_daemon(target: Callable[[], object], name: str) -> threading.Thread:
    """Returns a started daemon thread running `target`."""
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


def import_torch() -> None:
    """Imports torch with SIGINT and SIGTERM held until the import is done.

    torch's import runs Python code called from C++: a handler raising in there is lost, or
    aborts the process (`terminate called after throwing pybind11::error_already_set`).
    """
    if "torch" not in sys.modules:
        with signals_deferred():
            import torch  # noqa: F401
