"""``kind: slurm``: workers as SLURM jobs (dask_jobqueue.SLURMCluster)."""

from __future__ import annotations

from typing import Any

from ..config import JobqueueClusterConfig


def cluster_class() -> type:
    from dask_jobqueue import SLURMCluster

    return SLURMCluster


def resource_kwargs(cfg: JobqueueClusterConfig) -> dict[str, Any]:
    """``account`` -> ``#SBATCH -A``; the job's cores -> ``--cpus-per-task`` (job_cpu)."""
    return {"account": cfg.account, "job_cpu": cfg.cores}


def gpu_directives(gpus: int) -> list[str]:
    return [f"--gres=gpu:{gpus}"] if gpus else []
