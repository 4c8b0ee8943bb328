"""``kind: pbs``: workers as PBS Pro / OpenPBS / Torque jobs (dask_jobqueue.PBSCluster)."""

from __future__ import annotations

from typing import Any

from ..config import JobqueueClusterConfig


def cluster_class() -> type:
    from dask_jobqueue import PBSCluster

    return PBSCluster


def resource_kwargs(cfg: JobqueueClusterConfig) -> dict[str, Any]:
    """``account`` -> ``#PBS -A``; cores, memory and GPUs -> ``-l select=1:ncpus=..:mem=..:ngpus=..``."""
    spec = f"select=1:ncpus={cfg.cores}:mem={cfg.memory}"
    if cfg.gpus_per_job:
        spec += f":ngpus={cfg.gpus_per_job}"
    return {"account": cfg.account, "resource_spec": spec}


def gpu_directives(gpus: int) -> list[str]:
    return []  # in the select statement above
