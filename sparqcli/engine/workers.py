"""Parallelism over row chunks: a few worker threads, each computing whole chunks.

Why not torch's own threads: with them every elementwise op of a chunk is one short OpenMP
parallel region, thousands per table, whose threads spin-wait at each barrier for the others.
When another process takes a CPU, a spinning thread waits for one the OS is not running: two
sparq jobs on 2 CPUs took 16x longer each (issue #11). Here torch runs one thread per worker
(`torch.set_num_threads(1)` while a table is compressed) and the workers take whole chunks:
they never wait for each other except at two short ordered steps per chunk, and then they
block instead of spinning. torch ops release the GIL, so the workers compute at once.

What depends on the order of the chunks (which tied blocks are pruned, where a chunk's codes
go) runs in `Sequencer.turn(index)`, one chunk after the other in chunk order; everything else
writes disjoint rows of preallocated results. So the results are the same bytes for any number
of workers and any timing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import torch

R = TypeVar("R")


class _Cancelled(Exception):
    """A task skipped because the map it belongs to stopped early."""


class Sequencer:
    """Lets one chunk after the other, in chunk order, through a section (`turn`)."""

    def __init__(self) -> None:
        self._next = 0
        self._changed = threading.Condition()
        self._cancelled = False

    @contextlib.contextmanager
    def turn(self, index: int) -> Iterator[None]:
        """Runs the block once every chunk before `index` has had its turn.

        Raises _Cancelled when the map stops while it waits.
        """
        self._wait_for(index)
        try:
            yield
        finally:
            self._advance(index)

    def pass_turn(self, index: int) -> None:
        """Gives up the turn of chunk `index` (after it came) unless it was taken already."""
        with contextlib.suppress(_Cancelled):
            self._wait_for(index)
            self._advance(index)

    def cancel(self) -> None:
        """Makes every waiting and later `turn` raise _Cancelled."""
        with self._changed:
            self._cancelled = True
            self._changed.notify_all()

    def _wait_for(self, index: int) -> None:
        with self._changed:
            while self._next < index:
                if self._cancelled:
                    raise _Cancelled()
                self._changed.wait()

    def _advance(self, index: int) -> None:
        with self._changed:
            if self._next == index:
                self._next = index + 1
                self._changed.notify_all()


class _Slot(Generic[R]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: R | None = None
        self.error: BaseException | None = None


class ChunkWorkers:
    """Runs chunk tasks on `threads` worker threads (in the calling thread when 1).

    Use as a context manager: on exit the threads stop and torch's thread count is restored.
    While it is open, torch computes with one thread per worker (the process-wide setting:
    do not run other torch work in other threads meanwhile). With `threads=None` nothing
    changes: tasks run in the calling thread with torch's own threads.
    """

    def __init__(self, threads: int | None) -> None:
        self.threads = 1 if threads is None else max(1, threads)
        self._set_torch_threads = threads is not None
        self._torch_threads_before = 0
        self._tasks: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> ChunkWorkers:
        if self._set_torch_threads:
            self._torch_threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        for _ in self._workers:
            self._tasks.put(None)
        for worker in self._workers:
            worker.join()
        self._workers.clear()
        if self._set_torch_threads:
            torch.set_num_threads(self._torch_threads_before)

    def map(
        self, task: Callable[[int], R], count: int, sequencers: Sequence[Sequencer] = ()
    ) -> Iterator[R]:
        """Yields `task(index)` for index 0..count-1, in index order.

        Tasks run at most two per worker ahead of the consumer, so memory stays bounded by a
        few chunks. Every task passes its turn of each of `sequencers`, also when it fails.
        An exception raised by `task(i)` is raised here when result `i` is reached (after the
        results before it), so the first error in chunk order is the one raised.
        """
        if self.threads == 1 or count <= 1:
            for index in range(count):
                try:
                    yield task(index)
                finally:
                    for sequencer in sequencers:
                        sequencer.pass_turn(index)
            return
        self._start()
        cancelled = threading.Event()
        pending: deque[_Slot[R]] = deque()
        submitted = 0
        try:
            for index in range(count):
                while submitted < count and submitted <= index + 2 * self.threads:
                    slot: _Slot[R] = _Slot()
                    pending.append(slot)
                    self._tasks.put((task, submitted, slot, sequencers, cancelled))
                    submitted += 1
                slot = pending.popleft()
                slot.done.wait()
                if slot.error is not None:
                    raise slot.error
                yield slot.value  # type: ignore[misc]
        finally:
            if pending:  # stopped early: skip the tasks not started, wait for the running ones
                cancelled.set()
                for sequencer in sequencers:
                    sequencer.cancel()
                for slot in pending:
                    slot.done.wait()

    def _start(self) -> None:
        while len(self._workers) < self.threads:
            name = f"sparq-chunks-{len(self._workers)}"
            worker = threading.Thread(target=self._work, name=name, daemon=True)
            worker.start()
            self._workers.append(worker)

    def _work(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            task, index, slot, sequencers, cancelled = item
            try:
                if cancelled.is_set():
                    raise _Cancelled()
                slot.value = task(index)
            except BaseException as error:
                slot.error = error
            finally:
                for sequencer in sequencers:
                    sequencer.pass_turn(index)
                slot.done.set()
