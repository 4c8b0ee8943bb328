"""``kind: address``: join a Dask scheduler that someone else started.

For users who start ``dask scheduler`` and ``dask worker`` themselves, e.g. with ``srun``
inside one batch allocation (``cluster/slurm/pipeline.sbatch``). The workers' shape is
theirs: the run reads it from the scheduler. They should start with
``--preload pipeline.worker_preload`` (GPU pinning, thread counts, Ctrl-C handling); GPU
workers should declare ``--resources GPU=2`` so that block tasks go only to them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from distributed import Client

from ..config import AddressClusterConfig
from ..errors import PipelineError
from ..io import fs
from .shape import ClusterShape

CONNECT_TIMEOUT = "30s"


def where(cfg: AddressClusterConfig) -> str:
    return cfg.address or f"scheduler file {cfg.scheduler_file}"


def shape(cfg: AddressClusterConfig, device: str) -> ClusterShape:
    """Before connecting nothing is known of the workers; :func:`found_shape` tells after."""
    details = (f"scheduler {where(cfg)}", f"waits for {cfg.wait_for_workers}")
    return ClusterShape("address", cfg.wait_for_workers, 1, None, details=details, known=False)


def check(cfg: AddressClusterConfig, device: str, task_bytes: int) -> ClusterShape:
    if cfg.scheduler_file is not None and not fs.is_file(cfg.scheduler_file):
        raise PipelineError(
            f"cluster.scheduler_file: {cfg.scheduler_file} does not exist; start the scheduler "
            f"with `dask scheduler --scheduler-file {cfg.scheduler_file}` first"
        )
    return shape(cfg, device)


def found_shape(cfg: AddressClusterConfig, info: dict[str, Any]) -> ClusterShape:
    """The shape of the workers the scheduler reports (``client.scheduler_info()``)."""
    workers = list(info.get("workers", {}).values())
    threads = max((int(w.get("nthreads", 1)) for w in workers), default=1)
    gpu = sum(1 for w in workers if w.get("resources", {}).get("GPU"))
    return ClusterShape(
        "address", len(workers), threads, None, 1 if gpu else 0, details=(f"scheduler {where(cfg)}",)
    )


@contextmanager
def start(cfg: AddressClusterConfig, found: ClusterShape, preload: list[str]) -> Iterator[Client]:
    try:
        if cfg.scheduler_file is not None:
            client = Client(scheduler_file=cfg.scheduler_file, timeout=CONNECT_TIMEOUT)
        else:
            client = Client(cfg.address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise PipelineError(
            f"cluster: cannot reach the Dask scheduler at {where(cfg)} within {CONNECT_TIMEOUT} "
            f"({type(exc).__name__}); is `dask scheduler` running there?"
        ) from None
    try:
        _wait_for_workers(client, cfg)
        yield client
    finally:
        client.close()


def _wait_for_workers(client: Client, cfg: AddressClusterConfig) -> None:
    from dask.utils import parse_timedelta

    limit = parse_timedelta(cfg.worker_timeout)
    deadline = time.monotonic() + limit
    while len(client.scheduler_info(n_workers=-1)["workers"]) < cfg.wait_for_workers:
        if time.monotonic() > deadline:
            have = len(client.scheduler_info(n_workers=-1)["workers"])
            raise PipelineError(
                f"cluster: the scheduler at {where(cfg)} has {have} worker{'s' * (have != 1)} "
                f"after {cfg.worker_timeout}; expected at least {cfg.wait_for_workers} "
                f"(cluster.wait_for_workers); start `dask worker` processes against it"
            )
        time.sleep(0.5)
