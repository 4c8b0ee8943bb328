"""``kind: kubernetes``: a ``DaskCluster`` resource through the Dask Kubernetes operator.

The operator (installed in the cluster by its Helm chart) turns the ``DaskCluster`` into a
scheduler pod and ``n_workers`` worker pods; the driver runs where ``pipeline run`` runs
(usually a Job in the same namespace, ``cluster/kubernetes/``). dask-kubernetes is an
optional extra (``pip install 'gigaseg-pipeline[kubernetes]'``), imported only here and only
when this kind is used. A GPU worker pod asks for one ``nvidia.com/gpu``: the device plugin
pins it to that GPU, so the pod sees exactly one device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from distributed import Client

from ..config import KubernetesClusterConfig
from ..errors import PipelineError, first_line
from .environment import worker_environment
from .shape import ClusterShape, cpu_worker_threads, split_cores


def _cores(cpu: str) -> int:
    return max(1, int(float(cpu[:-1]) / 1000) if cpu.endswith("m") else int(float(cpu)))


def _memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``8Gi``, ``512M``, ``1000``) in bytes."""
    from dask.utils import parse_bytes

    return int(parse_bytes(quantity + "B" if quantity.endswith("i") else quantity))


def shape(cfg: KubernetesClusterConfig, device: str) -> ClusterShape:
    gpu = bool(cfg.gpus_per_worker) and device != "cpu"
    cores = _cores(cfg.resources.cpu)
    if cfg.threads_per_worker != "auto":
        threads = slots = int(cfg.threads_per_worker)
    elif gpu:
        threads, slots = 2, 1
    else:
        threads, slots = cpu_worker_threads(cores)
    return ClusterShape(
        "kubernetes",
        cfg.n_workers,
        threads,
        split_cores(cores, 1, threads if gpu else slots),
        1 if gpu else 0,
        details=(f"DaskCluster {cfg.name} in namespace {cfg.namespace or '(current)'}, image {cfg.image}",),
        compute_slots=slots,
        cores_per_worker=cores,
        memory_per_worker=_memory_bytes(cfg.resources.memory),
    )


def check(cfg: KubernetesClusterConfig, device: str, task_bytes: int) -> ClusterShape:
    _operator()
    return shape(cfg, device)


def _operator() -> Any:
    try:
        from dask_kubernetes import operator
    except ImportError:
        raise PipelineError(
            "cluster.kind: kubernetes needs dask-kubernetes (pip install "
            "'gigaseg-pipeline[kubernetes]') and the Dask operator in the cluster"
        ) from None
    return operator


def cluster_spec(cfg: KubernetesClusterConfig, found: ClusterShape, preload: list[str]) -> dict[str, Any]:
    """The ``DaskCluster`` resource: the operator's own spec, shaped for this pipeline."""
    env = worker_environment(found.torch_threads, 1, cfg.environment, cfg.allocator, cores=found.cores_per_worker)
    limits = {"cpu": cfg.resources.cpu, "memory": cfg.resources.memory}
    spec: dict[str, Any] = _operator().make_cluster_spec(
        cfg.name,
        image=cfg.image,
        n_workers=cfg.n_workers,
        resources={"requests": dict(limits), "limits": dict(limits)},
        env=env,
    )
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    worker["args"] += ["--nthreads", str(found.threads_per_worker)]
    worker["args"] += [arg for name in preload for arg in ("--preload", name)]
    if found.gpus_per_worker:
        worker["resources"]["limits"]["nvidia.com/gpu"] = str(cfg.gpus_per_worker)
        worker["args"] += ["--resources", f"GPU={found.threads_per_worker}"]
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    scheduler["env"] = [e for e in scheduler.get("env", []) if e["name"] in cfg.environment]
    scheduler["resources"] = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    if cfg.namespace:
        spec["metadata"]["namespace"] = cfg.namespace
    return spec


@contextmanager
def start(cfg: KubernetesClusterConfig, found: ClusterShape, preload: list[str]) -> Iterator[Client]:
    operator = _operator()
    try:
        cluster = operator.KubeCluster(
            custom_cluster_spec=cluster_spec(cfg, found, preload),
            namespace=cfg.namespace,
            shutdown_on_close=True,
            quiet=True,
        )
    except Exception as exc:  # kr8s / the operator: no credentials, no CRD, no permission
        # dask-kubernetes would try (and fail, with a traceback) to delete it again at exit
        getattr(operator.KubeCluster, "_instances", set()).clear()
        raise PipelineError(
            f"cluster: cannot create DaskCluster {cfg.name} in namespace "
            f"{cfg.namespace or '(current)'}: {type(exc).__name__}: {first_line(exc)}; "
            f"kind: kubernetes needs access to a Kubernetes cluster (a kubeconfig, or a "
            f"service account in a pod) where the Dask operator is installed"
        ) from None
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
