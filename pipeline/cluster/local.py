"""``kind: local``: worker processes on this machine (:class:`distributed.LocalCluster`).

Nothing to set up. On CPUs one worker process for the machine with one Dask thread per
core plus one (forward passes on every core while the extra thread reads and writes; one
process holds one copy of torch and of the model), or one per GPU with two threads (one
reads and normalises the next block while the other's batch runs). Everything listens on
the loopback interface only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask
import psutil
from distributed import Client, LocalCluster

from ..config import LocalClusterConfig
from ..errors import PipelineError
from .environment import split_spawn_variables, worker_environment
from .shape import ClusterShape, available_cores, cpu_worker_threads, fixed_concurrency, split_cores

LOOPBACK = "127.0.0.1"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def shape(cfg: LocalClusterConfig, device: str) -> ClusterShape:
    """One worker process per GPU (two threads); on CPUs one process for the machine, one
    thread per core plus one for I/O (``auto``), or what ``n_workers`` and
    ``threads_per_worker`` say."""
    cores = available_cores()
    memory = psutil.virtual_memory().total
    gpus = 0 if device == "cpu" else gpu_count()
    if gpus:
        threads = 2 if cfg.threads_per_worker == "auto" else int(cfg.threads_per_worker)
        pinned = device.startswith("cuda:")
        workers = int(cfg.n_workers) if cfg.n_workers != "auto" else (1 if pinned else gpus)
        return ClusterShape(
            "local", workers, threads, split_cores(cores, workers, threads), 0 if pinned else 1,
            compute_slots=1, cores_per_worker=max(1, cores // workers), memory_per_worker=memory // workers,
        )  # fmt: skip
    workers = 1 if cfg.n_workers == "auto" else int(cfg.n_workers)
    per_worker = max(1, cores // workers)
    if cfg.threads_per_worker == "auto":
        threads, slots = cpu_worker_threads(per_worker)
    else:
        threads = slots = int(cfg.threads_per_worker)
    return ClusterShape(
        "local", workers, threads, split_cores(cores, workers, slots), 0,
        compute_slots=slots, cores_per_worker=per_worker, memory_per_worker=memory // workers,
    )  # fmt: skip


def check(cfg: LocalClusterConfig, device: str, task_bytes: int) -> ClusterShape:
    """What ``validate`` can know of this machine: workers, threads and memory fit it."""
    found = shape(cfg, device)
    cores = available_cores()
    if cfg.n_workers != "auto" and found.n_workers > cores:
        raise PipelineError(
            f"cluster.n_workers: {found.n_workers} worker processes on a machine with {cores} "
            f"core{'s' * (cores > 1)}; expected at most {cores} (or auto)"
        )
    if cfg.threads_per_worker != "auto" and found.threads_per_worker > 4 * cores:
        raise PipelineError(
            f"cluster.threads_per_worker: {found.threads_per_worker} threads on {cores} "
            f"core{'s' * (cores > 1)}; expected at most {4 * cores}"
        )
    concurrent = found.n_workers * fixed_concurrency(cfg.threads_per_worker, found)
    memory = psutil.virtual_memory().total
    if concurrent * task_bytes > memory:
        raise PipelineError(
            f"tiling.tile: {concurrent} concurrent task{'s' * (concurrent > 1)} of "
            f"~{task_bytes / 2**30:.1f} GiB each need more than this machine's "
            f"{memory / 2**30:.1f} GiB; choose a smaller tile or batch size, or fewer workers"
        )
    gpus = gpu_count() if device.startswith("cuda") else 0
    if device.startswith("cuda") and gpus == 0:
        raise PipelineError(
            f"inference.device: {device} was requested, but this machine has no CUDA device "
            f"visible to torch; use auto or cpu"
        )
    if device.startswith("cuda:") and int(device.split(":")[1]) >= gpus:
        raise PipelineError(
            f"inference.device: {device}, but this machine has {gpus} CUDA "
            f"device{'s' * (gpus != 1)} (cuda:0 .. cuda:{gpus - 1})"
        )
    return found


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for a while, then as it was."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def start(cfg: LocalClusterConfig, found: ClusterShape, preload: list[str]) -> Iterator[Client]:
    """The scheduler's HTTP endpoint takes a random port (two runs never fight over 8787);
    the dashboard is served only where ``cluster.dashboard`` asks."""
    env = worker_environment(
        found.torch_threads, found.n_workers, cfg.environment, cfg.allocator, os.environ, found.cores_per_worker
    )
    if found.gpus_per_worker and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpu_count()))))
    spawn, after = split_spawn_variables(env)
    # The nannies (in this process) read pre-spawn-environ when they are made, and let this
    # process's own variables win over it: both are set while the cluster is made.
    configured = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {**configured, **spawn}}), _environ(spawn):
        cluster = LocalCluster(
            n_workers=found.n_workers,
            threads_per_worker=found.threads_per_worker,
            processes=True,
            host=LOOPBACK,
            dashboard_address=cfg.dashboard,
            scheduler_kwargs=None if cfg.dashboard else {"dashboard": False, "dashboard_address": f"{LOOPBACK}:0"},
            silence_logs=logging.CRITICAL,  # failures reach the user once, summarised by the driver
            preload=preload,
            env=after,
            resources={"GPU": found.threads_per_worker} if found.gpus_per_worker else None,
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
