"""Training patches: random crops of a legal input size, read with the inference's mirror code.

A patch is an output box (where the loss is computed) inside the image and its read box:
the output box grown by the network's trim on every side. Where the read box leaves the
image it is extrapolated by mirroring exactly as inference does (:func:`mirror.read_mirrored`),
so a valid-convolution network learns on the same context it will see in a run. Pure NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..geometry import Box
from ..mirror import MirrorMode, read_mirrored
from ..tiling import NetworkGeometry


def legal_patch(geometry: NetworkGeometry, wanted: int) -> int:
    """The smallest input edge >= ``wanted`` the network accepts whose output keeps its
    shift period (pooling) aligned."""
    size = max(wanted, geometry.size_min)
    limit = geometry.size_max or (wanted + 64 * geometry.tile_multiple + geometry.size_min)
    while size <= limit:
        if geometry.is_legal_input(size) and size % geometry.shift_period == 0:
            return size
        size += 1
    raise ValueError(f"no legal patch edge from {wanted} px for a network taking {geometry.describe_sizes()}")


@dataclass(frozen=True)
class PatchGeometry:
    read: int  # input edge
    trim: int  # read - 2 * trim = output edge

    @property
    def out(self) -> int:
        return self.read - 2 * self.trim


def random_patch(shape: tuple[int, ...], patch: PatchGeometry, rng: np.random.Generator) -> tuple[Box, Box]:
    """A uniformly placed output box inside an image of spatial ``shape``, and its read box."""
    if any(n < patch.out for n in shape):
        raise ValueError(f"an image of {shape} px is smaller than the {patch.out} px output of a patch")
    offset = tuple(int(rng.integers(0, n - patch.out + 1)) for n in shape)
    out = Box(offset, (patch.out,) * len(shape))
    read = Box(tuple(o - patch.trim for o in offset), (patch.read,) * len(shape))
    return out, read


def read_patch(image: np.ndarray, box: Box, mirror: MirrorMode = "reflect") -> np.ndarray:
    """``(..., *box.shape)`` of a channel-first (or plain) in-memory image, mirrored outside."""
    spatial = image.shape[image.ndim - box.ndim :]
    return read_mirrored(lambda s: image[(Ellipsis,) + s], box, spatial, mirror)
