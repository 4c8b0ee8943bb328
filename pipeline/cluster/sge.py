"""``kind: sge``: workers as Grid Engine jobs (dask_jobqueue.SGECluster).

Grid Engine sites name their parallel environments and GPU resources themselves: ask for
cores with ``directives: ["-pe smp 8"]`` and for GPUs with the site's complex if
``-l gpu=N`` is not it.
"""

from __future__ import annotations

from typing import Any

from ..config import JobqueueClusterConfig


def cluster_class() -> type:
    from dask_jobqueue import SGECluster

    return SGECluster


def resource_kwargs(cfg: JobqueueClusterConfig) -> dict[str, Any]:
    """``account`` -> ``#$ -P`` (project); memory -> ``-l h_vmem`` via jobqueue's default."""
    return {"project": cfg.account}


def gpu_directives(gpus: int) -> list[str]:
    return [f"-l gpu={gpus}"] if gpus else []
