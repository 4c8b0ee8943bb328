"""Augmentation of image/label pairs: elastic deformation, flips, 90-degree rotations,
intensity jitter (pure NumPy/SciPy).

The U-Net paper's elastic deformation (Ronneberger et al. 2015, sec. 3.1): random
displacement vectors on a coarse grid (standard deviation ``sigma`` pixels), smoothly
interpolated to every pixel (bicubic: ``scipy.ndimage.zoom`` of order 3), then the image is
resampled at the displaced positions. Image and labels are deformed by the *same*
displacement field: the image by linear (or cubic) interpolation, the labels by nearest
neighbour, so labels stay valid class ids and an ignore value stays an ignore value.
Positions that leave the patch are mirrored (``reflect``, as inference extrapolates).

Every random choice comes from the ``numpy.random.Generator`` passed in: a fixed seed
gives the same augmentations, which makes a CPU training run reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Deformation:
    """A displacement field: ``offsets[k]`` is the shift along spatial axis k of every pixel."""

    offsets: np.ndarray  # (ndim, *shape) float64

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.offsets.shape[1:])

    def coordinates(self) -> np.ndarray:
        grid = np.indices(self.shape, dtype=np.float64)
        return grid + self.offsets


def random_deformation(
    shape: Sequence[int], rng: np.random.Generator, grid: int = 3, sigma: float = 10.0
) -> Deformation:
    """Displacements drawn on a ``grid`` x ``grid`` (x ``grid``) lattice with standard
    deviation ``sigma`` pixels, interpolated bicubically to ``shape``."""
    shape = tuple(int(n) for n in shape)
    if grid < 2:
        raise ValueError(f"the displacement grid needs at least 2 points per axis, got {grid}")
    coarse = rng.normal(0.0, sigma, (len(shape),) + (grid,) * len(shape))
    offsets = np.stack([_resize(coarse[k], shape) for k in range(len(shape))])
    return Deformation(offsets)


def deform(array: np.ndarray, field: Deformation, order: int) -> np.ndarray:
    """``array`` (``(*shape)`` or channel-first ``(c, *shape)``) resampled at the displaced
    positions; ``order`` 0 (nearest: labels), 1 (linear) or 3 (cubic)."""
    coords = field.coordinates()
    if array.shape == field.shape:
        return _map(array, coords, order)
    if array.shape[1:] != field.shape:
        raise ValueError(f"an array of shape {array.shape} for a deformation of shape {field.shape}")
    return np.stack([_map(channel, coords, order) for channel in array])


def deform_pair(
    image: np.ndarray, labels: np.ndarray, field: Deformation, image_order: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(c, *shape)`` and labels ``(*shape)`` deformed together."""
    return deform(image, field, image_order), deform(labels, field, 0)


@dataclass(frozen=True)
class Orientation:
    """One of the 8 (2D) symmetries of the square in the last two axes: flips, then a
    rotation by ``turns`` x 90 degrees."""

    flip_y: bool
    flip_x: bool
    turns: int

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = array
        if self.flip_y:
            out = np.flip(out, axis=-2)
        if self.flip_x:
            out = np.flip(out, axis=-1)
        return np.ascontiguousarray(np.rot90(out, self.turns, axes=(-2, -1)))


def random_orientation(rng: np.random.Generator, square: bool = True) -> Orientation:
    """Random flips and, for square patches, a random number of quarter turns."""
    flips = rng.integers(0, 2, 2)
    return Orientation(bool(flips[0]), bool(flips[1]), int(rng.integers(0, 4)) if square else 0)


def jitter_intensity(
    image: np.ndarray, rng: np.random.Generator, contrast: float = 0.1, brightness: float = 0.1
) -> np.ndarray:
    """``image * a + b`` with ``a`` in ``1 +- contrast`` and ``b`` in ``+- brightness`` x the
    image's standard deviation, one draw per channel (of a normalised, channel-first image)."""
    channels = image.shape[0]
    scale = 1.0 + np.asarray(rng.uniform(-contrast, contrast, channels))
    spread = image.reshape(channels, -1).std(axis=1)
    shift = rng.uniform(-brightness, brightness, channels) * np.where(spread > 0, spread, 1.0)
    view = (channels,) + (1,) * (image.ndim - 1)
    return (image * scale.reshape(view) + shift.reshape(view)).astype(image.dtype, copy=False)


def _resize(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Bicubic interpolation of a coarse lattice to ``shape``, corner to corner."""
    factors = [(n - 1) / (g - 1) if g > 1 else 1.0 for n, g in zip(shape, coarse.shape)]
    coords = np.meshgrid(*[np.arange(n) / f if f else np.zeros(n) for n, f in zip(shape, factors)], indexing="ij")
    return ndimage.map_coordinates(coarse, coords, order=3, mode="nearest")


def _map(array: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    if order not in (0, 1, 3):
        raise ValueError(f"interpolation order {order}; expected 0 (nearest), 1 (linear) or 3 (cubic)")
    if order == 0:  # nearest by rounding, exactly: labels keep their values and dtype
        index = tuple(_fold(np.rint(c).astype(np.int64), n) for c, n in zip(coords, array.shape))
        return array[index]
    out = ndimage.map_coordinates(array.astype(np.float64), coords, order=order, mode="mirror")
    return out.astype(array.dtype) if np.issubdtype(array.dtype, np.floating) else out


def _fold(index: np.ndarray, n: int) -> np.ndarray:
    """Indices outside ``[0, n)`` mirrored back (numpy ``reflect``: edge not repeated)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    folded = np.mod(index, period)
    return np.where(folded >= n, period - folded, folded)
