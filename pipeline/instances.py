"""Instance labels across block seams: the NumPy kernels (pure: no dask, torch or zarr).

A semantic label volume says which class each pixel has; an instance volume gives each
connected object of chosen classes its own id over the whole image. The image is cut into
blocks, so objects are labelled in three steps (dask-image's ``label``, here with exact
uint64 ids and classes kept apart):

1. every block is labelled on its own (:func:`label_block`): the connected components of
   each chosen class, numbered ``1 .. n`` inside the block;
2. where two neighbouring blocks touch, labels that the connectivity joins across the
   seam are paired (:func:`seam_pairs`), also across block edges and corners when the
   connectivity has diagonals;
3. the pairs are a graph whose connected components are the objects (:func:`resolve`):
   each block's local labels map to sequential ``uint64`` ids ``1 .. K`` (in the order of
   the objects' first block and label), objects below a minimum size map to 0.

The result equals ``scipy.ndimage.label`` on the whole array (one class at a time) up to a
permutation of the ids, for any block grid. Optional growth (:func:`grow`) then lets
objects take over up to ``steps`` pixels of chosen classes (a predicted border, say), one
pixel ring per step, the smallest id winning ties: a pixel depends only on the pixels
within ``steps`` of it, so a block grown with a ``steps``-pixel halo is exact at seams.

Connectivity is given as the neighbour count users know: 4 or 8 in 2D, 6, 18 or 26 in 3D.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

CONNECTIVITY = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}  # neighbours -> rank of the structure
ID_DTYPE = np.dtype(np.uint64)
_NONE = np.iinfo(np.uint64).max


def connectivity_rank(ndim: int, neighbours: int) -> int:
    """The structuring element's rank for ``neighbours`` (4/8 in 2D, 6/18/26 in 3D)."""
    allowed = CONNECTIVITY.get(ndim)
    if allowed is None:
        raise ValueError(f"instance labels need a 2D or 3D volume, got {ndim} dimensions")
    if neighbours not in allowed:
        shown = " or ".join(str(n) for n in allowed)
        raise ValueError(
            f"connectivity {neighbours} is not a {ndim}D neighbourhood; expected {shown}"
        )
    return allowed[neighbours]


def structure(ndim: int, rank: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, rank)


@dataclass(frozen=True)
class BlockLabels:
    """One block's local labels ``1 .. n`` (0 = no object), with the class of each label."""

    labels: np.ndarray  # uint32, the block's shape
    classes: np.ndarray  # int64 (n + 1,): classes[l] is label l's class (classes[0] = -1)

    @property
    def count(self) -> int:
        return len(self.classes) - 1


def label_block(class_ids: np.ndarray, classes: Sequence[int], rank: int) -> BlockLabels:
    """Connected components of each class in ``classes`` (never joining two classes)."""
    if class_ids.size >= 2**32:
        raise ValueError(
            f"a block of {class_ids.size} pixels is too large to label (at most 2^32 - 1)"
        )
    labels = np.zeros(class_ids.shape, np.uint32)
    owner = [np.array([-1], np.int64)]
    footprint = structure(class_ids.ndim, rank)
    count = 0
    for c in classes:
        mask = class_ids == c
        if not mask.any():
            continue
        found, n = ndimage.label(mask, structure=footprint)
        labels[mask] = found[mask].astype(np.uint32) + np.uint32(count)
        owner.append(np.full(n, c, np.int64))
        count += n
    return BlockLabels(labels, np.concatenate(owner))


def block_faces(labels: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The first and last one-pixel slab of the block along each axis (what seams need)."""
    faces = []
    for axis in range(labels.ndim):
        first = labels[(slice(None),) * axis + (slice(0, 1),)]
        last = labels[(slice(None),) * axis + (slice(-1, None),)]
        faces.append((first.copy(), last.copy()))
    return tuple(faces)


def neighbour_offsets(ndim: int, rank: int) -> list[tuple[int, ...]]:
    """Block offsets to pair with (each unordered pair once): the first non-zero entry is +1.

    Faces only for rank 1; block edges and corners too where the structure has diagonals
    that reach them (at most ``rank`` axes crossed at once).
    """
    offsets = []
    for o in itertools.product((-1, 0, 1), repeat=ndim):
        crossed = [k for k in o if k]
        if crossed and crossed[0] == 1 and len(crossed) <= rank:
            offsets.append(o)
    return offsets


def seam_pairs(
    a_faces: tuple[tuple[np.ndarray, np.ndarray], ...],
    b_faces: tuple[tuple[np.ndarray, np.ndarray], ...],
    a_classes: np.ndarray,
    b_classes: np.ndarray,
    offset: tuple[int, ...],
    rank: int,
) -> np.ndarray:
    """Local label pairs ``(a, b)`` joined across the seam between block a and block a + offset.

    The contact is a's slab on the side facing b and b's on the side facing a, along each
    axis where ``offset`` is non-zero; pixels join when a step of the structure (crossing
    exactly those axes, free along the others) leads from one to the other and both are
    labelled with the same class. Returns a unique ``(k, 2)`` int64 array.
    """
    first_axis = next(k for k, o in enumerate(offset) if o)
    a = a_faces[first_axis][1]  # offset[first_axis] == 1: a's last slab, b's first
    b = b_faces[first_axis][0]
    for axis, o in enumerate(offset):
        if axis == first_axis or not o:
            continue
        side_a, side_b = (
            (slice(-1, None), slice(0, 1)) if o == 1 else (slice(0, 1), slice(-1, None))
        )
        a = a[(slice(None),) * axis + (side_a,)]
        b = b[(slice(None),) * axis + (side_b,)]
    free = [k for k, o in enumerate(offset) if not o]
    if a.shape != b.shape:
        raise ValueError(
            f"blocks meeting at offset {offset} have contact shapes {a.shape} and {b.shape}"
        )
    found = []
    crossed = sum(1 for o in offset if o)
    for shift in itertools.product((-1, 0, 1), repeat=len(free)):
        if crossed + sum(1 for s in shift if s) > rank:
            continue
        a_sl, b_sl = [slice(None)] * a.ndim, [slice(None)] * a.ndim
        for axis, s in zip(free, shift):
            n = a.shape[axis]
            a_sl[axis] = slice(max(0, -s), n - max(0, s))
            b_sl[axis] = slice(max(0, s), n - max(0, -s))
        la, lb = a[tuple(a_sl)].ravel(), b[tuple(b_sl)].ravel()
        keep = (la > 0) & (lb > 0)
        la, lb = la[keep].astype(np.int64), lb[keep].astype(np.int64)
        same = a_classes[la] == b_classes[lb]
        found.append(np.stack([la[same], lb[same]], axis=1))
    if not found:
        return np.empty((0, 2), np.int64)
    return np.unique(np.concatenate(found), axis=0)


@dataclass(frozen=True)
class Relabelling:
    """Global object ids: per block, ``mapping[b][local] -> id`` (uint64, 0 for none)."""

    mappings: list[np.ndarray]
    classes: np.ndarray  # int64 (K + 1,): the class of each id (classes[0] = -1)
    areas: np.ndarray  # int64 (K + 1,): pixels of each id before growth (areas[0] = 0)

    @property
    def count(self) -> int:
        return len(self.classes) - 1


def resolve(
    block_classes: Sequence[np.ndarray],
    block_areas: Sequence[np.ndarray],
    pairs: Sequence[tuple[int, int, np.ndarray]],
    min_size: int = 0,
) -> Relabelling:
    """Join labels paired across seams into objects and number them ``1 .. K``.

    ``block_classes[b]`` / ``block_areas[b]``: class and pixel count of each local label of
    block b (index 0 unused); ``pairs``: ``(a, b, local pairs)`` from :func:`seam_pairs`.
    Objects of fewer than ``min_size`` pixels get 0. Ids follow the first (block, label)
    of each object: deterministic for a given block grid.
    """
    counts = np.array([len(c) - 1 for c in block_classes], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    total = int(starts[-1])
    classes = np.concatenate([c[1:] for c in block_classes]) if total else np.empty(0, np.int64)
    areas = (
        np.concatenate([a[1:] for a in block_areas]).astype(np.int64)
        if total
        else np.empty(0, np.int64)
    )
    root = np.arange(total, dtype=np.int64)
    edges = [starts[a] + p[:, 0] - 1 for a, _, p in pairs if len(p)]
    if edges:
        src = np.concatenate(edges)
        dst = np.concatenate([starts[b] + p[:, 1] - 1 for _, b, p in pairs if len(p)])
        nodes, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
        n = len(nodes)
        graph = coo_matrix(
            (np.ones(len(src), np.int8), (inverse[: len(src)], inverse[len(src) :])), shape=(n, n)
        )
        _, component = connected_components(graph, directed=False)
        first = np.full(component.max() + 1, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, component, nodes)  # nodes are sorted: the smallest provisional id
        root[nodes] = first[component]
    size = np.bincount(root, weights=areas, minlength=total).astype(np.int64) if total else areas
    is_object = (root == np.arange(total)) & (size >= max(min_size, 1))
    final_of_root = np.zeros(total, ID_DTYPE)
    final_of_root[is_object] = np.arange(1, int(is_object.sum()) + 1, dtype=ID_DTYPE)
    final = final_of_root[root]
    mappings = [
        np.concatenate([[0], final[starts[b] : starts[b + 1]]]).astype(ID_DTYPE)
        for b in range(len(counts))
    ]
    return Relabelling(
        mappings,
        np.concatenate([[-1], classes[is_object]]).astype(np.int64),
        np.concatenate([[0], size[is_object]]).astype(np.int64),
    )


def relabel(labels: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """A block's local labels as global uint64 ids."""
    return mapping[labels]


def grow(
    ids: np.ndarray, class_ids: np.ndarray, into: Sequence[int], steps: int, rank: int
) -> np.ndarray:
    """Objects take over unlabelled pixels of the classes ``into``, one ring per step.

    At each step, an unlabelled pixel of those classes with labelled neighbours (by the
    connectivity) takes the smallest neighbouring id. Pixels beyond the array are nothing.
    """
    grown = np.array(ids, dtype=ID_DTYPE, copy=True)
    free = np.isin(class_ids, np.asarray(list(into))) & (grown == 0)
    shifts = [
        s for s in itertools.product((-1, 0, 1), repeat=ids.ndim) if 0 < sum(map(abs, s)) <= rank
    ]
    for _ in range(steps):
        if not free.any():
            break
        nearest = np.full(grown.shape, _NONE, ID_DTYPE)
        source = np.where(grown == 0, _NONE, grown)
        for s in shifts:
            dst = tuple(slice(max(0, -k), n - max(0, k)) for k, n in zip(s, grown.shape))
            src = tuple(slice(max(0, k), n - max(0, -k)) for k, n in zip(s, grown.shape))
            np.minimum(nearest[dst], source[src], out=nearest[dst])
        take = free & (nearest != _NONE)
        grown[take] = nearest[take]
        free &= ~take
    return grown


@dataclass(frozen=True)
class ObjectStats:
    """Per-object sums over one block or many (reduced): what an object table is made of."""

    ids: np.ndarray  # uint64, sorted, unique, no 0
    area: np.ndarray  # int64 pixels
    lower: np.ndarray  # int64 (n, ndim): first pixel index along each axis
    upper: np.ndarray  # int64 (n, ndim): one past the last
    coordinate_sum: np.ndarray  # float64 (n, ndim)
    intensity_sum: np.ndarray  # float64 (n, channels)

    def centroid(self) -> np.ndarray:
        return self.coordinate_sum / self.area[:, None]

    def mean_intensity(self) -> np.ndarray:
        return self.intensity_sum / self.area[:, None]


def block_stats(
    ids: np.ndarray, origin: Sequence[int], image: np.ndarray | None = None
) -> ObjectStats:
    """Sums for the objects in one block; ``origin``: the block's first pixel in the volume;
    ``image``: ``(channels, *ids.shape)`` intensities, or None."""
    flat = ids.ravel()
    labelled = np.flatnonzero(flat)
    found, index = np.unique(flat[labelled], return_inverse=True)
    n, nd = len(found), ids.ndim
    area = np.bincount(index, minlength=n).astype(np.int64)
    coords = np.unravel_index(labelled, ids.shape)
    lower = np.empty((n, nd), np.int64)
    upper = np.empty((n, nd), np.int64)
    sums = np.empty((n, nd), np.float64)
    for axis, c in enumerate(coords):
        c = c.astype(np.int64) + int(origin[axis])
        low = np.full(n, np.iinfo(np.int64).max, np.int64)
        high = np.full(n, np.iinfo(np.int64).min, np.int64)
        np.minimum.at(low, index, c)
        np.maximum.at(high, index, c)
        lower[:, axis], upper[:, axis] = low, high + 1
        sums[:, axis] = np.bincount(index, weights=c, minlength=n)
    channels = 0 if image is None else image.shape[0]
    intensity = np.empty((n, channels), np.float64)
    for ch in range(channels):
        assert image is not None
        intensity[:, ch] = np.bincount(
            index, weights=image[ch].ravel()[labelled].astype(np.float64), minlength=n
        )
    return ObjectStats(found.astype(ID_DTYPE), area, lower, upper, sums, intensity)


def reduce_stats(parts: Sequence[ObjectStats]) -> ObjectStats:
    """The per-block sums of each object added up (min/max for its bounding box)."""
    parts = [p for p in parts if len(p.ids)] or list(parts[:1])
    if not parts:
        raise ValueError("no blocks to reduce")
    ids = np.concatenate([p.ids for p in parts])
    found, index = np.unique(ids, return_inverse=True)
    n = len(found)

    def added(name: str) -> np.ndarray:
        values = np.concatenate([getattr(p, name) for p in parts])
        out = np.zeros((n,) + values.shape[1:], values.dtype)
        np.add.at(out, index, values)
        return out

    lower = np.concatenate([p.lower for p in parts])
    upper = np.concatenate([p.upper for p in parts])
    low = np.full((n, lower.shape[1]), np.iinfo(np.int64).max, np.int64)
    high = np.full((n, upper.shape[1]), np.iinfo(np.int64).min, np.int64)
    np.minimum.at(low, index, lower)
    np.maximum.at(high, index, upper)
    return ObjectStats(
        found.astype(ID_DTYPE),
        added("area"),
        low,
        high,
        added("coordinate_sum"),
        added("intensity_sum"),
    )
