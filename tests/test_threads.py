"""Background threads and signals: handlers run between waits, never inside threading's locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sparqcli.threads import signals_deferred, start_daemon, wait_until


class _Signalled(Exception):
    pass


@pytest.fixture
def raising_sigterm():
    def handler(signum: int, frame: object) -> None:
        raise _Signalled()

    previous = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_during_a_wait_is_handled_between_waits(raising_sigterm):
    finished = threading.Event()
    start_daemon(lambda: (time.sleep(0.5), finished.set()), "worker")
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    with pytest.raises(_Signalled):
        wait_until(finished.wait)
    assert time.monotonic() - started < 0.4  # handled within one short wait, not at the end
    wait_until(finished.wait)  # the event's lock is intact
    assert finished.is_set()


def test_signals_deferred_holds_a_signal_until_the_block_ends(raising_sigterm):
    with pytest.raises(_Signalled), signals_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        reached = True
    assert reached


def test_a_signal_during_the_torch_import_is_handled_after_it():
    # A fresh interpreter: SIGTERM lands while torch is being imported.
    code = textwrap.dedent(
        """
        import os, signal, sys, threading
        def handler(number, frame):
            print(hasattr(sys.modules.get("torch"), "Tensor"), flush=True)
            os._exit(7)
        signal.signal(signal.SIGTERM, handler)
        from sparqcli.threads import import_torch
        threading.Timer(0.15, os.kill, (os.getpid(), signal.SIGTERM)).start()
        import_torch()
        threading.Event().wait(30)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (7, "True\n"), done.stderr
