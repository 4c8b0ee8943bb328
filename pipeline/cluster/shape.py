"""The shape of a cluster: worker processes, Dask threads and torch threads per worker, GPUs.

A CPU worker whose threads are ``auto`` gets one Dask thread per core plus one: at most one
forward pass per core runs at once (its *compute slots*, a limit the block tasks share), so
the extra thread reads, decodes and normalises the next block and writes the last one
while every core computes. How many forward passes run at once and with how many torch
threads each is measured on a worker when the run starts (:mod:`pipeline.tuning`); the
shape only bounds it. A GPU worker runs one forward pass at a time and two threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClusterShape:
    """What a backend starts (or found): ``n_workers`` is the most that run at once."""

    kind: str
    n_workers: int
    threads_per_worker: int
    torch_threads: int | None  # None: the workers' own environment decides (kind: address)
    gpus_per_worker: int = 0
    details: tuple[str, ...] = field(default=())
    known: bool = True  # False: workers someone else starts, seen only once connected
    compute_slots: int | None = None  # forward passes a worker runs at once; None: one per thread
    cores_per_worker: int | None = None  # None: unknown here (measured on the worker)
    memory_per_worker: int | None = None  # bytes; None: unknown here

    @property
    def slots(self) -> int:
        """Forward passes one worker runs at once, at most."""
        return self.compute_slots or self.threads_per_worker

    def describe(self) -> str:
        if not self.known:
            return ", ".join((f"{self.kind}: workers as the scheduler reports them", *self.details))
        def plural(n: int, word: str, suffix: str = "s") -> str:
            return f"{n} {word}{suffix if n != 1 else ''}"

        text = (
            f"{self.kind}: {plural(self.n_workers, 'worker process', 'es')} x "
            f"{plural(self.threads_per_worker, 'thread')}"
        )
        if self.slots < self.threads_per_worker:
            text += f" (at most {plural(self.slots, 'forward pass', 'es')} at once; the other threads read and write)"
        if self.gpus_per_worker and self.torch_threads is not None:
            text += f", {plural(self.torch_threads, 'torch thread')} each"
        if self.gpus_per_worker:
            text += f", {plural(self.gpus_per_worker, 'GPU')} each"
        return ", ".join((text, *self.details))


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def split_cores(cores: int, workers: int, threads: int) -> int:
    """Torch threads per Dask thread so that workers x threads x torch threads ~ cores.

    Measured here: 2 Dask threads x 1 torch thread beat 1 x 2 by 10-25 %.
    """
    return max(1, cores // (workers * threads))


def cpu_worker_threads(cores_per_worker: int) -> tuple[int, int]:
    """``(Dask threads, compute slots)`` of a CPU worker with ``auto`` threads: one slot per
    core, and one thread more, which reads and writes while every core computes."""
    slots = max(1, cores_per_worker)
    return slots + 1, slots


def fixed_concurrency(threads_setting: int | str, found: ClusterShape) -> int:
    """Tasks a worker surely runs at once, for memory checks: its threads when the user set
    them; with ``auto``, one (the run-start tuning runs no more than its memory holds)."""
    return found.slots if threads_setting != "auto" else 1
