"""Chunk workers: results in order, ordered turns, the first error in order, clean stops."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sparqcli.engine.workers import ChunkWorkers, Sequencer


@pytest.mark.parametrize("threads", [None, 1, 2, 4])
def test_results_come_in_order_whatever_finishes_first(threads):
    def task(index: int) -> int:
        time.sleep(0.002 * ((7 * index) % 5))
        return index * index

    with ChunkWorkers(threads) as workers:
        assert list(workers.map(task, 40)) == [i * i for i in range(40)]


@pytest.mark.parametrize("threads", [1, 3])
def test_turns_run_in_chunk_order(threads):
    order: list[int] = []
    sequencer = Sequencer()

    def task(index: int) -> None:
        time.sleep(0.001 * ((5 * index) % 3))
        if index % 4:  # some tasks skip their turn: it is passed for them
            with sequencer.turn(index):
                order.append(index)

    with ChunkWorkers(threads) as workers:
        list(workers.map(task, 50, (sequencer,)))
    assert order == [i for i in range(50) if i % 4]


def test_the_first_error_in_chunk_order_is_raised():
    def task(index: int) -> int:
        if index == 9:
            time.sleep(0.05)  # fails after 12 has failed
            raise ValueError("nine")
        if index == 12:
            raise KeyError("twelve")
        return index

    with ChunkWorkers(3) as workers:
        seen = []
        with pytest.raises(ValueError, match="nine"):
            for value in workers.map(task, 30, (Sequencer(),)):
                seen.append(value)
    assert seen == list(range(9))


def test_stopping_early_skips_the_tasks_not_started_and_does_not_hang():
    started: list[int] = []
    sequencer = Sequencer()

    def task(index: int) -> int:
        started.append(index)
        with sequencer.turn(index):
            return index

    with ChunkWorkers(2) as workers:
        for value in workers.map(task, 1000, (sequencer,)):
            if value == 3:
                break
        # the workers are free again: a new map runs
        assert list(workers.map(lambda index: index, 5)) == [0, 1, 2, 3, 4]
    assert len(started) < 20
    assert not [t for t in threading.enumerate() if t.name.startswith("sparq-chunks")]


def test_torch_computes_with_one_thread_per_worker_and_is_restored():
    before = torch.get_num_threads()
    with ChunkWorkers(2) as workers:
        inside = list(workers.map(lambda index: torch.get_num_threads(), 4))
    assert inside == [1, 1, 1, 1]
    assert torch.get_num_threads() == before
    with ChunkWorkers(None) as workers:  # None: torch's own threads, untouched
        assert list(workers.map(lambda index: torch.get_num_threads(), 2)) == [before] * 2
