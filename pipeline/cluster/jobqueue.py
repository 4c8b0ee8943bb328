"""Workers as batch jobs through dask-jobqueue: what SLURM, PBS, LSF and SGE share.

Each scheduler's own module (:mod:`.slurm`, :mod:`.pbs`, :mod:`.lsf`, :mod:`.sge`) says
which jobqueue class it is and how its job header asks for cores, memory and GPUs; this
module builds the rest. The Dask scheduler runs in the driver (``pipeline run``), workers
run in jobs: ``processes`` worker processes per job (one per GPU when ``gpus_per_job`` is
set), ``threads_per_worker`` Dask threads each, torch gets the job's other cores.

The job count is kept by ``adapt``: a fixed ``jobs: N`` is ``adapt(minimum_jobs=N,
maximum_jobs=N)``, so a job that is cancelled, pre-empted or reaches its walltime is
replaced by a new one; ``worker_lifetime`` retires workers before the walltime, staggered.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client

from ..config import JobCount, JobqueueClusterConfig
from ..errors import PipelineError
from .environment import shell_exports, worker_environment
from .shape import ClusterShape, cpu_worker_threads, fixed_concurrency, split_cores

LOST_JOB_TIMEOUT = "5s"
SCHEDULER_MODULES = {"slurm": ".slurm", "pbs": ".pbs", "lsf": ".lsf", "sge": ".sge"}


def scheduler_module(kind: str) -> Any:
    return importlib.import_module(SCHEDULER_MODULES[kind], __package__)


def job_range(cfg: JobqueueClusterConfig) -> tuple[int, int]:
    if isinstance(cfg.jobs, JobCount):
        return cfg.jobs.minimum, cfg.jobs.maximum
    return cfg.jobs, cfg.jobs


def shape(cfg: JobqueueClusterConfig, device: str) -> ClusterShape:
    processes = cfg.worker_processes
    gpu = bool(cfg.gpus_per_job) and device != "cpu"
    per_worker = max(1, cfg.cores // processes)
    if cfg.threads_per_worker != "auto":
        threads = slots = int(cfg.threads_per_worker)
    elif gpu:
        threads, slots = 2, 1
    else:
        threads, slots = cpu_worker_threads(per_worker)
    low, high = job_range(cfg)
    jobs = f"{low}" if low == high else f"{low}..{high} (adaptive)"
    from dask.utils import parse_bytes

    return ClusterShape(
        cfg.kind,
        high * processes,
        threads,
        split_cores(cfg.cores, processes, threads if gpu else slots),
        1 if gpu else 0,
        details=(f"{jobs} job{'s' * (high > 1)} of {cfg.cores} cores, {cfg.memory}, {cfg.walltime}",),
        compute_slots=slots,
        cores_per_worker=per_worker,
        memory_per_worker=int(parse_bytes(cfg.memory)) // processes,
    )


def check(cfg: JobqueueClusterConfig, device: str, task_bytes: int) -> ClusterShape:
    found = shape(cfg, device)
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        raise PipelineError(
            f"cluster.kind: {cfg.kind} needs dask-jobqueue (pip install 'gigaseg-pipeline[hpc]')"
        ) from None
    if cfg.processes * found.slots > cfg.cores and not cfg.gpus_per_job:
        raise PipelineError(
            f"cluster.cores: {cfg.cores} cores per job for {cfg.processes} worker process"
            f"{'es' * (cfg.processes > 1)} x {found.threads_per_worker} thread"
            f"{'s' * (found.threads_per_worker > 1)}; expected at least "
            f"{cfg.processes * found.threads_per_worker}"
        )
    from dask.utils import parse_bytes

    per_worker = parse_bytes(cfg.memory) / cfg.worker_processes
    concurrent = fixed_concurrency(cfg.threads_per_worker, found)
    if concurrent * task_bytes > per_worker:
        raise PipelineError(
            f"cluster.memory: {cfg.memory} per job gives each of its {cfg.worker_processes} "
            f"worker{'s' * (cfg.worker_processes > 1)} {per_worker / 2**30:.1f} GiB, but "
            f"{concurrent} concurrent task{'s' * (concurrent > 1)} "
            f"of ~{task_bytes / 2**30:.1f} GiB each need more; ask for more memory or a smaller tile"
        )
    return found


def cluster_kwargs(cfg: JobqueueClusterConfig, found: ClusterShape, preload: list[str]) -> dict[str, Any]:
    """The jobqueue constructor's arguments (pure: tested against each scheduler's header)."""
    env = worker_environment(
        found.torch_threads, cfg.worker_processes, cfg.environment, cfg.allocator, cores=found.cores_per_worker
    )
    extra = [arg for name in preload for arg in ("--preload", name)]
    if found.gpus_per_worker:
        extra += ["--resources", f"GPU={found.threads_per_worker}"]
    if cfg.worker_lifetime:
        extra += ["--lifetime", cfg.worker_lifetime, "--lifetime-stagger", cfg.lifetime_stagger]
    module = scheduler_module(cfg.kind)
    kwargs: dict[str, Any] = {
        "cores": cfg.worker_processes * found.threads_per_worker,
        "processes": cfg.worker_processes,
        "memory": cfg.memory,
        "walltime": cfg.walltime,
        "queue": cfg.queue,
        "job_extra_directives": [*module.gpu_directives(cfg.gpus_per_job), *cfg.directives],
        "job_script_prologue": [*cfg.prologue, *shell_exports(env)],
        "worker_extra_args": extra,
        "python": cfg.python or sys.executable,
        "job_name": "gigaseg-worker",  # what squeue and sacct show
        "scheduler_options": {"dashboard_address": cfg.dashboard or ":0", "dashboard": cfg.dashboard is not None},
        **module.resource_kwargs(cfg),
    }
    if cfg.interface:
        kwargs["interface"] = cfg.interface
    if cfg.log_directory:
        kwargs["log_directory"] = cfg.log_directory
    return kwargs


def job_script(cfg: JobqueueClusterConfig, found: ClusterShape, preload: list[str]) -> str:
    """The job script the workers would be submitted with (``pipeline plan`` shows it)."""
    cls = scheduler_module(cfg.kind).cluster_class()
    cluster = cls(**cluster_kwargs(cfg, found, preload))
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


@contextmanager
def start(cfg: JobqueueClusterConfig, found: ClusterShape, preload: list[str]) -> Iterator[Client]:
    cls = scheduler_module(cfg.kind).cluster_class()
    logging.getLogger("distributed.deploy.adaptive").setLevel(logging.CRITICAL)
    # A job whose worker vanished (scancel, pre-emption, walltime) is written off after this
    # and replaced by adapt: 5 s instead of distributed's 15 s.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": LOST_JOB_TIMEOUT}):
        cluster = cls(**cluster_kwargs(cfg, found, preload))
    try:
        low, high = job_range(cfg)
        cluster.adapt(minimum_jobs=low, maximum_jobs=high)
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def job_ids(client: Client) -> list[str]:
    """Batch job ids of the cluster's current workers (for run.json)."""
    cluster = getattr(client, "cluster", None)
    jobs = getattr(cluster, "workers", {}) or {}
    return sorted({str(job.job_id) for job in jobs.values() if getattr(job, "job_id", None)})
