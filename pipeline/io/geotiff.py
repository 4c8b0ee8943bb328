"""Export a label volume as a tiled GeoTIFF with internal overviews (``output.geotiff``).

The file beside the volume (``out/slide.zarr`` -> ``out/slide.tif``) holds the labels at
full resolution, tiled and deflate-compressed, then each pyramid level of the volume as a
reduced-resolution image (GDAL, QGIS and rasterio use them as overviews). A georeferenced
input's GeoTIFF tags (CRS keys, pixel scale and tie point, or the transformation matrix) are
copied into the first image as they were read, so the labels sit exactly where the input
does on the map.

Written tile row by tile row from the volume's chunks (one row of tiles in memory, never a
level), into a temporary file renamed into place only when complete (in an object store:
uploaded once complete), so a crash never leaves a file that looks finished.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tifffile
import zarr

from ..coordinates import Georeference
from . import fs

TILE = 512
COMPRESSION = "zlib"  # deflate: lossless, read by every GeoTIFF reader
BIGTIFF_FROM = 2**31  # uncompressed bytes from which the classic 4 GiB offsets may not do


def geotiff_path(volume: str) -> str:
    """``out/slide.zarr`` -> ``out/slide.tif``."""
    return fs.sibling(volume, f"{fs.stem(volume)}.tif")


def write_geotiff(volume: str, levels: int, georeference: Georeference | None, target: str) -> None:
    """Write levels ``0 .. levels - 1`` of the label volume at ``volume`` to ``target``."""
    arrays = [
        zarr.open_array(store=fs.zarr_store(fs.join(volume, str(level)), read_only=True), mode="r")
        for level in range(levels)
    ]
    if arrays[0].ndim != 2:
        raise ValueError(f"output.geotiff: labels of shape {arrays[0].shape}; a GeoTIFF holds 2D labels")
    bigtiff = sum(a.nbytes for a in arrays) >= BIGTIFF_FROM
    extratags = [(code, dtype, len(values) if dtype != 2 else 0, values if dtype != 2 else values[0], True)
                 for code, dtype, values in (georeference.tags if georeference else ())]  # fmt: skip
    with fs.atomic_file(target) as local, tifffile.TiffWriter(local, bigtiff=bigtiff) as tif:
        for level, array in enumerate(arrays):
            tif.write(
                _tiles(array),
                shape=array.shape,
                dtype=array.dtype,
                tile=(TILE, TILE),
                compression=COMPRESSION,
                photometric="minisblack",
                subfiletype=1 if level else 0,  # 1: a reduced-resolution copy of the first
                extratags=extratags if level == 0 else [],
                metadata=None,
            )


def _tiles(array: zarr.Array) -> Iterator[np.ndarray]:
    """The array's TILE x TILE tiles in row-major order, zero-padded at the far edges."""
    height, width = array.shape
    for top in range(0, height, TILE):
        band = np.asarray(array[top : top + TILE, :])
        for left in range(0, width, TILE):
            tile = np.zeros((TILE, TILE), dtype=array.dtype)
            part = band[:, left : left + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile
