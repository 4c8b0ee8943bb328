"""The environment every worker process starts with, whatever the backend.

Thread pools (OpenMP, MKL, OpenBLAS) size themselves when the process starts, and
allocator settings (``GLIBC_TUNABLES``, ``MALLOC_*``) are read by the C library before any
Python runs, so both must be in the environment of the worker before it starts: the
nanny's ``pre-spawn-environ`` on a local cluster, ``export`` lines in a jobqueue job
script, ``env`` of a Kubernetes pod. The user's ``cluster.environment`` comes last and wins.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
TORCH_THREADS = "PIPELINE_TORCH_THREADS"  # read by pipeline.worker_preload
WORKERS_ON_NODE = "PIPELINE_WORKERS_ON_NODE"  # GPU slots of this node (see .gpus)


def worker_environment(
    torch_threads: int | None, workers_on_node: int, user: Mapping[str, str]
) -> dict[str, str]:
    env: dict[str, str] = {}
    if torch_threads is not None:
        env |= {name: str(torch_threads) for name in THREAD_VARIABLES}
        env[TORCH_THREADS] = str(torch_threads)
    env[WORKERS_ON_NODE] = str(workers_on_node)
    return env | dict(user)


def shell_exports(env: Mapping[str, str]) -> list[str]:
    """``export NAME=value`` lines for a job script, quoted for the shell."""
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
