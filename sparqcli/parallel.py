"""How many threads sparq computes with: what the process may really use, not the host's cores.

No torch here: the count is resolved (and a bad setting refused) before torch is imported.

In order, the first that is set wins:

1. the `threads` option (`compress(threads=N)`, `sparq compress --threads N`);
2. `SPARQ_NUM_THREADS`;
3. `OMP_NUM_THREADS` (its first entry), which torchrun sets to 1 per rank;
4. the CPUs this process may run on: its CPU affinity (`os.sched_getaffinity`, which `taskset`
   and container cpusets set), cut to the cgroup CPU quota (cgroup v2 `cpu.max`, v1
   `cpu.cfs_quota_us` / `cpu.cfs_period_us`) rounded up; under torchrun with no
   `OMP_NUM_THREADS`, divided among the node's ranks (`LOCAL_WORLD_SIZE`).

An explicit count is taken as given (also above the CPUs available); the automatic one is at
least 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping
from pathlib import Path

from sparqcli.errors import UsageError

ENV_VAR = "SPARQ_NUM_THREADS"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def resolve_threads(
    option: int | None = None,
    environ: Mapping[str, str] | None = None,
    affinity: Collection[int] | None = None,
    cgroup_root: Path | None = None,
    self_cgroup: str | None = None,
) -> tuple[int, str]:
    """Returns `(count, reason)`: how many threads to compute with, and why (one short phrase).

    `environ` defaults to `os.environ`, `affinity` to this process's CPU affinity, `cgroup_root`
    to /sys/fs/cgroup, `self_cgroup` to the text of /proc/self/cgroup (these exist to be faked
    by tests). Raises UsageError when `option` or SPARQ_NUM_THREADS is not a positive integer.
    """
    environ = os.environ if environ is None else environ
    if option is not None:
        if isinstance(option, bool) or not isinstance(option, int) or option < 1:
            raise UsageError(
                f"{{opt:threads}}: must be a positive integer, got {option!r}", option="threads"
            )
        return option, "the threads option"
    configured = environ.get(ENV_VAR, "").strip()
    if configured:
        count = _positive_int(configured)
        if count is None:
            raise UsageError(f"{ENV_VAR}: must be a positive integer, got {configured!r}")
        return count, f"{ENV_VAR}={count}"
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    ignored = ""
    if omp:
        count = _positive_int(omp.split(",")[0])
        if count is not None:
            return count, f"OMP_NUM_THREADS={omp}"
        ignored = f"; OMP_NUM_THREADS={omp!r} ignored (not a count)"
    cpus, reason = available_cpus(affinity, cgroup_root, self_cgroup)
    ranks = _positive_int(environ.get("LOCAL_WORLD_SIZE", "").strip() or "1") or 1
    if ranks > 1:
        cpus = max(1, cpus // ranks)
        reason += f", shared by {ranks} local ranks"
    return cpus, reason + ignored


def available_cpus(
    affinity: Collection[int] | None = None,
    cgroup_root: Path | None = None,
    self_cgroup: str | None = None,
) -> tuple[int, str]:
    """Returns `(count, reason)`: the CPUs this process may use (affinity cut to the cgroup quota).

    Defaults as in `resolve_threads`. Raises nothing: what cannot be read is taken as no limit.
    """
    if affinity is None:
        affinity = _own_affinity()
    cpus = max(1, len(affinity)) if affinity is not None else max(1, os.cpu_count() or 1)
    reason = f"{cpus} CPU{'s' if cpus != 1 else ''} in the CPU affinity"
    quota = cgroup_cpu_quota(CGROUP_ROOT if cgroup_root is None else cgroup_root, self_cgroup)
    if quota is not None and math.ceil(quota) < cpus:
        cpus = max(1, math.ceil(quota))
        reason = f"cgroup CPU quota of {quota:g} CPUs (of {reason})"
    return cpus, reason


def cgroup_cpu_quota(root: Path, self_cgroup: str | None = None) -> float | None:
    """Returns the tightest cgroup CPU quota on this process, in CPUs, or None when unlimited.

    Looks at cgroup v2 `cpu.max` and v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, in the
    process's own cgroup (from /proc/self/cgroup, or `self_cgroup`) and each of its parents up
    to `root`, and at `root` itself (a container sees its own cgroup there). Raises nothing.
    """
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            self_cgroup = ""
    v2_path, v1_path = "", ""
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    quotas: list[float] = []
    for folder in _folders(root, v2_path):
        quota = _v2_quota(folder / "cpu.max")
        if quota is not None:
            quotas.append(quota)
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu", ""):
        base = root / mount if mount else root
        for folder in _folders(base, v1_path):
            quota = _v1_quota(folder)
            if quota is not None:
                quotas.append(quota)
    return min(quotas) if quotas else None


def _folders(base: Path, cgroup_path: str) -> list[Path]:
    """Returns `base`, and `base/<cgroup_path>` with each of its parents below `base`."""
    folders = [base]
    parts = [part for part in cgroup_path.split("/") if part and part != ".."]
    for depth in range(1, len(parts) + 1):
        folders.append(base.joinpath(*parts[:depth]))
    return folders


def _v2_quota(path: Path) -> float | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    quota, period = _positive_int(fields[0]), _positive_int(fields[1])
    return quota / period if quota is not None and period is not None else None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text().strip())
        period = int((folder / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_affinity() -> Collection[int] | None:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not on Linux
        return None


def _positive_int(text: str) -> int | None:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value >= 1 else None
