"""One GPU per worker: the device each worker slot owns, and how a worker finds its slot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cluster.environment import (
    parse_tunables,
    shell_exports,
    split_spawn_variables,
    worker_environment,
)
from pipeline.cluster.gpus import assign_devices, device_for_worker, visible_devices, worker_slot


@pytest.mark.parametrize("gpus", [2, 4])
def test_each_worker_of_a_node_owns_a_different_gpu(gpus) -> None:
    visible = [str(i) for i in range(gpus)]
    devices = assign_devices(visible, gpus)
    assert devices == visible  # worker i -> GPU i: all distinct, none shares cuda:0
    # local workers are named 0..n-1; jobqueue's `--nworkers n --name job` names job-0..job-(n-1)
    assert [device_for_worker(i, visible, gpus) for i in range(gpus)] == visible
    assert [device_for_worker(f"gigaseg-worker-7-{i}", visible, gpus) for i in range(gpus)] == visible


@pytest.mark.parametrize("gpus", [2, 4])
def test_scheduler_given_devices_are_respected(gpus) -> None:
    """SLURM or a container may hand a job GPUs 4..7 (or UUIDs): slots map onto those."""
    visible = visible_devices(",".join(f"GPU-{i:04d}" for i in range(4, 4 + gpus)))
    assert [device_for_worker(f"node-{i}", visible, gpus) for i in range(gpus)] == visible


def test_nothing_to_narrow_with_one_or_no_visible_device() -> None:
    assert device_for_worker(1, ["3"], 2) is None  # the batch system already pinned it
    assert device_for_worker(0, [], 2) is None
    assert device_for_worker("tcp://10.0.0.1:4000", ["0", "1"], 2) is None  # no slot: left alone


@given(st.integers(1, 16), st.integers(1, 16))
def test_assignment_is_balanced(gpus, workers) -> None:
    devices = assign_devices([str(i) for i in range(gpus)], workers)
    counts = [devices.count(str(i)) for i in range(gpus)]
    assert max(counts) - min(counts) <= 1 and sum(counts) == workers


def test_worker_slots_from_names() -> None:
    assert worker_slot(3) == 3 and worker_slot("job-12") == 12 and worker_slot("7") == 7
    assert worker_slot("host") is None and worker_slot(True) is None and worker_slot(None) is None


def test_worker_environment_sets_thread_pools_and_lets_the_user_win() -> None:
    env = worker_environment(3, 2, {"OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"})
    assert env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["PIPELINE_TORCH_THREADS"] == "3"
    assert env["OMP_NUM_THREADS"] == "1" and env["PIPELINE_WORKERS_ON_NODE"] == "2"
    assert "export GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1" in shell_exports(env)
    assert shell_exports({"A": "x y"}) == ["export A='x y'"]


def test_the_tuned_allocator_is_the_default_and_keeps_tunables_already_set() -> None:
    keep = str(2**32 - 1)
    env = worker_environment(1, 1, {})
    assert parse_tunables(env["GLIBC_TUNABLES"]) == {
        "glibc.malloc.mmap_threshold": keep, "glibc.malloc.trim_threshold": keep, "glibc.malloc.arena_max": "1",
    }  # fmt: skip
    assert env["MALLOC_TRIM_THRESHOLD_"] == keep  # over distributed's pre-spawn 65536
    inherited = worker_environment(1, 1, {}, inherited={"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.cpu.x86_ibt=on"})
    assert parse_tunables(inherited["GLIBC_TUNABLES"])["glibc.malloc.arena_max"] == "4"
    assert parse_tunables(inherited["GLIBC_TUNABLES"])["glibc.cpu.x86_ibt"] == "on"
    assert "GLIBC_TUNABLES" not in worker_environment(1, 1, {}, allocator="system")
    spawn, after = split_spawn_variables({**env, "LD_PRELOAD": "libtcmalloc.so", "MALLOC_ARENA_MAX": "2"})
    assert set(spawn) == {"GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "MALLOC_ARENA_MAX"}
    assert "PIPELINE_TORCH_THREADS" in after and not set(spawn) & set(after)
