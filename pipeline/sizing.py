"""The memory side of a plan: what one block task needs, what it may use, which tile fits.

A block task holds its source read box (raw and normalised), the batch handed to the
network, the network's own tensors (measured on the model, :mod:`pipeline.models.footprint`)
and the labels. It may use ``tiling.memory_share`` of its worker's memory divided among the
forward passes the worker runs at once (on a GPU: of the device's free memory, one pass at
a time). ``tiling.tile: auto`` takes the fastest tile within that (:mod:`pipeline.autotile`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil

from .autotile import CPU_PASS_LIMIT, TileBudget, TileChoice, choose_tile
from .cluster import ClusterShape
from .config import DeclaredGeometry, Workflow
from .io.images import ImageReader
from .models.footprint import SMALL_EDGE, FootprintProbe
from .models.loading import LoadedModel
from .tiling import NetworkGeometry, TilePlan, plan_tiles


@dataclass
class TaskMemory:
    """Peak bytes of one block task of ``batch`` tiles, by the tiles' read shape."""

    probe: FootprintProbe | None
    channels: int
    itemsize: int
    batch: int

    def bytes_at(self, read_shape: tuple[int, ...]) -> float | None:
        usage = self.probe(self.batch, max(read_shape)) if self.probe is not None else None
        if usage is None:
            return None
        pixels = self.batch * math.prod(read_shape)
        source = pixels * self.channels * (self.itemsize + 4)  # raw read box and its float copy
        batch = pixels * self.channels * 4 * 2  # stacked tiles, and their channels_last copy
        labels = pixels * 8  # argmax indices before the cast to the label dtype
        return source + batch + usage.peak + labels

    def largest_at(self, read_shape: tuple[int, ...]) -> float | None:
        usage = self.probe(self.batch, max(read_shape)) if self.probe is not None else None
        return None if usage is None else usage.largest

    def pass_at(self, read_shape: tuple[int, ...]) -> float | None:
        """Live tensors of one forward pass (the whole batch)."""
        usage = self.probe(self.batch, max(read_shape)) if self.probe is not None else None
        return None if usage is None else usage.live


@dataclass(frozen=True)
class Budget:
    task_bytes: int  # what one block task may use
    slots: int  # forward passes the whole cluster runs at once
    source: str  # how it was derived, for the plan
    on_gpu: bool = False


def task_memory(image: ImageReader, model: LoadedModel, batch: int) -> TaskMemory:
    probe = FootprintProbe(model.module, model.in_channels, small_edge(model.geometry), dims=model.geometry.dims)
    return TaskMemory(probe, image.channels, image.dtype.itemsize, batch)


def small_edge(geometry: NetworkGeometry) -> int:
    """A legal input edge near SMALL_EDGE (for models measured on the CPU; a cube of about
    as many voxels as SMALL_EDGE's square has pixels for a 3D network)."""
    target = SMALL_EDGE if geometry.dims == 2 else round(SMALL_EDGE ** (2 / geometry.dims))
    size = geometry.size_min
    while size < target and (geometry.size_max is None or size + geometry.size_step <= geometry.size_max):
        size += geometry.size_step
    return size


def worker_memory_budget(wf: Workflow, shape: ClusterShape) -> int | None:
    """Bytes of a worker's memory its tasks may use together (``tiling.memory_share``); None
    where the cluster does not say how much memory a worker has."""
    if shape.memory_per_worker is None:
        return None
    return int(shape.memory_per_worker * wf.tiling.memory_share)


def task_budget(wf: Workflow, shape: ClusterShape) -> Budget:
    """Bytes one block task may use, and the forward passes the cluster runs at once."""
    share = wf.tiling.memory_share
    slots = max(1, shape.n_workers * shape.slots)
    free_gpu = _free_gpu_memory(wf.inference.device) if shape.gpus_per_worker else None
    if free_gpu is not None:
        return Budget(int(free_gpu * share), slots, f"{share:.0%} of {_gib(free_gpu)} free GPU memory", True)
    if shape.memory_per_worker is not None:
        per_worker, whose = shape.memory_per_worker, "per worker"
    else:
        per_worker, whose = psutil.virtual_memory().total, "of this machine (worker memory unknown)"
    per_task = per_worker * share / shape.slots
    text = f"{share:.0%} of {_gib(per_worker)} {whose}"
    if shape.slots > 1:
        text += f" / {shape.slots} forward passes at once"
    return Budget(int(per_task), slots, text)


def choose_plan(
    wf: Workflow,
    image: ImageReader,
    model: LoadedModel,
    batch: int,
    shape: ClusterShape,
    kept_tile: int | None = None,
) -> tuple[TilePlan, TileChoice | None, TaskMemory]:
    """The tile plan: the workflow's tile, or with ``auto`` the fastest that fits, or
    ``kept_tile``, the one an interrupted run of this volume chose (its resume keeps it)."""
    cfg = wf.model
    halo = None if isinstance(cfg, DeclaredGeometry) or cfg.halo == "auto" else int(cfg.halo)
    memory = task_memory(image, model, batch)
    planes = max(0, len(image.shape) - model.geometry.dims)  # a stack: plane by plane

    def tile_shape(edge: int) -> tuple[int, ...]:
        return (1,) * planes + (edge,) * (len(image.shape) - planes)

    choice = None
    if wf.tiling.tile == "auto" and kept_tile is not None:
        tile = kept_tile
        choice = TileChoice(tile, None, "the choice of the interrupted run (kept for --resume)")
    elif wf.tiling.tile == "auto":
        budget = task_budget(wf, shape)
        choice = choose_tile(
            image.shape[planes:],
            model.geometry,
            TileBudget(
                memory=budget.task_bytes,
                task_bytes=lambda edge: memory.bytes_at(tile_shape(edge)),
                largest_bytes=lambda edge: memory.largest_at(tile_shape(edge)),
                slots=budget.slots,
                pass_bytes=lambda edge: memory.pass_at(tile_shape(edge)),
                pass_limit=None if budget.on_gpu else CPU_PASS_LIMIT,
            ),
            batch_size=batch,
            halo=halo,
        )
        tile = choice.tile
    else:
        tile = int(wf.tiling.tile)
    plan = plan_tiles(
        image.shape, model.geometry, tile=tile, mirror=wf.tiling.mirror, batch_size=batch, halo=halo,
        plane_axes=planes,
    )  # fmt: skip
    return plan, choice, memory


def estimate_task_bytes(plan: TilePlan, memory: TaskMemory) -> int | None:
    """Peak bytes of one block task of ``plan`` (None: the model's memory is unknown)."""
    value = memory.bytes_at(plan.read_shape)
    return None if value is None else int(value)


def _free_gpu_memory(device: str) -> int | None:
    """Free bytes of the GPU this machine would run on, when torch sees one here."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    free, _ = torch.cuda.mem_get_info(index)
    return int(free)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"

