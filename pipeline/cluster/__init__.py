"""Dask clusters for the workflow's ``cluster`` section: one module per backend.

Every backend is an existing engine (Dask distributed; dask-jobqueue; the Dask Kubernetes
operator), never a scheduler of our own. A backend module offers ``shape(cfg, device)``
(what it will start), ``check(cfg, device, task_bytes)`` (what ``validate`` can know) and
``start(cfg, shape, preload)`` (a context manager yielding a :class:`distributed.Client`).
A new backend is one module here plus one member of ``config.ClusterConfig``.

Whatever the backend, worker processes start with the same environment
(:mod:`.environment`: thread counts, allocator settings) and the same preload
(:mod:`pipeline.worker_preload`: one GPU per worker, torch threads, Ctrl-C, parent watch).
"""

from __future__ import annotations

import importlib
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from distributed import Client

from ..config import ClusterConfig
from .allocator import allocator_tuned
from .shape import ClusterShape

PRELOAD = ["pipeline.worker_preload"]
BACKENDS = {
    "local": ".local",
    "address": ".address",
    "slurm": ".jobqueue",
    "pbs": ".jobqueue",
    "lsf": ".jobqueue",
    "sge": ".jobqueue",
    "kubernetes": ".kubernetes",
}


def backend(cfg: ClusterConfig) -> Any:
    return importlib.import_module(BACKENDS[cfg.kind], __package__)


def cluster_shape(cfg: ClusterConfig, device: str = "auto") -> ClusterShape:
    shape: ClusterShape = backend(cfg).shape(cfg, device)
    return shape


def check_cluster(cfg: ClusterConfig, device: str, task_bytes: int) -> ClusterShape:
    """What ``validate`` can know: the cluster fits its machines and its extras are installed."""
    if getattr(cfg, "dashboard", None):
        _check_bokeh()
    shape: ClusterShape = backend(cfg).check(cfg, device, task_bytes)
    return shape


def _check_bokeh() -> None:
    from ..errors import PipelineError

    try:
        import bokeh  # noqa: F401
    except ImportError:
        raise PipelineError(
            "cluster.dashboard: the Dask dashboard needs the bokeh package (pip install "
            "'bokeh>=3.1'); set dashboard: null to run without it"
        ) from None


@dataclass
class Connection:
    """A connected client and what the run reports about the cluster behind it."""

    client: Client
    cfg: ClusterConfig
    shape: ClusterShape
    gpu_tasks: bool  # block tasks ask for the GPU resource: they run only on GPU workers

    @property
    def dashboard(self) -> str | None:
        """The dashboard's address: where ``cluster.dashboard`` serves one, or the scheduler
        someone else started (``address``, ``kubernetes``) offers one."""
        if hasattr(self.cfg, "dashboard"):
            return self.client.dashboard_link if self.cfg.dashboard else None
        try:
            services = self.client.scheduler_info(n_workers=0).get("services", {})
        except Exception:
            return None
        return self.client.dashboard_link if services.get("dashboard") else None

    def describe(self) -> dict[str, Any]:
        """Backend, workers, threads and GPUs seen now (for run.json; no secrets)."""
        info = self.client.scheduler_info(n_workers=-1)
        workers = list(info.get("workers", {}).values())
        described: dict[str, Any] = {
            "backend": self.cfg.kind,
            "driver_host": platform.node(),
            "workers": len(workers),
            "threads": sum(int(w.get("nthreads", 0)) for w in workers),
            "gpu_workers": sum(1 for w in workers if w.get("resources", {}).get("GPU")),
            "hosts": sorted({str(w.get("host")) for w in workers}),
            "torch_threads": self.shape.torch_threads,
        }
        tuned = self.allocator_tuned()
        if tuned:
            described["allocator_tuned_workers"] = sum(tuned.values())
        if self.cfg.kind in ("slurm", "pbs", "lsf", "sge"):
            from .jobqueue import job_ids

            described["job_ids"] = job_ids(self.client)
        return described


    def allocator_tuned(self) -> dict[str, bool]:
        """Per worker: whether the tuned allocator settings are in effect there (workers
        on a C library other than glibc are left out)."""
        found = self.client.run(allocator_tuned)
        return {address: bool(v) for address, v in found.items() if v is not None}


@contextmanager
def connect(cfg: ClusterConfig, device: str = "auto") -> Iterator[Connection]:
    """A client for the configured cluster; the cluster is stopped (or left) on exit."""
    module = backend(cfg)
    shape = module.shape(cfg, device)
    with module.start(cfg, shape, PRELOAD) as client:
        if cfg.kind == "address":
            shape = module.found_shape(cfg, client.scheduler_info(n_workers=-1))
        yield Connection(client, cfg, shape, gpu_tasks=bool(shape.gpus_per_worker) and device != "cpu")
