"""Where an image's pixels are in the world (pure): pixel size and unit, and a GeoTIFF's CRS.

Read from the input (:mod:`pipeline.io.coordinates`) and carried into the label volume: as
OME-NGFF ``scale`` transformations and axis units per pyramid level, and, for a GeoTIFF, as
its CRS and affine transform (the way GDAL and rioxarray state them) plus its GeoTIFF tags
verbatim, so an export can give the labels exactly the input's georeference.

A GeoTIFF's affine transform maps (column, row) of a pixel's corner to map coordinates::

    x = a * col + b * row + c
    y = d * col + e * row + f         (north-up: b = d = 0, e < 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# OME-NGFF space units (UDUNITS-2 names) by the spellings OME-XML and GeoTIFF use.
_UNITS = {
    "Å": "angstrom", "nm": "nanometer", "µm": "micrometer", "um": "micrometer", "mm": "millimeter",
    "cm": "centimeter", "m": "meter", "km": "kilometer", "pm": "picometer", "in": "inch", "ft": "foot",
}  # fmt: skip
NGFF_SPACE_UNITS = frozenset(_UNITS.values()) | {"meter", "foot", "yard", "mile"}
# GeoTIFF ProjLinearUnitsGeoKey codes (EPSG unit codes).
_GEOTIFF_LINEAR_UNITS = {9001: "meter", 9002: "foot", 9003: "foot", 9036: "kilometer"}

Affine = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class Georeference:
    """A GeoTIFF's placement on the map: ``crs`` as ``EPSG:<code>`` when the file names one."""

    crs: str | None
    transform: Affine  # (a, b, c, d, e, f), see the module docstring
    citation: str | None = None
    # The GeoTIFF tags as stored, (code, TIFF datatype, values): copied into an export as they are.
    tags: tuple[tuple[int, int, tuple[Any, ...]], ...] = ()

    def coarser(self, fy: float, fx: float) -> Georeference:
        """The same extent in pixels ``fy`` x ``fx`` times larger (a pyramid level, an overview):
        the transform and the stored pixel scale, tie points and transformation scaled alike."""
        a, b, c, d, e, f = self.transform
        tags = []
        for code, dtype, values in self.tags:
            v = list(values)
            if code == 33550 and len(v) >= 2:  # ModelPixelScale (Sx, Sy, Sz)
                v[0], v[1] = v[0] * fx, v[1] * fy
            elif code == 33922:  # ModelTiepoint: raster (I, J, K) -> map (X, Y, Z), per point
                for i in range(0, len(v) - 5, 6):
                    v[i], v[i + 1] = v[i] / fx, v[i + 1] / fy
            elif code == 34264 and len(v) >= 6:  # ModelTransformation, 4 x 4 row-major
                v[0], v[1], v[4], v[5] = v[0] * fx, v[1] * fy, v[4] * fx, v[5] * fy
            tags.append((code, dtype, tuple(v)))
        return Georeference(self.crs, (a * fx, b * fy, c, d * fx, e * fy, f), self.citation, tuple(tags))

    def gdal_geotransform(self) -> tuple[float, float, float, float, float, float]:
        """GDAL's order: (c, a, b, f, d, e)."""
        a, b, c, d, e, f = self.transform
        return (c, a, b, f, d, e)

    def as_dict(self) -> dict[str, Any]:
        return {
            "crs": self.crs,
            "transform": list(self.transform),
            "GeoTransform": " ".join(repr(float(v)) for v in self.gdal_geotransform()),
            "citation": self.citation,
        }


@dataclass(frozen=True)
class PixelGrid:
    """Size (and unit, None when unknown) of a pixel along each spatial axis; ``source`` says
    where it was read from. The default: 1 unit-less pixel per pixel."""

    scale: tuple[float, ...]
    units: tuple[str | None, ...]
    source: str = "none"
    georeference: Georeference | None = None

    @classmethod
    def unknown(cls, ndim: int) -> PixelGrid:
        return cls((1.0,) * ndim, (None,) * ndim)

    def coarser(self, factors: tuple[float, ...], level: int) -> PixelGrid:
        """The grid of pyramid ``level`` of the image, whose pixels span ``factors`` of these."""
        if not level:
            return self
        geo = self.georeference.coarser(factors[-2], factors[-1]) if self.georeference else None
        scale = tuple(s * f for s, f in zip(self.scale, factors))
        where = "the input states no pixel size; in its level-0 pixels" if self.source == "none" else self.source
        return PixelGrid(scale, self.units, f"{where}, level {level}", geo)

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"scale": list(self.scale), "units": list(self.units), "source": self.source}
        if self.georeference is not None:
            found["georeference"] = self.georeference.as_dict()
        return found


def ngff_unit(text: str | None) -> str | None:
    """The OME-NGFF name of a length unit (``µm`` -> ``micrometer``), None if not one."""
    if text is None:
        return None
    name = _UNITS.get(text.strip(), text.strip().lower())
    return name if name in NGFF_SPACE_UNITS else None


def geotiff_linear_unit(code: int | None) -> str | None:
    return _GEOTIFF_LINEAR_UNITS.get(int(code)) if code is not None else None


def affine_from_geotiff(
    pixel_scale: tuple[float, ...] | None,
    tiepoint: tuple[float, ...] | None,
    transformation: tuple[float, ...] | None,
) -> Affine | None:
    """The affine transform of a GeoTIFF's ModelTransformation tag (16 values), or of its
    ModelPixelScale (Sx, Sy, Sz) and first ModelTiepoint (I, J, K, X, Y, Z): raster (I, J)
    sits at map (X, Y), rows going south."""
    if transformation is not None and len(transformation) >= 8:
        m = [float(v) for v in transformation]
        return (m[0], m[1], m[3], m[4], m[5], m[7])
    if pixel_scale is None or tiepoint is None or len(pixel_scale) < 2 or len(tiepoint) < 6:
        return None
    sx, sy = float(pixel_scale[0]), float(pixel_scale[1])
    i, j, x, y = (float(v) for v in (tiepoint[0], tiepoint[1], tiepoint[3], tiepoint[4]))
    return (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)


def level_transformations(grid: PixelGrid, factors: tuple[int, ...], offsets: tuple[float, ...]) -> list[dict[str, Any]]:
    """OME-NGFF ``coordinateTransformations`` of a pyramid level whose pixel spans ``factors``
    full-resolution pixels and starts ``offsets`` full-resolution pixels in, per axis."""
    scale = [s * f for s, f in zip(grid.scale, factors)]
    found: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if any(offsets):
        found.append({"type": "translation", "translation": [s * o for s, o in zip(grid.scale, offsets)]})
    return found


def describe_grid(grid: PixelGrid) -> str:
    """One line for the plan: ``0.5 x 0.5 meter (GeoTIFF, EPSG:32616)``."""
    if grid.source == "none":
        return "size unknown (the input states none): 1 pixel per unit in the output's metadata"
    sizes = " x ".join(f"{s:g}" for s in grid.scale)
    units = set(grid.units) - {None}
    if not units:
        unit = "(no unit)"
    elif len(units) == 1:
        unit = str(units.pop())
    else:
        unit = f"({', '.join(str(u) for u in grid.units)})"
    where = grid.source
    if grid.georeference is not None:
        where += f", {grid.georeference.crs or 'CRS without an EPSG code'}"
    return f"{sizes} {unit} ({where}), carried into the labels' metadata"


def pixel_centres(
    grid: PixelGrid, shape: tuple[int, ...], factor: int = 1, offset: float = 0.0
) -> tuple[dict[str, np.ndarray], Affine | None]:
    """Coordinates of the pixel centres along each spatial axis (``z``, ``y``, ``x``), and the
    affine transform of this grid (None without a north-up georeference).

    ``factor`` and ``offset``: a pyramid level whose pixel spans ``factor`` full-resolution
    pixels (along y and x) and whose pixel 0 sits ``offset`` full-resolution pixels in
    (:func:`pipeline.downsample.level_offset`). A north-up georeferenced grid gives map
    coordinates, as rioxarray names them (``x`` easting/longitude, ``y`` northing/latitude);
    otherwise ``index x size`` in the grid's unit, as OME-NGFF places pixels."""
    names = "zyx"[-len(shape) :]
    lead = len(shape) - 2
    geo = grid.georeference
    if geo is not None and geo.transform[1] == 0 and geo.transform[3] == 0:
        a, _, c, _, e, f = geo.transform
        columns = offset + factor * np.arange(shape[-1]) + 0.5
        rows = offset + factor * np.arange(shape[-2]) + 0.5
        found = {n: np.arange(s) * grid.scale[i] for i, (n, s) in enumerate(zip(names[:lead], shape[:lead]))}
        found["y"], found["x"] = f + e * rows, c + a * columns
        corner = offset + 0.5 - factor * 0.5  # full-resolution pixels from the input's corner
        return found, (a * factor, 0.0, c + a * corner, 0.0, e * factor, f + e * corner)
    found = {}
    for i, (name, size) in enumerate(zip(names, shape)):
        step, start = (factor, offset) if i >= lead else (1, 0.0)
        found[name] = (start + step * np.arange(size)) * grid.scale[i]
    return found, None


def grid_from_record(record: dict[str, Any] | None, ndim: int) -> PixelGrid:
    """The :class:`PixelGrid` a label volume's record states (``PixelGrid.as_dict``); unknown
    for a volume written before records held one."""
    if not isinstance(record, dict) or len(record.get("scale", [])) != ndim:
        return PixelGrid.unknown(ndim)
    geo = record.get("georeference")
    georeference = None
    if isinstance(geo, dict) and len(geo.get("transform", [])) == 6:
        a, b, c, d, e, f = (float(v) for v in geo["transform"])
        georeference = Georeference(geo.get("crs"), (a, b, c, d, e, f), geo.get("citation"))
    return PixelGrid(
        tuple(float(s) for s in record["scale"]),
        tuple(record.get("units") or (None,) * ndim),
        str(record.get("source", "none")),
        georeference,
    )
