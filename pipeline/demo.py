"""Synthetic demo data: an EM-like membrane image with exact ground truth.

Cells are the Voronoi regions of random seeds; membranes (class 0) are their 3-pixel-wide
borders, cell interiors (class 1) carry texture and dark organelles. Intensity, blur and
noise resemble serial-section EM (the ISBI 2012 convention: 0 membrane, 1 interior), so
the demo needs no download and its IoU is measured against a known truth.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from .errors import PipelineError
from .io import fs

CELL_SPACING = 64  # pixels between cell centres, on average
TIFF_TILE = (256, 256)


def make_demo_image(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8, labels uint8)`` of shape ``(size, size)``."""
    rng = np.random.default_rng(seed)
    shape = (size, size)
    n_cells = max(4, size * size // CELL_SPACING**2)
    seeds = np.zeros(shape, dtype=bool)
    seeds[rng.integers(0, size, n_cells), rng.integers(0, size, n_cells)] = True
    ids = np.cumsum(seeds.ravel()).reshape(shape).astype(np.int32) * seeds
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    cells = ids[iy, ix]
    del iy, ix
    edge = np.zeros(shape, dtype=bool)
    edge[:-1] |= cells[:-1] != cells[1:]
    edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    membrane = ndimage.binary_dilation(edge, iterations=1)
    labels = np.where(membrane, 0, 1).astype(np.uint8)

    brightness = rng.uniform(0.55, 0.85, n_cells + 1).astype(np.float32)
    image = brightness[cells]
    del cells
    texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 2.0)
    image += 0.6 * texture
    organelles = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 6.0)
    image -= 0.25 * (organelles > 0.12)
    image[membrane] = 0.12
    image = ndimage.gaussian_filter(image, 1.2)
    image += 0.05 * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return image, labels


def write_demo_data(folder: str | Path, size: int = 4096, seed: int = 0, overwrite: bool = False) -> list[str]:
    """Write ``image.tif`` and ``labels.tif`` (tiled, deflate) unless they already exist.

    ``folder`` may be a store URL. Existing files of another size are replaced only with
    ``overwrite``: they may not be ours.
    """
    folder = str(folder)
    image_path, labels_path = fs.join(folder, "image.tif"), fs.join(folder, "labels.tif")
    existing = [p for p in (image_path, labels_path) if fs.exists(p)]
    if len(existing) == 2 and _tiff_shape(image_path) == (size, size) == _tiff_shape(labels_path):
        return [image_path, labels_path]
    if existing and not overwrite:
        raise PipelineError(
            f"demo-data: {existing[0]} already exists (and is not a {size} x {size} demo image); "
            f"pass --overwrite to replace it, or choose another folder"
        )
    try:
        fs.make_parent_folders(image_path)
        image, labels = make_demo_image(size, seed)
        for path, data in ((image_path, image), (labels_path, labels)):
            encoded = io.BytesIO()
            tifffile.imwrite(encoded, data, tile=TIFF_TILE, compression="zlib")
            fs.put_bytes(path, encoded.getvalue())  # atomic: never half a demo image
    except OSError as exc:
        raise PipelineError(f"demo-data: cannot write into {fs.redact(folder)}: {exc.strerror or exc}") from None
    return [image_path, labels_path]


def _tiff_shape(path: str) -> tuple[int, ...] | None:
    try:
        with fs.open_read(path) as f, tifffile.TiffFile(f) as tif:
            return tuple(tif.series[0].shape)
    except Exception:
        return None
