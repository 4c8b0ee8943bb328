"""``tiling.tile: auto``: the write box that computes an image fastest within a memory budget (pure).

Three things decide it:

* **the halo's cost**: a tile computes its read box, ``(T + 2c)^2`` pixels for a ``T^2``
  write box, so larger tiles waste less on context (a U-Net's 112 px context costs 1.49x at
  1024 px, 1.23x at 2048);
* **memory**: one block task (its batch of tiles) must fit the budget a worker gives each
  task, no single tensor may reach :data:`ACTIVATION_LIMIT` (CPU convolutions fall to a
  slow kernel there, DESIGN.md), and on CPUs one forward pass's live tensors stay within
  :data:`CPU_PASS_LIMIT` (measured: larger passes lose more to memory than they save on
  the halo); all measured on the model at each candidate size;
* **parallelism**: the cluster runs ``slots`` forward passes at once; four blocks on three
  slots take two rounds, so a tile that leaves slots idle in the last round loses.

Candidates are legal tile sizes (multiples of the tile multiple whose read box is a legal
input) up to the image; among those that fit, the one with the smallest estimated time
(the busiest slot's pixels, plus a fixed cost per block) wins, and of tiles within 2% of it
the smallest (less memory: a model with a small halo would otherwise take ever larger tiles
for ever larger images, for a saving of a few per mille).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import TilingError
from .tiling import (
    NetworkGeometry,
    axis_tiles,
    block_arrangement,
    context_for,
    fits,
    needed_context,
    round_up,
)

ACTIVATION_LIMIT = 2**31  # bytes of one tensor: CPU kernels fall to a slow path at and beyond it
# Live tensors of one forward pass on a CPU, at most. Measured here (docs/benchmarks.md,
# "Forward passes as a CPU worker runs them"), two passes at once on 2 cores, MPx/s of image
# pixels (the halo's cost counted) by read box and live tensors per pass:
#   U-Net (width 16):         736 px 0.25 GiB 1.21 | 1248 px 0.69 GiB 1.69 | 1760 px 1.37 GiB 1.94 | 2272 px 2.29 GiB 1.69
#   dilated net (32 ch):      582 px 0.12 GiB 1.17 | 1094 px 0.43 GiB 1.35 | 1606 px 0.93 GiB 1.36 | 2118 px 1.62 GiB 1.12
# Past about a GiB per pass the tensors stream through memory and the halo's saving is lost
# (the dilated net earlier than the U-Net), while the worker's memory grows with the square of
# the tile. 1 GiB keeps both within about 10% of their fastest tile at half their memory.
CPU_PASS_LIMIT = 1 << 30
BLOCK_COST_PIXELS = 128 * 128  # a block task's fixed cost (scheduling, reads, writes) in pixels
UNKNOWN_MEMORY_TILE = 1024  # the largest tile when the model's memory cannot be measured
MAX_CANDIDATES = 512
TOLERANCE = 0.02  # estimated times this close count as equal


@dataclass(frozen=True)
class TileBudget:
    """What the tile must fit: ``task_bytes(edge)`` and ``largest_bytes(edge)`` are one block
    task's peak bytes and largest tensor when its tiles' read boxes are ``edge`` pixels wide
    (None: unknown); ``memory`` is what one task may use; ``slots`` the forward passes the
    cluster runs at once."""

    memory: int
    task_bytes: Callable[[int], float | None]
    largest_bytes: Callable[[int], float | None]
    slots: int = 1
    activation_limit: int = ACTIVATION_LIMIT
    pass_bytes: Callable[[int], float | None] | None = None  # live tensors of one forward pass
    pass_limit: int | None = None  # CPU_PASS_LIMIT on CPUs; None on GPUs


@dataclass(frozen=True)
class TileChoice:
    tile: int
    task_bytes: float | None  # estimated peak of one block task
    limit: str  # why not larger


def choose_tile(
    image_shape: tuple[int, ...],
    geometry: NetworkGeometry,
    budget: TileBudget,
    batch_size: int = 1,
    halo: int | None = None,
) -> TileChoice:
    """The fastest legal write-box edge whose task fits ``budget`` (see the module docstring)."""
    needed = needed_context(geometry, halo)
    legal = _candidates(image_shape, geometry, needed, halo)
    if not legal:
        raise TilingError(
            f"tiling.tile: auto: no tile size is a legal input for the {geometry.name} "
            f"(legal input sizes: {geometry.describe_sizes()}) with a context of {needed} px"
        )
    block = block_arrangement(batch_size, len(image_shape))
    largest_fit, bound = _largest_fitting(legal, geometry, needed, budget)
    usable = [t for t in legal if t <= largest_fit] or legal[:1]
    limit = f"tiles above {usable[-1]} px exceed {bound}" if bound else "no larger tile is needed for this image"
    costs = {t: _estimated_time(image_shape, t, needed, geometry, block, budget.slots) for t in usable}
    fastest = min(costs.values())
    # Of the tiles within TOLERANCE of the fastest, the smallest: it needs less memory, so a
    # worker's memory does not grow with the image once the halo's cost is small.
    best = min(t for t in usable if costs[t] <= fastest * (1 + TOLERANCE))
    if best < usable[-1]:
        limit += (
            f"; {best} px: within {TOLERANCE:.0%} of the fastest estimate (the halo's cost, "
            f"{budget.slots} forward pass{'es' * (budget.slots > 1)} kept busy) with the least memory"
        )
    context = context_for(best, needed, geometry)
    return TileChoice(
        tile=best,
        task_bytes=budget.task_bytes(best + 2 * context),
        limit=limit,
    )


def _candidates(image_shape: tuple[int, ...], geometry: NetworkGeometry, needed: int, halo: int | None) -> list[int]:
    """Legal edges from the smallest up to the image's (a coarser grid for huge images, plus
    the edges that split an axis evenly)."""
    m = geometry.tile_multiple
    top = round_up(max(image_shape), m)
    if geometry.size_max is not None:
        top = min(top, max(m, (geometry.size_max // m) * m))
    step = m * max(1, math.ceil(top / m / MAX_CANDIDATES))
    edges = set(range(m, top + 1, step))
    edges |= {round_up(math.ceil(n / k), m) for n in image_shape for k in range(1, 65)}
    low = max(m, halo or 0)
    return sorted(t for t in edges if low <= t <= top and fits(t, needed, geometry))


def _largest_fitting(
    legal: list[int], geometry: NetworkGeometry, needed: int, budget: TileBudget
) -> tuple[int, str]:
    """The largest candidate whose task fits memory and the activation limit, and what
    bounds it ("" when nothing does). Memory grows with the tile: a binary search."""

    def problem(t: int) -> str | None:
        edge = t + 2 * context_for(t, needed, geometry)
        peak, largest = budget.task_bytes(edge), budget.largest_bytes(edge)
        if peak is None or largest is None:
            return "model memory unknown" if t > UNKNOWN_MEMORY_TILE else None
        if peak > budget.memory:
            return f"memory: {budget.memory / 2**30:.1f} GiB per task"
        if largest >= budget.activation_limit:
            return f"a tensor of {budget.activation_limit / 2**30:.0f} GiB (slow kernels beyond)"
        live = budget.pass_bytes(edge) if budget.pass_bytes is not None else None
        if budget.pass_limit is not None and live is not None and live > budget.pass_limit:
            return f"{budget.pass_limit / 2**20:.0f} MiB of live tensors per CPU forward pass (slower beyond)"
        return None

    if problem(legal[-1]) is None:
        return legal[-1], ""
    lo, hi = -1, len(legal) - 1  # legal[lo] fits (or none), legal[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if problem(legal[mid]) is None:
            lo = mid
        else:
            hi = mid
    return (legal[lo] if lo >= 0 else legal[0]), problem(legal[hi]) or ""


def _estimated_time(
    image_shape: tuple[int, ...], tile: int, needed: int, geometry: NetworkGeometry,
    block: tuple[int, ...], slots: int,
) -> float:  # fmt: skip
    """The busiest slot's work, in computed pixels: blocks go to slots largest first."""
    context = context_for(tile, needed, geometry)
    per_axis = []
    for n, tiles_per_block in zip(image_shape, block):
        reads = [size + 2 * context for _, size in axis_tiles(n, min(tile, round_up(n, geometry.tile_multiple)), context, geometry)]
        per_axis.append([sum(reads[i : i + tiles_per_block]) for i in range(0, len(reads), tiles_per_block)])
    blocks = math.prod(len(a) for a in per_axis)
    total = math.prod(sum(a) for a in per_axis) + blocks * BLOCK_COST_PIXELS
    if blocks > 64 * slots:  # many rounds: the last one's idle slots hardly count
        return total / slots
    costs = sorted((math.prod(c) + BLOCK_COST_PIXELS for c in _outer(per_axis)), reverse=True)
    loads = [0.0] * slots
    for cost in costs:
        loads[loads.index(min(loads))] += cost
    return max(loads)


def _outer(per_axis: list[list[int]]) -> list[tuple[int, ...]]:
    combos: list[tuple[int, ...]] = [()]
    for values in per_axis:
        combos = [c + (v,) for c in combos for v in values]
    return combos
