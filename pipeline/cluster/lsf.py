"""``kind: lsf``: workers as IBM Spectrum LSF jobs (dask_jobqueue.LSFCluster)."""

from __future__ import annotations

from typing import Any

from ..config import JobqueueClusterConfig


def cluster_class() -> type:
    from dask_jobqueue import LSFCluster

    return LSFCluster


def resource_kwargs(cfg: JobqueueClusterConfig) -> dict[str, Any]:
    """``account`` -> ``#BSUB -P`` (project); the job's cores -> ``#BSUB -n`` (ncpus)."""
    return {"project": cfg.account, "ncpus": cfg.cores}


def gpu_directives(gpus: int) -> list[str]:
    return [f'-gpu "num={gpus}"'] if gpus else []
