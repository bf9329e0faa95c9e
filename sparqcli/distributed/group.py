"""The process group a distributed run talks through: the engine's reducer, and agreement on
failure.

Every collective the run makes goes through `ProcessGroup`, and each one starts with a status
exchange (an `all_reduce` of one integer): a rank that fails enters the status exchange of the
collective the others are waiting in, with its error, so the others learn of the failure there
instead of waiting for data that will never come; they then all raise the failing rank's error
(`RankFailedError`, with its message and exit code). A rank that dies outright is noticed by the
others as a broken connection or, at worst, when the group's timeout expires
(`GroupLostError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch

from sparqcli.errors import SparqError, first_line

DEFAULT_TIMEOUT_S = 600.0
_MESSAGE_BYTES = 4096


class RankFailedError(SparqError):
    """Another rank of a distributed run failed; its message, its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GroupLostError(SparqError):
    """The ranks of a distributed run lost each other: one died, or the timeout expired (exit 1)."""


class ProcessGroup:
    """One rank's view of the job: `rank`, `world_size`, and the collectives sparq makes.

    Also the engine's `Reducer` (`part` is the rank, parts are in rank order). Counts the bytes
    each rank sends and receives through collectives (`bytes_exchanged`, a ring all-reduce's
    2 (n - 1) / n of each payload, as gloo and NCCL do it).
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.part = rank
        self.bytes_exchanged = 0
        self.collectives = 0

    @classmethod
    def from_environment(
        cls, timeout_s: float = DEFAULT_TIMEOUT_S, environ: Mapping[str, str] = os.environ
    ) -> ProcessGroup:
        """Joins the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) over
        gloo, with `timeout_s` on every collective. Raises GroupLostError when it cannot."""
        import torch.distributed as dist

        rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        if not dist.is_initialized():
            try:
                dist.init_process_group(
                    "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
                )
            except (RuntimeError, ValueError) as error:
                raise GroupLostError(
                    f"rank {rank}: cannot join the process group of {world_size} ranks "
                    f"({first_line(error)})"
                ) from None
        return cls(rank, world_size)

    # --- the engine's reducer ------------------------------------------------------------------

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Returns the element-wise sum over the ranks of an int64 tensor (an `all_reduce`)."""
        import torch.distributed as dist

        self.check()
        total = counts.detach().to("cpu", torch.int64).clone()
        self._run(lambda: dist.all_reduce(total))
        self._count(total.numel() * 8)
        return total.to(counts.device)

    def gather_count(self, count: int) -> list[int]:
        """Returns every rank's `count`, in rank order (an `all_gather`)."""
        return [int(value) for value in self._gather(torch.tensor([count], dtype=torch.int64))]

    # --- agreement ----------------------------------------------------------------------------

    def check(self, error: SparqError | None = None) -> None:
        """The status exchange: raises RankFailedError when another rank failed.

        A rank that failed passes its `error`: every rank then learns it (the lowest failing
        rank's message wins) and the others raise it; this rank returns, to raise its own.
        """
        import torch.distributed as dist

        failed = torch.tensor([self.rank if error is not None else self.world_size])
        self._run(lambda: dist.all_reduce(failed, op=dist.ReduceOp.MIN))
        self._count(8)
        source = int(failed.item())
        if source == self.world_size:
            return
        text = json.dumps(
            {"message": error.template, "code": error.exit_code} if error is not None else {}
        ).encode()[:_MESSAGE_BYTES]
        buffer = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
        if self.rank == source:
            buffer[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self._run(lambda: dist.broadcast(buffer, src=source))
        self._count(_MESSAGE_BYTES)
        if self.rank == source:
            return
        try:
            sent = json.loads(bytes(buffer.tolist()).rstrip(b"\0").decode())
            message, code = str(sent["message"]), int(sent["code"])
        except (ValueError, KeyError, TypeError):
            message, code = "failed", 1
        raise RankFailedError(f"rank {source}: {message}", code)

    def exchange_json(self, value: Any) -> list[Any]:
        """Returns every rank's JSON-able `value`, in rank order."""
        raw = json.dumps(value, sort_keys=True, allow_nan=False).encode()
        lengths = self._gather(torch.tensor([len(raw)], dtype=torch.int64))
        size = int(max(int(length) for length in lengths))
        buffer = torch.zeros(size, dtype=torch.uint8)
        if raw:
            buffer[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        pieces = self._gather(buffer)
        return [
            json.loads(bytes(piece[: int(length)].tolist()).decode())
            for piece, length in zip(pieces, lengths, strict=True)
        ]

    def broadcast_text(self, text: str, source: int = 0) -> str:
        """Returns rank `source`'s `text` on every rank."""
        return self.exchange_json(text if self.rank == source else None)[source]

    def close(self) -> None:
        """Leaves the process group (after a run in which every rank succeeded)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def _gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        self.check()
        pieces = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run(lambda: dist.all_gather(pieces, tensor))
        self._count(tensor.numel() * tensor.element_size() * 2)
        return pieces

    def _count(self, payload: int) -> None:
        """Counts one collective's bytes sent plus received by this rank (ring algorithms)."""
        self.collectives += 1
        if self.world_size > 1:
            self.bytes_exchanged += 2 * (self.world_size - 1) * payload // self.world_size

    def _run(self, collective: Any) -> None:
        try:
            collective()
        except RuntimeError as error:  # gloo: a peer closed the connection, or the timeout
            raise GroupLostError(
                f"rank {self.rank}: lost the other ranks (one died or timed out): "
                f"{first_line(error)}"
            ) from None
