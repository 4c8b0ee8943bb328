"""The environment every worker process starts with, whatever the backend.

Thread pools (OpenMP, MKL, OpenBLAS) size themselves when the process starts, and
allocator settings (``GLIBC_TUNABLES``, ``MALLOC_*``) are read by the C library before any
Python runs, so both must be in the environment of the worker before it starts: the
nanny's ``pre-spawn-environ`` on a local cluster (its ``env`` is set inside the running
worker: too late for the C library), ``export`` lines in a jobqueue job script before
``dask worker`` starts, ``env`` of a Kubernetes pod. The user's ``cluster.environment``
comes last and wins.

**Allocator settings** (``cluster.allocator: tuned``, the default). glibc's malloc serves
every large activation (tens to hundreds of MB) from fresh ``mmap`` pages and unmaps it when
freed, so each forward pass page-faults its whole working set again; and a thread other
than the main one (every Dask task runs in one) allocates from its own arena, whose heaps
are at most 64 MiB, so its large blocks are ``mmap``-ed whatever the thresholds say. The
tuned settings keep freed memory in the heap (mmap and trim thresholds at their maximum)
and give every thread the main arena (``arena_max=1``): measured on a U-Net forward pass
in two worker threads, 1.5x the throughput of glibc's defaults and a tenth of the page
faults (docs/benchmarks.md). The cost: a worker keeps its peak heap instead of returning
it between blocks, which is the memory its next block needs anyway. Other C libraries
(musl) ignore these variables.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Literal

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
TORCH_THREADS = "PIPELINE_TORCH_THREADS"  # read by pipeline.worker_preload
WORKERS_ON_NODE = "PIPELINE_WORKERS_ON_NODE"  # GPU slots of this node (see .gpus)
CORES = "PIPELINE_CORES"  # cores a worker's forward passes may use (a pod's limit, a job's share)

KEEP = str(2**32 - 1)
TUNED_TUNABLES = {
    "glibc.malloc.mmap_threshold": KEEP,
    "glibc.malloc.trim_threshold": KEEP,
    "glibc.malloc.arena_max": "1",
}
# distributed's nanny puts MALLOC_TRIM_THRESHOLD_=65536 in every worker's environment
# (distributed.nanny.pre-spawn-environ). glibc 2.36 lets GLIBC_TUNABLES win over it; the same
# value is set here so that no glibc, whichever it lets win, undoes the tuned trim threshold.
TUNED_VARIABLES = {"MALLOC_TRIM_THRESHOLD_": KEEP}

Allocator = Literal["tuned", "system"]


def worker_environment(
    torch_threads: int | None,
    workers_on_node: int,
    user: Mapping[str, str],
    allocator: Allocator = "tuned",
    inherited: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> dict[str, str]:
    """Variables every worker process starts with; ``user`` (``cluster.environment``) wins.

    ``inherited``: the environment the workers inherit besides these (a local cluster's:
    the driver's), whose own ``GLIBC_TUNABLES`` entries are kept over the tuned ones.
    """
    env: dict[str, str] = {}
    if torch_threads is not None:
        env |= {name: str(torch_threads) for name in THREAD_VARIABLES}
        env[TORCH_THREADS] = str(torch_threads)
    env[WORKERS_ON_NODE] = str(workers_on_node)
    if cores is not None:
        env[CORES] = str(cores)
    if allocator == "tuned":
        env |= allocator_environment((inherited or {}).get("GLIBC_TUNABLES", ""))
    return env | dict(user)


def allocator_environment(existing_tunables: str = "") -> dict[str, str]:
    """The tuned allocator variables, merged under the tunables already set (theirs win)."""
    theirs = parse_tunables(existing_tunables)
    merged = TUNED_TUNABLES | theirs
    return {"GLIBC_TUNABLES": ":".join(f"{k}={v}" for k, v in merged.items()), **TUNED_VARIABLES}


def parse_tunables(text: str) -> dict[str, str]:
    """``a=1:b=2`` -> ``{"a": "1", "b": "2"}`` (entries without ``=`` are dropped, as glibc does)."""
    pairs = (item.split("=", 1) for item in text.split(":") if "=" in item)
    return {name: value for name, value in pairs if name}


def split_spawn_variables(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(read when a process starts, the rest)``: the C library reads its allocator
    variables (and the loader ``LD_PRELOAD``) before any Python runs, so a nanny must put
    them in the environment it spawns the worker with (``distributed.nanny.pre-spawn-environ``);
    its ``env`` is set inside the worker once it runs, too late for them."""
    spawn = {k: v for k, v in env.items() if k in ("GLIBC_TUNABLES", "LD_PRELOAD") or k.startswith("MALLOC_")}
    return spawn, {k: v for k, v in env.items() if k not in spawn}


def shell_exports(env: Mapping[str, str]) -> list[str]:
    """``export NAME=value`` lines for a job script, quoted for the shell."""
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
