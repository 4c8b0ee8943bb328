"""Instance labels of a whole label volume on Dask: the thin wrapper of :mod:`.instances`.

Pass 1 labels every block and pairs labels across seams (one task per block, one per pair
of touching blocks; only the counts and the pairs come back), the driver joins the pairs
into objects (:func:`instances.resolve`), and pass 2 labels each block again and maps its
labels to the global ids (so a task run twice writes the same bytes: nothing is read back
from the volume being written). Growth runs on pass 2's blocks with a ``grow_by``-pixel
halo (``map_overlap``), exact at seams. The driver holds a few numbers per object, never a
block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np

from .errors import PipelineError
from .geometry import Box
from .instances import (
    CONNECTIVITY,
    ID_DTYPE,
    BlockLabels,
    ObjectStats,
    Relabelling,
    block_faces,
    block_stats,
    connectivity_rank,
    grow,
    label_block,
    neighbour_offsets,
    reduce_stats,
    relabel,
    resolve,
    seam_pairs,
)
from .io import fs
from .io.labels import mark_block_done, write_block


def check_connectivity(ndim: int, neighbours: int, field: str) -> None:
    """A user's connectivity against the labels' dimensions; PipelineError naming ``field``."""
    if neighbours not in CONNECTIVITY[ndim]:
        allowed = " or ".join(map(str, CONNECTIVITY[ndim]))
        raise PipelineError(f"{field}: {neighbours} is not a {ndim}D neighbourhood; expected {allowed}")


def label_blocks(array: da.Array) -> da.Array:
    """Labels read from a file, in blocks of up to 1024 px in y and x (and 64 planes), not in
    its storage segments (strips or small tiles would make thousands of tiny blocks)."""
    return array.rechunk(tuple(min(n, 64 if axis < array.ndim - 2 else 1024) for axis, n in enumerate(array.shape)))


@dataclass(frozen=True)
class InstanceSpec:
    """Which classes make objects, how pixels connect, what to drop and how to grow."""

    classes: tuple[int, ...]
    connectivity: int  # neighbours: 4 or 8 (2D), 6, 18 or 26 (3D)
    min_size: int = 0
    grow_into: tuple[int, ...] = ()
    grow_by: int = 0

    def rank(self, ndim: int) -> int:
        return connectivity_rank(ndim, self.connectivity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "connectivity": self.connectivity,
            "min_size": self.min_size,
            "grow_into": list(self.grow_into),
            "grow_by": self.grow_by,
        }


def _pass_one(
    block: np.ndarray, classes: tuple[int, ...], rank: int
) -> tuple[np.ndarray, np.ndarray, Any]:
    found = label_block(np.asarray(block), classes, rank)
    areas = np.bincount(found.labels.ravel(), minlength=found.count + 1).astype(np.int64)
    return found.classes, areas, block_faces(found.labels)


def _first(result: tuple[np.ndarray, np.ndarray, Any]) -> tuple[np.ndarray, np.ndarray]:
    return result[0], result[1]


def _pairs(
    a: tuple[np.ndarray, np.ndarray, Any],
    b: tuple[np.ndarray, np.ndarray, Any],
    offset: tuple[int, ...],
    rank: int,
) -> np.ndarray:
    return seam_pairs(a[2], b[2], a[0], b[0], offset, rank)


def resolve_objects(class_ids: da.Array, spec: InstanceSpec) -> Relabelling:
    """Pass 1 and the join: the objects of ``class_ids`` (a Dask array of class ids) on its blocks."""
    ndim = class_ids.ndim
    rank = spec.rank(ndim)
    blocks = class_ids.to_delayed()
    grid = blocks.shape
    first = {
        index: dask.delayed(_pass_one, pure=True)(blocks[index], spec.classes, rank)
        for index in np.ndindex(*grid)
    }
    linear = {index: i for i, index in enumerate(np.ndindex(*grid))}
    summaries = [dask.delayed(_first, pure=True)(first[index]) for index in np.ndindex(*grid)]
    seams, pair_tasks = [], []
    for index in np.ndindex(*grid):
        for offset in neighbour_offsets(ndim, rank):
            other = tuple(i + o for i, o in zip(index, offset))
            if all(0 <= i < n for i, n in zip(other, grid)):
                seams.append((linear[index], linear[other]))
                pair_tasks.append(
                    dask.delayed(_pairs, pure=True)(first[index], first[other], offset, rank)
                )
    counted, paired = dask.compute(summaries, pair_tasks)
    return resolve(
        [c for c, _ in counted],
        [a for _, a in counted],
        [(a, b, p) for (a, b), p in zip(seams, paired)],
        spec.min_size,
    )


def _pass_two(
    block: np.ndarray, mapping: np.ndarray, classes: tuple[int, ...], rank: int
) -> np.ndarray:
    found: BlockLabels = label_block(np.asarray(block), classes, rank)
    return relabel(found.labels, mapping)


def instance_ids(class_ids: da.Array, spec: InstanceSpec, objects: Relabelling) -> da.Array:
    """The lazy uint64 instance ids of ``class_ids`` (pass 2, then growth), chunked as it is."""
    rank = spec.rank(class_ids.ndim)
    blocks = class_ids.to_delayed()
    grid = blocks.shape
    chunk_shapes = [
        tuple(c[i] for c, i in zip(class_ids.chunks, index)) for index in np.ndindex(*grid)
    ]
    pieces = np.empty(grid, dtype=object)
    for b, index in enumerate(np.ndindex(*grid)):
        task = dask.delayed(_pass_two, pure=True)(
            blocks[index], objects.mappings[b], spec.classes, rank
        )
        pieces[index] = da.from_delayed(task, shape=chunk_shapes[b], dtype=ID_DTYPE)
    ids = da.block(pieces.tolist())
    if spec.grow_by and spec.grow_into:
        depth = spec.grow_by
        if any(c < depth for c, n in zip(class_ids.chunksize, class_ids.shape) if c < n):
            raise ValueError(
                f"blocks of {class_ids.chunksize} pixels are too small to grow objects by {depth} pixels"
            )
        ids = da.map_overlap(
            grow, ids, class_ids, depth=depth, boundary="none", dtype=ID_DTYPE,
            into=spec.grow_into, steps=depth, rank=rank,
        )  # fmt: skip
        ids = ids.rechunk(class_ids.chunks)  # dask may have merged a short last block for the halo
    return ids


def _write_and_measure(
    ids: np.ndarray, image: np.ndarray | None, path: str, run_id: str, origin: tuple[int, ...],
    index: tuple[int, ...], storage: fs.StorageRules,
) -> ObjectStats:  # fmt: skip
    fs.use_rules(storage)
    ids = np.asarray(ids)
    write_block(path, run_id, Box(origin, ids.shape), ids)
    mark_block_done(path, run_id, index)
    return block_stats(ids, origin, None if image is None else np.asarray(image))


def write_ids(
    ids: da.Array, path: str, run_id: str, image: da.Array | None, storage: fs.StorageRules
) -> ObjectStats:
    """Write every block of ``ids`` into the volume at ``path`` and measure its objects
    (``image``: ``(channels, *shape)`` intensities for their means, or None)."""
    if image is not None:
        image = image.rechunk(((image.shape[0],),) + ids.chunks)
        image_blocks = image.to_delayed()[0]
    blocks = ids.to_delayed()
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in ids.chunks]
    tasks = []
    for index in np.ndindex(*blocks.shape):
        origin = tuple(int(s[i]) for s, i in zip(starts, index))
        tasks.append(
            dask.delayed(_write_and_measure, pure=False)(
                blocks[index],
                None if image is None else image_blocks[index],
                path,
                run_id,
                origin,
                index,
                storage,
            )
        )
    (parts,) = dask.compute(tasks)
    return reduce_stats(parts)


def object_columns(
    stats: ObjectStats,
    objects: Relabelling,
    scale: Sequence[float],
    units: Sequence[str | None],
    channels: int,
) -> dict[str, np.ndarray]:
    """The object table's columns (one row per object), named as scikit-image names them
    where it has a name: ``label``, ``area``, ``bbox-0`` ..., ``centroid-0`` ...,
    ``mean_intensity-0`` ..., plus ``class`` and ``area_<unit>`` when the pixel size is known."""
    ndim = stats.lower.shape[1]
    ids = stats.ids.astype(np.uint64)
    columns: dict[str, np.ndarray] = {
        "label": ids,
        "class": objects.classes[ids.astype(np.int64)],
        "area": stats.area,
    }
    if all(u is not None for u in units) and len(set(units)) == 1:
        unit = str(units[0])
        columns[f"area_{unit}{ndim if ndim > 1 else ''}"] = stats.area * float(np.prod(scale))
    for axis in range(ndim):
        columns[f"bbox-{axis}"] = stats.lower[:, axis]
    for axis in range(ndim):
        columns[f"bbox-{axis + ndim}"] = stats.upper[:, axis]
    centroid = stats.centroid()
    for axis in range(ndim):
        columns[f"centroid-{axis}"] = centroid[:, axis]
    means = stats.mean_intensity()
    for ch in range(channels):
        columns[f"mean_intensity-{ch}"] = means[:, ch]
    return columns
