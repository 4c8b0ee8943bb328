"""Choose how a worker runs its forward passes by measuring them where blocks will run.

Nothing here changes which tile owns which pixel; it decides how fast they are computed:

* on CPUs, how many forward passes a worker runs at once (``slots``) and with how many
  torch threads each: every split ``slots x threads = cores`` the worker's shape and memory
  allow (2 cores: 2 x 1 and 1 x 2). Conv nets usually scale better over concurrent passes
  than over intra-op threads, but not always (memory bandwidth, a model with few large
  layers), so it is measured, not assumed;
* the memory format (``inference.channels_last: auto``): NHWC is 1.6-1.9x faster for the
  built-in networks on CPUs here, but not for every model and device.

Measured in the worker that runs the blocks (its allocator settings, cores and device), on
a calibration input of about :data:`CALIBRATION_PIXELS` (the fastest CPU tiles are about this
size, docs/benchmarks.md): a warm-up pass, then one timed pass per concurrent slot. The choice is cached per machine (CPU model
or GPU name, cores, torch version), model, tile and precision (:mod:`pipeline.io.cache`), so
only the first run of a model on a machine pays for it, a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .cluster.environment import CORES, WORKERS_ON_NODE
from .config import InferenceConfig, ModelConfig
from .inference import cached_module, worker_index
from .io import cache, fs
from .runtime import Runtime, forward
from .tiling import NetworkGeometry

CALIBRATION_PIXELS = 1024 * 1024  # the calibration input's area, at most
CACHE_NAME = "runtime-tuning"


@dataclass(frozen=True)
class Limits:
    """What bounds the choice on a worker: ``cores`` None means the worker's own count."""

    max_slots: int
    cores: int | None
    task_bytes: int  # estimated peak of one block task
    memory_bytes: int | None  # what the worker's concurrent tasks may use; None: unknown
    gpu_threads: int | None = None  # torch threads of a GPU worker's passes (CPU-side work)


@dataclass(frozen=True)
class RuntimeChoice:
    slots: int
    torch_threads: int
    channels_last: bool
    measured: tuple[tuple[str, float], ...] = ()  # candidate -> MPx/s of its output pixels
    source: str = "configured"  # configured | measured | cached

    def describe(self) -> str:
        what = (
            f"{self.slots} forward pass{'es' * (self.slots > 1)} at a time x {self.torch_threads} "
            f"torch thread{'s' * (self.torch_threads > 1)}, "
            f"{'channels_last' if self.channels_last else 'contiguous (NCHW)'}"
        )
        if self.source == "configured" or not self.measured:
            return f"{what} (as configured)"
        rates = ", ".join(f"{name} {rate:.2f}" for name, rate in self.measured)
        note = "measured on a worker" if self.source == "measured" else "measured earlier on this machine (cached)"
        return f"{what}: {note}, MPx/s {rates}" if len(self.measured) > 1 else f"{what}: {note}"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def splits(cores: int, max_slots: int) -> list[tuple[int, int]]:
    """Candidate ``(slots, torch threads)``: 1, 2, 4, ... threads and all cores, as many
    slots as fit ``slots x threads <= cores`` and ``max_slots``; the most slots first."""
    threads = sorted({2**i for i in range(int(math.log2(max(1, cores))) + 1)} | {max(1, cores)})
    found: list[tuple[int, int]] = []
    for t in threads:
        split = (max(1, min(max_slots, cores // t)), t)
        if split not in found:
            found.append(split)
    return found


def max_slots_for_memory(limits: Limits) -> int:
    if limits.memory_bytes is None or limits.task_bytes <= 0:
        return limits.max_slots
    return max(1, min(limits.max_slots, limits.memory_bytes // limits.task_bytes))


def choose_runtime(
    model: ModelConfig,
    inference: InferenceConfig,
    geometry: NetworkGeometry,
    limits: Limits,
    storage: fs.StorageRules | None = None,
) -> RuntimeChoice:
    """On a worker: the runtime its block tasks will use (see the module docstring).

    ``storage``: the run's storage options (a model file in a store is read with them)."""
    if storage is not None:
        fs.use_rules(storage)
    runtime = Runtime.from_config(inference, worker_index())
    cores = limits.cores or worker_cores()
    slots_cap = 1 if runtime.cuda else max_slots_for_memory(limits)
    formats = (True, False) if inference.channels_last == "auto" else (bool(inference.channels_last),)
    if runtime.cuda:
        candidates = [(1, limits.gpu_threads or max(1, cores // 2))]
    elif inference.torch_threads != "auto":
        threads = int(inference.torch_threads)
        candidates = [(max(1, min(slots_cap, cores // threads)), threads)]
    else:
        candidates = splits(cores, slots_cap)
    if len(formats) == 1 and len(candidates) == 1:
        slots, threads = candidates[0]
        return RuntimeChoice(slots, threads, formats[0])
    key = _cache_key(model, runtime, geometry, cores, slots_cap, formats)
    cached = cache.lookup(CACHE_NAME, key)
    if isinstance(cached, dict):
        try:
            return RuntimeChoice(**{**cached, "measured": tuple(map(tuple, cached["measured"])), "source": "cached"})
        except (TypeError, KeyError):
            pass
    size = calibration_size(geometry)
    choice = _measure(model, inference, geometry, size, candidates, formats)
    cache.store(CACHE_NAME, key, {**choice.as_dict(), "source": "measured"})
    return choice


def calibration_size(geometry: NetworkGeometry) -> int:
    """The largest legal input edge within CALIBRATION_PIXELS: the same for every image and
    tile, so a measurement cached for a model serves all its runs on the machine."""
    target = round(CALIBRATION_PIXELS ** (1 / geometry.dims))  # a cube for a 3D network
    size = geometry.size_min
    while size + geometry.size_step <= target and (geometry.size_max is None or size + geometry.size_step <= geometry.size_max):
        size += geometry.size_step
    return size


def _measure(
    model: ModelConfig,
    inference: InferenceConfig,
    geometry: NetworkGeometry,
    size: int,
    candidates: list[tuple[int, int]],
    formats: tuple[bool, ...],
) -> RuntimeChoice:
    """Formats first at the most concurrent split, then the splits in the faster format."""
    out_pixels = (size - 2 * geometry.trim) ** geometry.dims
    shape = (1, model.in_channels) + (size,) * geometry.dims
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    measured: list[tuple[str, float]] = []

    def rate(slots: int, threads: int, channels_last: bool) -> float:
        runtime = Runtime.from_config(inference.model_copy(update={"channels_last": channels_last}), worker_index())
        module = cached_module(model, runtime, threads)
        torch.set_num_threads(threads)
        seconds = _concurrent_pass(module, x, runtime, slots)
        value = slots * out_pixels / seconds / 1e6
        fmt = "NHWC" if channels_last else "NCHW"
        measured.append((f"{slots}x{threads} {fmt}", round(value, 3)))
        return value

    first = candidates[0]
    by_format = {fmt: rate(*first, fmt) for fmt in formats}
    channels_last = max(by_format, key=lambda f: by_format[f])
    by_split = {first: by_format[channels_last]}
    for split in candidates[1:]:
        by_split[split] = rate(*split, channels_last)
    slots, threads = max(by_split, key=lambda s: by_split[s])
    return RuntimeChoice(slots, threads, channels_last, tuple(measured), "measured")


def _concurrent_pass(module: torch.nn.Module, x: np.ndarray, runtime: Runtime, slots: int) -> float:
    """Seconds for ``slots`` threads to run one pass each at once, after a warm-up pass each."""
    barrier = threading.Barrier(slots + 1)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            forward(module, x, runtime)  # warm-up: kernels chosen, memory grown
            barrier.wait()
            forward(module, x, runtime)
            barrier.wait()
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, name=f"pipeline-tune-{i}") for i in range(slots)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
        start = time.perf_counter()
        barrier.wait()
        seconds = time.perf_counter() - start
    except threading.BrokenBarrierError:
        seconds = float("nan")
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return seconds


def worker_cores() -> int:
    """Cores this worker may use: ``PIPELINE_CORES`` where the backend (or a job script, a
    pod spec) says, else the process's CPU affinity shared by the workers on its node."""
    declared = os.environ.get(CORES, "")
    if declared.isdigit() and int(declared) > 0:
        return int(declared)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    on_node = os.environ.get(WORKERS_ON_NODE, "1")
    return max(1, cores // max(1, int(on_node) if on_node.isdigit() else 1))


def machine() -> dict[str, object]:
    """What makes a measurement valid elsewhere: processor (or GPU), torch, allocator."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cache.cpu_model(),
        "gpu": gpu,
        "torch": torch.__version__,
        "tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def _cache_key(
    model: ModelConfig,
    runtime: Runtime,
    geometry: NetworkGeometry,
    cores: int,
    slots_cap: int,
    formats: tuple[bool, ...],
) -> str:
    identity = {
        "machine": machine(),
        "model": model.model_dump(mode="json", exclude={"storage_options", "normalize"}),
        "device": runtime.device.split(":")[0],
        "precision": runtime.precision,
        "tta": runtime.tta,
        "size": calibration_size(geometry),
        "cores": cores,
        "slots": slots_cap,
        "formats": formats,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
