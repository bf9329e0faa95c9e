"""`compress_distributed`: one compression run by every rank of a torchrun job.

Each rank opens the input (any kind: a DCP folder, a `.safetensors` file read by row ranges, a
`.pt`), plans the same tables, and compresses its share of each table's block rows
(`part_ranges`: whole block rows, rank order) with the engine's global step reduced over the
group; pass-through tensors are shared out by size. Each rank writes its shard file into one
temporary folder beside the output; when every rank has succeeded, the ranks exchange their
figures, every rank builds the same report (the table statistics combined over the ranks), and
rank 0 writes the index and renames the folder into place. An error on any rank reaches every
rank at its next collective (see `group.py`); the temporary folder is removed and nothing is
left behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sparqcli.config import Config, config_files
from sparqcli.distributed.group import (
    DEFAULT_TIMEOUT_S,
    GroupLostError,
    ProcessGroup,
    RankFailedError,
)
from sparqcli.errors import SparqError, UsageError, first_line
from sparqcli.results import CompressReport, TableReport

ProgressCallback = Callable[[str, float], None]


def compress_distributed(
    source: str | Path,
    config: Config | str | Path,
    *,
    output: str | Path,
    overrides: Sequence[str] = (),
    order: str | None = None,
    force: bool = False,
    trust_pickle: bool = False,
    key: str | None = None,
    report_path: str | Path | None = None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    group: ProcessGroup | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CompressReport:
    """Compresses the checkpoint `source` with every rank of the job; returns the report.

    Call it on every rank (as `torchrun ... -m sparqcli compress` does), with the same
    arguments. `output` is a folder: one sparq shard file per rank plus
    `model.safetensors.index.json` (docs/FORMAT.md); it must be on a filesystem every rank
    sees. `group` defaults to the torchrun environment's (gloo, `timeout_s` per collective).
    Every rank returns the same report (`report.rank` says whose; `report.ranks` holds each
    rank's time, bytes read and bytes exchanged). Raises what `compress` raises, on every rank:
    the failing rank its own error, the others `RankFailedError` with its message and exit code;
    `GroupLostError` when a rank died or the timeout expired.
    """
    started = time.perf_counter()
    own_group = group is None
    if group is None:
        group = ProcessGroup.from_environment(timeout_s)
    run = _Run(group, Path(source), Path(output), started)
    try:
        report = run.go(
            config, overrides, order, force, trust_pickle, key, report_path, device, progress
        )
        if own_group:
            group.close()  # every rank is past its last collective
        return report
    except (RankFailedError, GroupLostError):
        run.discard()
        raise
    except Exception as error:
        told = error if isinstance(error, SparqError) else SparqError(_internal(error))
        try:
            group.check(told)  # every other rank raises this error at its next collective
        except (RankFailedError, GroupLostError):
            pass  # another rank failed too, or the others are gone: this rank's error stands
        finally:
            run.discard()
        raise


def _internal(error: BaseException) -> str:
    return f"internal error: {type(error).__name__}: {first_line(error)}"


class _Run:
    """One rank's run: what it read, wrote and exchanged."""

    def __init__(self, group: ProcessGroup, source: Path, output: Path, started: float) -> None:
        self.group = group
        self.source = source
        self.output = output
        self.started = started
        self.temp: Path | None = None
        self.bytes_read = 0
        self.infos: dict[str, dict[str, Any]] = {}
        self.passthrough_keys: list[str] = []

    def discard(self) -> None:
        """Removes the temporary folder (every rank is past its writes by now)."""
        from sparqcli.sinks import _remove_quietly

        if self.temp is not None:
            _remove_quietly(self.temp)

    def go(
        self,
        config: Config | str | Path,
        overrides: Sequence[str],
        order: str | None,
        force: bool,
        trust_pickle: bool,
        key: str | None,
        report_path: str | Path | None,
        device: str,
        progress: ProgressCallback | None,
    ) -> CompressReport:
        from sparqcli.compression import (
            _plan,
            check_device,
            input_size,
            is_model_folder,
            read_config,
        )
        from sparqcli.digest import BackgroundSha256
        from sparqcli.sinks import (
            check_output_folder,
            check_report_path,
            new_partial_folder,
            partial_folder,
        )
        from sparqcli.sources import open_checkpoint

        group, source, output = self.group, self.source, self.output
        rank = group.rank
        inputs = [source, *config_files(config)]  # never overwritten by the output or report
        config = read_config(config, overrides, order)
        check_device(device)
        if device == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if is_model_folder(source):
            raise UsageError(
                f"{source}: a model folder is compressed in one process (its shards one at a "
                "time); leave out torchrun, which takes a .safetensors or .pt file or a DCP "
                "folder",
                path=source,
            )
        check_output_folder(output, inputs, force)
        if report_path is not None:
            check_report_path(Path(report_path), force, inputs, [output])
        checkpoint = open_checkpoint(source, key=key, trust_pickle=trust_pickle)
        if checkpoint.is_sparq:
            raise UsageError(
                f"{source}: is already compressed by sparq; compress the original checkpoint",
                path=source,
            )
        file = _plan(checkpoint, config, "sparq", output, input_size(source))
        digests = BackgroundSha256([source]) if rank == 0 else None
        try:
            with contextlib.ExitStack() as registered:  # a signal handler removes the folder
                temp_name = ""
                if rank == 0:
                    self.temp = registered.enter_context(new_partial_folder(output))
                    temp_name = str(self.temp)
                self.temp = Path(group.broadcast_text(temp_name))
                if rank != 0:
                    registered.enter_context(partial_folder(self.temp, output))
                name, extra, sha256 = self._write_shard(
                    checkpoint, file, group, digests, progress, device
                )
                if digests is not None:
                    digests.cancel()
                return self._finish(
                    checkpoint, file, config, name, extra, sha256, report_path, device
                )
        finally:
            if digests is not None:
                digests.cancel()

    def _write_shard(
        self,
        checkpoint: Any,
        file: Any,
        group: ProcessGroup,
        digests: Any,
        progress: ProgressCallback | None,
        device: str,
    ) -> tuple[str, dict[str, Any], str]:
        """Compresses this rank's rows of every table and writes its shard; returns the shard's
        name, the JSON extras and the input's sha256."""
        from sparqcli.compression import _json_extras
        from sparqcli.engine.options import EngineOptions
        from sparqcli.format.sharded import shard_name
        from sparqcli.format.writer import SourceInfo, write_compressed
        from sparqcli.sinks import atomic_output

        source, rank, world = self.source, group.rank, group.world_size
        options = EngineOptions.from_environment()
        parts, stats, infos = {}, {}, {}
        for table in file.tables:
            result, table_stats, info = self._table(checkpoint, table, device, progress, options)
            infos[table.key] = info
            if result is not None:
                parts[table.key] = result.to("cpu")
                stats[table.key] = table_stats
        # A tied key (an alias) is stored once, as its table: in every shard, with that table's
        # rows, as in one process.
        aliases = {table.key: list(table.aliases) for table in file.tables if table.aliases}
        tied = {alias for names in aliases.values() for alias in names}
        others = [key for key in checkpoint.tensors if key not in infos and key not in tied]
        mine = _share_out(checkpoint, others, world)
        self.infos, self.passthrough_keys = infos, mine[rank]
        passthrough = {}
        for name in mine[rank]:
            passthrough[name] = checkpoint.tensor(name)
            self.bytes_read += checkpoint.tensors[name].nbytes
        sha256 = digests.result(source) if digests is not None else ""
        sha256 = group.broadcast_text(sha256)
        extra, file.dropped = _json_extras(checkpoint)
        name = shard_name(rank, world)
        with atomic_output(self.temp / name) as temp:
            write_compressed(
                temp,
                passthrough,
                parts,
                stats,
                SourceInfo(source.name, sha256),
                extra,
                {key: names for key, names in aliases.items() if key in parts},
            )
        return name, extra, sha256

    def _finish(
        self,
        checkpoint: Any,
        file: Any,
        config: Config,
        name: str,
        extra: dict[str, Any],
        sha256: str,
        report_path: str | Path | None,
        device: str,
    ) -> CompressReport:
        """Exchanges every rank's figures, builds the report; rank 0 writes the index and
        renames the folder into place."""
        from sparqcli.format.sharded import INDEX_NAME
        from sparqcli.sinks import atomic_output

        group, output = self.group, self.output
        rank, world = group.rank, group.world_size
        shard_bytes = (self.temp / name).stat().st_size
        mine_info = {
            "rank": rank,
            "seconds": round(time.perf_counter() - self.started, 6),
            "bytes_read": self.bytes_read,
            "bytes_exchanged": group.bytes_exchanged,
            "collectives": group.collectives,
            "file": name,
            "file_bytes": shard_bytes,
            "passthrough": self.passthrough_keys,
            "tables": self.infos,
        }
        everyone = group.exchange_json(mine_info)
        report = CompressReport(config, [file], False, device)
        report.rank = rank
        report.ranks = [
            {name: value for name, value in item.items() if name not in ("tables", "passthrough")}
            for item in everyone
        ]
        for table in file.tables:
            _combine(table, [item["tables"][table.key] for item in everyone])
        file.output_bytes = sum(item["file_bytes"] for item in everyone)
        if not file.gate_failures and rank == 0:
            index = _index(file, everyone, world, checkpoint, sha256, extra)
            with atomic_output(self.temp / INDEX_NAME) as temp:
                temp.write_text(index)
            file.output_bytes += (self.temp / INDEX_NAME).stat().st_size
            from sparqcli.sinks import replace_folder

            replace_folder(self.temp, output)
            self.temp = None
        group.check()  # rank 0 renamed the folder into place (or failed: everyone raises)
        if file.gate_failures:
            self.discard()
        file.written = not file.gate_failures
        file.seconds = report.seconds = time.perf_counter() - self.started
        from sparqcli.compression import peak_memory_bytes

        report.peak_memory_bytes = peak_memory_bytes()
        if report_path is not None and rank == 0:
            report.save_json(report_path, force=True)
        return report

    def _count_read(self, count: int) -> None:
        self.bytes_read += count

    def _table(
        self,
        checkpoint: Any,
        table: TableReport,
        device: str,
        progress: ProgressCallback | None,
        options: Any,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Compresses this rank's rows of one table; returns them, their stats and figures."""
        from sparqcli.compression import compress_planned_table
        from sparqcli.engine.reduce import TablePart, part_ranges, shared_kth_smallest
        from sparqcli.format.spec import table_file_bytes

        group = self.group
        rows, cols = table.shape
        start, stop = part_ranges((rows, cols), table.rule.sparsity.block_shape, group.world_size)[
            group.rank
        ]
        part = TablePart(start, stop, group)
        result, stats = compress_planned_table(
            checkpoint, table, device, progress, options, part=part, count_read=self._count_read
        )
        median = 0.0
        if rows:
            # The table's scale median, exactly: the radix select over every rank's scales.
            scales = result.scale.float().cpu()
            median = shared_kth_smallest(lambda: [scales], (rows - 1) // 2 + 1, group)[0]
        has_rows = stop > start
        info = {
            "rows": [start, stop],
            "kept": stats.kept,
            "sums": asdict(part.sums),  # type: ignore[call-overload]
            "scale": [stats.scale_min, stats.scale_max] if has_rows else None,
            "zero_point": [stats.zero_point_min, stats.zero_point_max] if has_rows else None,
            "scale_median": median,
            "bytes_after": table_file_bytes(result) if has_rows else 0,
        }
        keep = has_rows or (rows == 0 and group.rank == 0)
        return (result if keep else None), stats, info


def _share_out(checkpoint: Any, keys: list[str], world: int) -> list[list[str]]:
    """Returns each rank's pass-through keys: largest first to the least-loaded rank."""
    loads = [0] * world
    owners: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(keys, key=lambda k: (-checkpoint.tensors[k].nbytes, k)):
        target = loads.index(min(loads))
        owners[target].append(name)
        loads[target] += checkpoint.tensors[name].nbytes
    return [sorted(names) for names in owners]


def _combine(table: TableReport, pieces: list[dict[str, Any]]) -> None:
    """Fills in the table's statistics, bytes and gates from every rank's figures."""
    from sparqcli.engine.stats import TableStats

    rows, cols = table.shape
    values = rows * cols
    kept = sum(piece["kept"] for piece in pieces)
    sums = [piece["sums"] for piece in pieces]
    error_sq = sum(item["error_sq"] for item in sums)
    original_sq = sum(item["original_sq"] for item in sums)
    if original_sq > 0:
        rel_error = math.sqrt(error_sq / original_sq)
    else:
        rel_error = 0.0 if error_sq == 0 else math.inf
    with_rows = [piece for piece in pieces if piece["scale"] is not None]
    cosine_min = min((item["cosine_min"] for item in sums if item["rows"]), default=1.0)
    table.stats = TableStats(
        values=values,
        kept=kept,
        pruned_fraction=(values - kept) / values if values else 0.0,
        zero_fraction=sum(item["zeros"] for item in sums) / values if values else 0.0,
        scale_min=min((p["scale"][0] for p in with_rows), default=0.0),
        scale_median=pieces[0]["scale_median"],
        scale_max=max((p["scale"][1] for p in with_rows), default=0.0),
        zero_point_min=min((p["zero_point"][0] for p in with_rows), default=0.0),
        zero_point_max=max((p["zero_point"][1] for p in with_rows), default=0.0),
        rel_error=rel_error,
        row_cosine_mean=sum(item["cosine_sum"] for item in sums) / rows if rows else 1.0,
        row_cosine_min=cosine_min,
    )
    table.bytes_after = sum(piece["bytes_after"] for piece in pieces)
    table.gate_failures = table.rule.gates.failures(
        table.stats.rel_error, table.stats.row_cosine_min, table.bytes_ratio
    )


def _index(
    file: Any,
    everyone: list[dict[str, Any]],
    world: int,
    checkpoint: Any,
    sha256: str,
    extra: dict[str, Any],
) -> str:
    """Returns the index JSON of the output folder (docs/FORMAT.md, "Sharded output")."""
    import json

    import sparqcli
    from sparqcli.format.spec import FORMAT_VERSION

    tables = {}
    for table in file.tables:
        rows = table.shape[0]
        shards = [
            {"file": item["file"], "rows": item["tables"][table.key]["rows"]}
            for item in everyone
            if item["tables"][table.key]["rows"][1] > item["tables"][table.key]["rows"][0]
            or (rows == 0 and item["rank"] == 0)
        ]
        tables[table.key] = {
            "shape": list(table.shape),
            "dtype": table.dtype,
            "kept": table.stats.kept,
            "stats": table.stats.to_dict(),
            "row_shards": shards,
        }
    weight_map = {name: item["file"] for item in everyone for name in item["passthrough"]}
    document = {
        "metadata": {
            "total_size": sum(item["file_bytes"] for item in everyone),
            "sparq": {
                "format_version": FORMAT_VERSION,
                "sparq_version": sparqcli.__version__,
                "source": {"name": checkpoint.path.name, "sha256": sha256},
                "world_size": world,
                "extra": extra,
                "tables": tables,
            },
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    return json.dumps(document, sort_keys=True, indent=1, allow_nan=False) + "\n"
