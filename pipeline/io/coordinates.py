"""Read where an input's pixels are: OME-TIFF physical sizes, GeoTIFF georeference, OME-Zarr scale.

Read once, on the driver, from the header of the image the reader has open (a TIFF's first
IFD and OME-XML) or an OME-Zarr group's ``multiscales``; pixel data is not touched. What cannot be read gives
:meth:`PixelGrid.unknown`: a missing pixel size is no reason to refuse an image.
"""

from __future__ import annotations

from typing import Any

import tifffile

from ..coordinates import (
    Georeference,
    PixelGrid,
    affine_from_geotiff,
    geotiff_linear_unit,
    ngff_unit,
)
from . import fs
from .images import ImageReader, ImageSpec, is_zarr
from .ome import read_multiscales

GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)  # pixel scale, tiepoint, transformation, GeoKeys


def read_pixel_grid(reader: ImageReader) -> PixelGrid:
    """The pixel size (and georeference) of the spatial axes of the image ``reader`` has open."""
    spec, ndim = reader.spec, len(reader.shape)
    fs.use_rules(spec.storage)
    try:
        if reader.tiff is not None:
            grid = _tiff_grid(reader.tiff, spec, ndim)
            return grid.coarser(_level_factors(reader.tiff, spec, reader.shape), spec.level)
        if is_zarr(spec.path):
            return _zarr_grid(spec.path, ndim, spec.level)
    except (OSError, ValueError, KeyError, TypeError, IndexError, SyntaxError):  # SyntaxError: bad OME-XML
        pass
    return PixelGrid.unknown(ndim)


def _tiff_grid(tif: tifffile.TiffFile, spec: ImageSpec, ndim: int) -> PixelGrid:
    series = tif.series[spec.series or 0]
    page = series.pages[0] if series.pages else tif.pages[0]
    georeference = _georeference(tif, page) if tif.is_geotiff else None
    if georeference is not None:
        a, b, _, d, e, _ = georeference.transform
        keys = tif.geotiff_metadata or {}
        unit = geotiff_linear_unit(_code(keys.get("ProjLinearUnitsGeoKey")))
        if unit is None and _code(keys.get("GTModelTypeGeoKey")) == 1:
            unit = "meter"  # a projected CRS that names no unit: EPSG's default for them
        size_y, size_x = (abs(e) or abs(d)), (abs(a) or abs(b))
        scale = (1.0,) * (ndim - 2) + (size_y, size_x)
        units = (None,) * (ndim - 2) + (unit, unit)
        return PixelGrid(scale, units, "GeoTIFF", georeference)
    if tif.is_ome and tif.ome_metadata:
        return _ome_grid(tif.ome_metadata, tif.series.index(series), ndim)
    return PixelGrid.unknown(ndim)


def _georeference(tif: tifffile.TiffFile, page: Any) -> Georeference | None:
    keys = tif.geotiff_metadata or {}
    transform = affine_from_geotiff(keys.get("ModelPixelScale"), keys.get("ModelTiepoint"), keys.get("ModelTransformation"))
    if transform is None:
        return None
    code = _code(keys.get("ProjectedCSTypeGeoKey")) or _code(keys.get("GeographicTypeGeoKey"))
    crs = f"EPSG:{code}" if code and code < 32767 else None  # 32767: user-defined
    tags = []
    for number in GEOTIFF_TAGS:
        tag = page.tags.get(number)
        if tag is not None:
            value = tag.value if isinstance(tag.value, tuple) else (tag.value,)
            tags.append((number, int(tag.dtype), tuple(value)))
    citation = keys.get("GTCitationGeoKey") or keys.get("GeogCitationGeoKey")
    return Georeference(crs, transform, str(citation) if citation else None, tuple(tags))


def _code(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _ome_grid(xml: str, index: int, ndim: int) -> PixelGrid:
    """PhysicalSizeX/Y/Z (and their units, micrometres by default) of OME-XML image ``index``."""
    images = tifffile.xml2dict(xml)["OME"]["Image"]
    pixels = (images if isinstance(images, list) else [images])[index]["Pixels"]
    axes = "ZYX"[-ndim:]
    scale, units = [], []
    for axis in axes:
        size = pixels.get(f"PhysicalSize{axis}")
        scale.append(float(size) if size else 1.0)
        units.append(ngff_unit(str(pixels.get(f"PhysicalSize{axis}Unit", "µm"))) if size else None)
    if all(u is None for u in units):
        return PixelGrid.unknown(ndim)
    return PixelGrid(tuple(scale), tuple(units), "OME-TIFF")


def _level_factors(tif: tifffile.TiffFile, spec: ImageSpec, shape: tuple[int, ...]) -> tuple[float, ...]:
    """How many full-resolution pixels a pixel of the chosen pyramid level spans, per spatial axis."""
    series = tif.series[spec.series or 0]
    full = dict(zip(series.axes, series.levels[0].shape))
    spatial = [full[a] for a in series.axes if a in "ZYX"][-len(shape) :]
    return tuple(n / m for n, m in zip(spatial, shape))


def _zarr_grid(path: str, ndim: int, level: int = 0) -> PixelGrid:
    """The chosen dataset's ``scale`` and the space axes' units of an OME-Zarr group."""
    multiscales = read_multiscales(path)
    if not multiscales:
        return PixelGrid.unknown(ndim)
    first = multiscales[0]
    axes = first.get("axes", [])
    transforms = first["datasets"][level].get("coordinateTransformations", [])
    scale = next((t["scale"] for t in transforms if t.get("type") == "scale"), [1.0] * len(axes))
    space = [i for i, a in enumerate(axes) if isinstance(a, dict) and a.get("type") == "space"]
    space = space[-ndim:] if len(space) >= ndim else list(range(len(scale)))[-ndim:]
    units = tuple(ngff_unit(axes[i].get("unit")) if isinstance(axes[i], dict) else None for i in space)
    source = f"OME-Zarr, level {level}" if level else "OME-Zarr"
    return PixelGrid(tuple(float(scale[i]) for i in space), units, source)
