"""Plan the mirrored overlap-tile grid: write boxes, read boxes, blocks (pure).

One network tile, along one axis (``c`` = context actually used, ``>=`` the model's halo;
``t`` = the network's own trim, 0 for padded convolutions)::

        read box  |<- c ->|<------- write box T ------->|<- c ->|
                  ^ read origin = write origin - c
        output            |<-c-t->|  write box  |<-c-t->|        network output = S - 2t
                  the write box is cropped out of the output: stitching is cropping

* Write boxes of all tiles partition the image: every output pixel has one owner.
* Tile write origins are multiples of ``T``, a multiple of the network's shift period
  (total stride), so every tile sees the pooling grid in the same phase as whole-image
  inference does, and of its input size step, so ``S = T + 2c`` is a legal input size.
* The last tile along an axis is shrunk to the smallest legal size that still covers the
  image: same phase, same result, less wasted compute on mirrored pixels.
* A block is ``rows x cols`` tiles: one Dask task, one batch per forward pass, one zarr
  chunk. Its read box is the union of its tiles' read boxes and is read once.
* A stack ``(z, y, x)`` segmented by a 2D network plane by plane has one *plane axis*: its
  tiles are one plane thick with no context along it, and a block is ``batch`` planes of
  one tile each, their planes batched through the network together.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

from .errors import TilingError
from .geometry import Box
from .mirror import MirrorMode


@dataclass(frozen=True)
class NetworkGeometry:
    """What the tiler must know of a network (the same along every spatial axis).

    Legal input sizes are ``size_min + n * size_step`` up to ``size_max`` if set (bioimage.io's
    parametrized shape; a fixed-size model has ``size_min == size_max``);
    the output has ``input - 2 * trim`` pixels; an output pixel depends on input pixels at
    most ``halo`` away; shifting the input by a multiple of ``shift_period`` shifts the
    output by the same amount.
    """

    halo: int
    trim: int = 0
    shift_period: int = 1
    size_min: int = 1
    size_step: int = 1
    size_max: int | None = None
    name: str = "network"
    dims: int = 2  # spatial axes the network convolves over; an image's extra leading axes are planes

    def __post_init__(self) -> None:
        if self.halo < self.trim:
            raise ValueError(f"halo {self.halo} smaller than trim {self.trim}")
        if min(self.shift_period, self.size_step, self.size_min) < 1 or self.trim < 0:
            raise ValueError(f"invalid network geometry {self}")
        if self.size_max is not None and self.size_max < self.size_min:
            raise ValueError(f"invalid network geometry {self}")

    @property
    def tile_multiple(self) -> int:
        """Tile sizes (and so tile origins) must be multiples of this."""
        return math.lcm(self.shift_period, self.size_step)

    def is_legal_input(self, size: int) -> bool:
        if self.size_max is not None and size > self.size_max:
            return False
        return size >= self.size_min and (size - self.size_min) % self.size_step == 0

    def describe_sizes(self) -> str:
        if self.size_max == self.size_min:
            return f"exactly {self.size_min}"
        upto = f" up to {self.size_max}" if self.size_max is not None else ""
        return f"{self.size_min} + n x {self.size_step}{upto}"


@dataclass(frozen=True)
class Tile:
    """One network input: ``write`` is the full tile (may reach past the image)."""

    write: Box
    read: Box


@dataclass(frozen=True)
class Block:
    """One task: ``write`` is the block's output region clipped to the image."""

    index: tuple[int, ...]
    write: Box
    read: Box
    tiles: tuple[Tile, ...]


@dataclass(frozen=True)
class TilePlan:
    image_shape: tuple[int, ...]
    tile: tuple[int, ...]
    context: int
    block_tiles: tuple[int, ...]
    geometry: NetworkGeometry
    mirror: MirrorMode
    plane_axes: int = 0  # leading axes the network does not see: segmented plane by plane

    @property
    def ndim(self) -> int:
        return len(self.image_shape)

    @property
    def contexts(self) -> tuple[int, ...]:
        """The context per axis: none along plane axes."""
        return (0,) * self.plane_axes + (self.context,) * (self.ndim - self.plane_axes)

    @property
    def trims(self) -> tuple[int, ...]:
        """The network's trim per axis: none along plane axes."""
        return (0,) * self.plane_axes + (self.geometry.trim,) * (self.ndim - self.plane_axes)

    @property
    def block_shape(self) -> tuple[int, ...]:
        return tuple(t * b for t, b in zip(self.tile, self.block_tiles))

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of blocks along each axis."""
        return tuple(-(-n // b) for n, b in zip(self.image_shape, self.block_shape))

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    @cached_property
    def tile_extents(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per axis, ``(start, size)`` of each tile: full tiles, then a shrunk last one."""
        planes = tuple(tuple((z, 1) for z in range(n)) for n in self.image_shape[: self.plane_axes])
        return planes + tuple(
            axis_tiles(n, t, self.context, self.geometry)
            for n, t in zip(self.image_shape[self.plane_axes :], self.tile[self.plane_axes :])
        )

    @property
    def overlap(self) -> float:
        """Pixels the network computes (every tile's read box) per image pixel."""
        computed = math.prod(
            sum(size + 2 * c for _, size in ext) for ext, c in zip(self.tile_extents, self.contexts)
        )
        return computed / math.prod(self.image_shape)

    @property
    def n_tiles(self) -> int:
        return math.prod(len(e) for e in self.tile_extents)

    def blocks(self) -> list[Block]:
        return [self.block(index) for index in self.block_indices()]

    def block_indices(self) -> list[tuple[int, ...]]:
        """Every block's index, row-major, without building the blocks (cheap for 10^5 blocks)."""
        return list(itertools.product(*map(range, self.grid)))

    def tiles_in(self, index: tuple[int, ...]) -> int:
        """How many tiles the block ``index`` holds (fewer at the image's far edges)."""
        return math.prod(
            len(self.tile_extents[axis][i * self.block_tiles[axis] : (i + 1) * self.block_tiles[axis]])
            for axis, i in enumerate(index)
        )

    def block(self, index: tuple[int, ...]) -> Block:
        per_axis = []
        for axis, i in enumerate(index):
            first = i * self.block_tiles[axis]
            per_axis.append(self.tile_extents[axis][first : first + self.block_tiles[axis]])
        tiles = []
        for combo in itertools.product(*per_axis):
            write = Box(tuple(s for s, _ in combo), tuple(n for _, n in combo))
            tiles.append(Tile(write=write, read=write.grow(self.contexts)))
        origin = tuple(i * b for i, b in zip(index, self.block_shape))
        write = Box(origin, self.block_shape).clip(self.image_shape)
        read = _bounding_box([t.read for t in tiles])
        return Block(index=tuple(index), write=write, read=read, tiles=tuple(tiles))

    @property
    def read_shape(self) -> tuple[int, ...]:
        """Input shape of a full network tile."""
        return tuple(t + 2 * c for t, c in zip(self.tile, self.contexts))

    @property
    def max_block_read_shape(self) -> tuple[int, ...]:
        return tuple(b + 2 * c for b, c in zip(self.block_shape, self.contexts))

    @property
    def network_read_shape(self) -> tuple[int, ...]:
        """The spatial shape of one network input (a tile's read box without its plane axes)."""
        return self.read_shape[self.plane_axes :]


def plan_tiles(
    image_shape: tuple[int, ...],
    geometry: NetworkGeometry,
    *,
    tile: int,
    mirror: MirrorMode,
    batch_size: int = 1,
    halo: int | None = None,
    plane_axes: int = 0,
) -> TilePlan:
    """Context and blocks for an image and a write-box edge (``tile``; ``tiling.tile: auto``
    chooses one with :func:`pipeline.autotile.choose_tile`); a TilingError says why not.

    ``halo`` overrides the network's own halo (it may only add context, never remove it).
    ``plane_axes``: leading axes segmented plane by plane (a 2D network on a stack), a
    block holding ``batch_size`` planes of one tile each.
    """
    if any(n < 1 for n in image_shape):
        raise TilingError(f"image shape {image_shape}: every axis needs at least one pixel")
    needed = needed_context(geometry, halo)
    m = geometry.tile_multiple
    if tile < 1 or tile % m:
        lower, upper = (tile // m) * m, (tile // m + 1) * m
        legal = ", ".join(str(v) for v in (lower, upper) if v > 0)
        raise TilingError(
            f"tiling.tile: {tile} is not a legal tile size for the {geometry.name}: tiles "
            f"must be multiples of {m} (its shift period {geometry.shift_period} and input "
            f"size step {geometry.size_step}); nearest legal sizes: {legal}"
        )
    chosen = tile
    if halo is not None and halo > chosen:
        raise TilingError(
            f"model.halo: {halo} px is larger than allowed: at most the tile size ({chosen} px), "
            f"beyond which a tile's context costs more than 8x its own pixels; "
            f"raise tiling.tile or lower model.halo (the network needs {geometry.halo})"
        )
    context = context_for(chosen, needed, geometry)
    p = plane_axes
    tile_shape = (1,) * p + tuple(min(chosen, round_up(n, m)) for n in image_shape[p:])
    block_tiles = (
        (1,) * (p - 1) + (batch_size,) + (1,) * (len(image_shape) - p)
        if p
        else block_arrangement(batch_size, len(image_shape))
    )
    return TilePlan(
        image_shape=tuple(image_shape),
        tile=tile_shape,
        context=context,
        block_tiles=block_tiles,
        geometry=geometry,
        mirror=mirror,
        plane_axes=p,
    )


def needed_context(geometry: NetworkGeometry, halo: int | None) -> int:
    """The context a tile needs: the network's halo, or a larger one the workflow asks for."""
    if halo is None:
        return geometry.halo
    if halo < geometry.halo:
        raise TilingError(
            f"model.halo: {halo} px is smaller than the receptive-field radius of the "
            f"{geometry.name} ({geometry.halo} px): tiles would show seams; "
            f"use halo: auto or at least {geometry.halo}"
        )
    return halo


def context_for(tile: int, needed: int, geometry: NetworkGeometry) -> int:
    """Smallest context ``>= needed`` making ``tile + 2 * context`` a legal input size."""
    context = _try_context(tile, needed, geometry)
    if context is not None:
        return context
    largest = ""
    if geometry.size_max is not None:
        legal = [t for t in range(geometry.tile_multiple, geometry.size_max + 1, geometry.tile_multiple)
                 if fits(t, needed, geometry)]
        largest = f"; the largest tile that fits is {legal[-1]}" if legal else "; no tile fits"
    raise TilingError(
        f"tiling.tile: no context of at least {needed} px makes a tile of {tile} px a legal input "
        f"for the {geometry.name} (legal input sizes: {geometry.describe_sizes()}){largest}"
    )


def _try_context(tile: int, needed: int, geometry: NetworkGeometry) -> int | None:
    lowest = tile + 2 * needed
    first = max(0, -(-(lowest - geometry.size_min) // geometry.size_step))
    for n in (first, first + 1):  # two candidates cover both parities
        size = geometry.size_min + n * geometry.size_step
        if (size - tile) % 2 == 0 and geometry.is_legal_input(size):
            return (size - tile) // 2
    return None


def fits(tile: int, needed: int, geometry: NetworkGeometry) -> bool:
    return _try_context(tile, needed, geometry) is not None


def axis_tiles(
    n: int, tile: int, context: int, geometry: NetworkGeometry
) -> tuple[tuple[int, int], ...]:
    m = geometry.tile_multiple
    extents = []
    start = 0
    while start < n:
        size = min(tile, round_up(n - start, m))
        while not geometry.is_legal_input(size + 2 * context):
            size += m  # only below size_min; terminates because tile itself is legal
        extents.append((start, size))
        start += tile
    return tuple(extents)


def block_arrangement(batch_size: int, ndim: int) -> tuple[int, ...]:
    """Most nearly square ``rows x cols`` arrangement of ``batch_size`` tiles."""
    if batch_size < 1:
        raise TilingError(f"inference.batch_size: expected an integer >= 1, got {batch_size}")
    if ndim != 2:
        return (1,) * (ndim - 1) + (batch_size,)
    rows = max(r for r in range(1, math.isqrt(batch_size) + 1) if batch_size % r == 0)
    return (rows, batch_size // rows)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _bounding_box(boxes: list[Box]) -> Box:
    start = tuple(min(b.offset[a] for b in boxes) for a in range(boxes[0].ndim))
    stop = tuple(max(b.stop[a] for b in boxes) for a in range(boxes[0].ndim))
    return Box.from_bounds(start, stop)
