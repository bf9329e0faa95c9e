"""Thread-count resolution: option, SPARQ_NUM_THREADS, OMP_NUM_THREADS, affinity, cgroup quota."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparqcli.errors import UsageError
from sparqcli.parallel import available_cpus, cgroup_cpu_quota, resolve_threads

FOUR = {0, 1, 2, 3}


@pytest.fixture
def no_cgroup(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    return root


def resolve(option=None, environ=None, affinity=FOUR, root=None, self_cgroup=""):
    return resolve_threads(option, environ or {}, affinity, root, self_cgroup)


def test_the_affinity_decides_without_settings(no_cgroup):
    assert resolve(root=no_cgroup) == (4, "4 CPUs in the CPU affinity")
    assert resolve(affinity={3}, root=no_cgroup) == (1, "1 CPU in the CPU affinity")


def test_the_option_wins_over_everything(no_cgroup):
    environ = {"SPARQ_NUM_THREADS": "3", "OMP_NUM_THREADS": "2"}
    assert resolve(7, environ, root=no_cgroup) == (7, "the threads option")


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_a_bad_option_is_a_usage_error_naming_threads(bad, no_cgroup):
    with pytest.raises(UsageError, match=r"^threads: must be a positive integer"):
        resolve(bad, root=no_cgroup)


def test_sparq_num_threads_wins_over_omp(no_cgroup):
    environ = {"SPARQ_NUM_THREADS": " 3 ", "OMP_NUM_THREADS": "1"}
    assert resolve(None, environ, root=no_cgroup) == (3, "SPARQ_NUM_THREADS=3")


@pytest.mark.parametrize("bad", ["0", "x", "-2", "1.5", "²"])
def test_a_bad_sparq_num_threads_is_a_usage_error_naming_it(bad, no_cgroup):
    with pytest.raises(UsageError, match=r"^SPARQ_NUM_THREADS: must be a positive integer"):
        resolve(None, {"SPARQ_NUM_THREADS": bad}, root=no_cgroup)


def test_an_empty_sparq_num_threads_is_unset(no_cgroup):
    assert resolve(None, {"SPARQ_NUM_THREADS": ""}, root=no_cgroup)[0] == 4


def test_an_explicit_omp_num_threads_is_respected(no_cgroup):
    assert resolve(None, {"OMP_NUM_THREADS": "1"}, root=no_cgroup) == (1, "OMP_NUM_THREADS=1")
    # taken as given, also above the CPUs available; a nested list's first level counts
    assert resolve(None, {"OMP_NUM_THREADS": "8,2"}, root=no_cgroup)[0] == 8


def test_an_omp_num_threads_that_is_no_count_is_ignored(no_cgroup):
    count, reason = resolve(None, {"OMP_NUM_THREADS": "many"}, root=no_cgroup)
    assert count == 4
    assert "OMP_NUM_THREADS='many' ignored" in reason


def test_torchrun_ranks_get_one_thread_each(no_cgroup):
    # torchrun sets OMP_NUM_THREADS=1 per rank (unless the user set it)
    environ = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "4", "RANK": "2"}
    assert resolve(None, environ, root=no_cgroup)[0] == 1


def test_ranks_without_omp_share_the_cpus(no_cgroup):
    count, reason = resolve(None, {"LOCAL_WORLD_SIZE": "2"}, root=no_cgroup)
    assert (count, "shared by 2 local ranks" in reason) == (2, True)
    assert resolve(None, {"LOCAL_WORLD_SIZE": "8"}, root=no_cgroup)[0] == 1


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("cpu_max", "expected"), [("150000 100000\n", 2), ("50000 100000", 1), ("max 100000", 4)]
)
def test_a_cgroup_v2_quota_caps_the_count(no_cgroup, cpu_max, expected):
    write(no_cgroup / "cpu.max", cpu_max)
    count, reason = resolve(root=no_cgroup)
    assert count == expected
    assert ("cgroup CPU quota" in reason) == (expected < 4)


def test_a_quota_above_the_affinity_changes_nothing(no_cgroup):
    write(no_cgroup / "cpu.max", "800000 100000")
    assert resolve(root=no_cgroup) == (4, "4 CPUs in the CPU affinity")


def test_the_own_nested_cgroup_and_its_parents_are_read(no_cgroup):
    write(no_cgroup / "cpu.max", "max 100000")
    write(no_cgroup / "jobs" / "cpu.max", "300000 100000")
    write(no_cgroup / "jobs" / "job7" / "cpu.max", "max 100000")
    own = "0::/jobs/job7\n"
    assert cgroup_cpu_quota(no_cgroup, own) == 3.0
    assert resolve(root=no_cgroup, self_cgroup=own)[0] == 3


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_a_cgroup_v1_quota_caps_the_count(no_cgroup, mount):
    write(no_cgroup / mount / "docker" / "cpu.cfs_quota_us", "200000\n")
    write(no_cgroup / mount / "docker" / "cpu.cfs_period_us", "100000\n")
    own = "4:memory:/docker\n3:cpu,cpuacct:/docker\n"
    assert resolve(root=no_cgroup, self_cgroup=own)[0] == 2


def test_an_unlimited_v1_quota_is_no_limit(no_cgroup):
    write(no_cgroup / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(no_cgroup / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(no_cgroup, "") is None


@pytest.mark.parametrize("text", ["", "garbage", "0 100000", "100000 0", "a b"])
def test_unreadable_quota_files_are_no_limit(no_cgroup, text):
    write(no_cgroup / "cpu.max", text)
    assert cgroup_cpu_quota(no_cgroup, "") is None


def test_this_process_gets_a_sensible_count():
    count, reason = available_cpus()
    assert 1 <= count <= (len(__import__("os").sched_getaffinity(0)))
    assert reason
