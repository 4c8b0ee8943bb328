"""Mirror extrapolation of an image beyond its borders, one read box at a time.

The overlap-tile strategy (Ronneberger et al. 2015, fig. 2) feeds every tile with context
from outside the image by mirroring. For the tiled result to equal whole-image inference,
every read box must see exactly the pixels that ``numpy.pad(image, mode=...)`` of the whole
image would put there, however far the box reaches past the border, even past a whole
image width. So a read is an index map, not a local pad:

    mode        sequence around the border ``... | 0 1 2 3 | ...``   period
    reflect     2 1 | 0 1 2 3 | 2 1   (edge not repeated, numpy)     2 (n - 1)
    symmetric   1 0 | 0 1 2 3 | 3 2   (edge repeated, dask reflect)  2 n
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from .geometry import Box

MirrorMode = Literal["reflect", "symmetric"]
MIRROR_MODES: tuple[MirrorMode, ...] = ("reflect", "symmetric")


def mirror_indices(start: int, stop: int, size: int, mode: MirrorMode) -> np.ndarray:
    """Source index in ``[0, size)`` of each coordinate in ``[start, stop)``."""
    if size <= 0:
        raise ValueError(f"cannot mirror an axis of size {size}")
    coords = np.arange(start, stop, dtype=np.int64)
    if mode == "reflect":
        if size == 1:
            return np.zeros_like(coords)
        period = 2 * (size - 1)
        folded = np.mod(coords, period)
        return np.where(folded >= size, period - folded, folded)
    if mode == "symmetric":
        period = 2 * size
        folded = np.mod(coords, period)
        return np.where(folded >= size, period - 1 - folded, folded)
    raise ValueError(f"unknown mirror mode {mode!r}; expected one of {MIRROR_MODES}")


def read_mirrored(
    read: Callable[[tuple[slice, ...]], np.ndarray],
    box: Box,
    image_shape: tuple[int, ...],
    mode: MirrorMode,
) -> np.ndarray:
    """Read ``box`` of an image whose spatial axes are the last ``box.ndim`` axes.

    ``read(slices)`` returns the in-image region given by spatial slices (leading axes,
    such as channels, whole). Only the bounding range of the needed source rows and
    columns is read, once; the mirrored parts are gathered from it in memory.
    """
    if box.ndim != len(image_shape):
        raise ValueError(f"box {box} and image shape {image_shape} differ in rank")
    index_maps = [
        mirror_indices(o, o + s, n, mode) for o, s, n in zip(box.offset, box.shape, image_shape)
    ]
    source = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in index_maps)
    region = np.asarray(read(source))
    if box.clip(image_shape) == box:
        return region  # entirely inside: the slice is the answer
    local = [ix - s.start for ix, s in zip(index_maps, source)]
    index: tuple[Any, ...] = (Ellipsis, *np.ix_(*local))
    return region[index]
