"""Which GPU each worker process owns: pure functions, no torch, no Dask.

A node with G GPUs runs G worker processes (local: ``n_workers``; jobqueue: ``processes``
per job; Kubernetes: one pod per GPU). Each worker learns its slot on the node from its
name (``dask worker --nworkers N --name job`` names them ``job-0 .. job-(N-1)``; a local
cluster names them ``0 .. N-1``) and narrows ``CUDA_VISIBLE_DEVICES`` to one device before
CUDA starts, so two workers never share ``cuda:0``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def assign_devices(visible: Sequence[str], n_workers: int) -> list[str]:
    """The device each of ``n_workers`` local workers owns, from the node's visible devices.

    More workers than GPUs share them round robin (the caller warns: the backends never
    ask for that); fewer leave GPUs idle.
    """
    if not visible:
        return [""] * n_workers
    return [visible[i % len(visible)] for i in range(n_workers)]


def worker_slot(name: object) -> int | None:
    """A worker's slot on its node from its Dask name: ``3`` -> 3, ``"job-1"`` -> 1."""
    if isinstance(name, int) and not isinstance(name, bool):
        return name
    if isinstance(name, str):
        match = re.fullmatch(r"(?:.*-)?(\d+)", name)
        if match:
            return int(match.group(1))
    return None


def visible_devices(environ_value: str | None) -> list[str]:
    """Parse ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs, comma separated; empty: none)."""
    if not environ_value:
        return []
    return [d.strip() for d in environ_value.split(",") if d.strip()]


def device_for_worker(name: object, visible: Sequence[str], workers_on_node: int) -> str | None:
    """The one device this worker should see, or None when no narrowing applies.

    Nothing to narrow with one visible device (the scheduler already pinned it) or none.
    A worker whose name carries no slot keeps what it sees: the caller reports it.
    """
    if len(visible) <= 1:
        return None
    slot = worker_slot(name)
    if slot is None:
        return None
    return assign_devices(visible, max(workers_on_node, slot + 1))[slot]
