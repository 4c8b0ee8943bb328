"""Dask clients for the workflow's ``cluster`` section.

``local`` (the default) starts a :class:`distributed.LocalCluster` of worker processes on
this machine: no set-up, nothing to install. Each worker runs ``threads_per_worker`` tasks
at a time, and torch gets the remaining cores so that workers x threads x torch threads
equals the core count (measured here: 2 Dask threads x 1 torch thread beat 1 x 2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
from distributed import Client, LocalCluster

from .config import ClusterConfig
from .errors import PipelineError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ClusterShape:
    n_workers: int
    threads_per_worker: int
    torch_threads: int

    def describe(self) -> str:
        return (
            f"local: {self.n_workers} worker process{'es' if self.n_workers > 1 else ''} x "
            f"{self.threads_per_worker} thread{'s' if self.threads_per_worker > 1 else ''}, "
            f"{self.torch_threads} torch thread{'s' if self.torch_threads > 1 else ''} each"
        )


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cluster_shape(cfg: ClusterConfig, device: str = "auto") -> ClusterShape:
    """Workers and threads: one worker per core, or one per GPU with two threads each.

    On GPUs the second thread reads and normalises the next block while the first one's
    batch runs, so the GPU does not wait for I/O.
    """
    cores = available_cores()
    gpus = 0 if device == "cpu" else gpu_count()
    threads = (2 if gpus else 1) if cfg.threads_per_worker == "auto" else int(cfg.threads_per_worker)
    if cfg.n_workers != "auto":
        workers = int(cfg.n_workers)
    else:
        workers = gpus if gpus and not device.startswith("cuda:") else max(1, cores // threads)
    return ClusterShape(workers, threads, max(1, cores // (workers * threads)))


def check_cluster(cfg: ClusterConfig, device: str, task_bytes: int) -> ClusterShape:
    """What ``validate`` can know of a local cluster: workers, threads and memory fit the machine."""
    shape = cluster_shape(cfg, device)
    cores = available_cores()
    if cfg.n_workers != "auto" and shape.n_workers > cores:
        raise PipelineError(
            f"cluster.n_workers: {shape.n_workers} worker processes on a machine with {cores} "
            f"core{'s' * (cores > 1)}; expected at most {cores} (or auto)"
        )
    if cfg.threads_per_worker != "auto" and shape.threads_per_worker > 4 * cores:
        raise PipelineError(
            f"cluster.threads_per_worker: {shape.threads_per_worker} threads on {cores} "
            f"core{'s' * (cores > 1)}; expected at most {4 * cores}"
        )
    concurrent = shape.n_workers * shape.threads_per_worker
    memory = psutil.virtual_memory().total
    if concurrent * task_bytes > memory:
        raise PipelineError(
            f"tiling.tile: {concurrent} concurrent task{'s' * (concurrent > 1)} of "
            f"~{task_bytes / 2**30:.1f} GiB each need more than this machine's "
            f"{memory / 2**30:.1f} GiB; choose a smaller tile or batch size, or fewer workers"
        )
    if cfg.dashboard is not None:
        try:
            import bokeh  # noqa: F401
        except ImportError:
            raise PipelineError(
                "cluster.dashboard: the Dask dashboard needs the bokeh package (pip install "
                "'bokeh>=3.1'); set dashboard: null to run without it"
            ) from None
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
    return shape


@contextmanager
def connect(cfg: ClusterConfig, device: str = "auto") -> Iterator[Client]:
    """A client for the configured cluster, closed (and the cluster stopped) on exit.

    Everything listens on the loopback interface only: the scheduler, its HTTP endpoint
    (a random port, so that two runs never fight over 8787) and the workers. The dashboard
    is served only where ``cluster.dashboard`` asks. Workers ignore Ctrl-C: the driver
    catches it and stops them, so one message is printed instead of a traceback per worker.
    """
    shape = cluster_shape(cfg, device)
    cluster = LocalCluster(
        n_workers=shape.n_workers,
        threads_per_worker=shape.threads_per_worker,
        processes=True,
        host=LOOPBACK,
        dashboard_address=cfg.dashboard,
        scheduler_kwargs=None if cfg.dashboard else {"dashboard": False, "dashboard_address": f"{LOOPBACK}:0"},
        silence_logs=logging.CRITICAL,  # failures reach the user once, summarised by the driver
        preload=["pipeline.worker_preload"],
    )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
