"""The Python interface: images and label volumes as dask-backed xarray DataArrays, and a run.

    import pipeline
    image = pipeline.open_image("slide.tif")            # dims (c, y, x), nothing read yet
    labels = pipeline.run("workflow.yaml")               # or a dict; the labels, as open_labels
    by_name = pipeline.run("tiles.yaml")                 # input.path a glob: {name: labels}
    labels = pipeline.open_labels("out/slide.zarr", level=2)

Coordinates are pixel centres: map coordinates for a georeferenced input (``x``, ``y`` and a
``spatial_ref`` coordinate holding the CRS (WKT) and GDAL's ``GeoTransform``, as rioxarray names
them), else ``index x pixel size`` in the unit the input states (``units`` in each
coordinate's attributes). Pixels are read only when the array is computed, region by region.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import xarray as xr

from .config import load_workflow, parse_workflow
from .coordinates import Affine, Georeference, PixelGrid, grid_from_record, pixel_centres
from .crs import crs_wkt
from .downsample import level_offset, level_scale
from .image_set import expand_images
from .io import fs
from .io.coordinates import read_pixel_grid
from .io.images import ImageSpec, as_dask_array
from .io.images import open_image as open_reader
from .io.ome import open_level
from .planning import run_json_path
from .runner import run as run_workflow
from .runner import run_set


def open_image(
    path: str | Path,
    *,
    channel_axis: int | None = None,
    channels: Sequence[int] | None = None,
    series: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """An image (TIFF, OME-TIFF, GeoTIFF, zarr / OME-Zarr, PNG/JPEG) as ``(c, [z,] y, x)``,
    with the channel axis and series chosen as a workflow's ``input`` section chooses them."""
    rules = fs.StorageRules.build(storage_options, {})
    spec = ImageSpec(
        str(path), channel_axis, field="path", channels=tuple(channels) if channels is not None else None,
        volume=True, series=series, storage=rules,
    )  # fmt: skip
    reader = open_reader(spec)
    grid = read_pixel_grid(reader)
    coords, transform = pixel_centres(grid, reader.shape)
    data = as_dask_array(spec)
    return _data_array(data, ("c", *coords), coords, grid, transform, fs.stem(str(path)))


def open_labels(
    path: str | Path, *, level: int = 0, storage_options: Mapping[str, Any] | None = None
) -> xr.DataArray:
    """Pyramid ``level`` of a complete label volume written by ``pipeline run``, as
    ``([z,] y, x)`` with the coordinates of the input it was computed from."""
    fs.use_rules(fs.StorageRules.build(storage_options, {}))
    array, attributes = open_level(str(path), level)
    record = attributes.get("pipeline", {})
    grid = grid_from_record(record.get("pixels"), array.ndim)
    downsampling = (record.get("pyramid") or {}).get("downsampling", "nearest")
    coords, transform = pixel_centres(grid, tuple(array.shape), level_scale(level), level_offset(level, downsampling))
    labels = _data_array(da.from_zarr(array), tuple(coords), coords, grid, transform, fs.stem(str(path)))
    labels.attrs["level"] = level
    labels.attrs["status"] = record.get("status")
    return labels


def open_probabilities(path: str | Path, *, storage_options: Mapping[str, Any] | None = None) -> xr.DataArray:
    """The per-class probabilities of a complete label volume written with
    ``output.probabilities``, as ``(c, [z,] y, x)`` floats in [0, 1] with the classes as ``c``."""
    labels = open_labels(path, storage_options=storage_options)
    stored, attributes = open_level(str(path), 0, array="probabilities")
    about = attributes.get("probabilities") or {}
    data = da.from_zarr(stored).astype("float32") / float(about.get("scale", 1))
    found = xr.DataArray(data, dims=("c", *labels.dims), coords={"c": about.get("classes"), **labels.coords}, name=labels.name)
    found.attrs["status"] = labels.attrs["status"]
    return found


def run(
    workflow: str | Path | Mapping[str, Any], *, resume: bool = False, show_progress: bool = True
) -> xr.DataArray | dict[str, xr.DataArray]:
    """Run a workflow (a file's path or URL, or the mapping a file would hold; a mapping's
    relative paths are relative to the working directory) and return its labels as
    :func:`open_labels` does; for a workflow over several images, ``{name: labels}`` in
    name order. Raises the pipeline's errors (:mod:`pipeline.errors`) as ``pipeline run``
    reports them; ``show_progress`` False prints nothing."""
    wf = parse_workflow(dict(workflow)) if isinstance(workflow, Mapping) else load_workflow(workflow)
    sink = None if show_progress else io.StringIO()
    images = expand_images(wf)
    if images is None:
        result = run_workflow(wf, out=sink, err=sink, resume=resume)
        labels = open_labels(result.output_path)
        labels.attrs["run_json"] = run_json_path(wf)
        labels.attrs["evaluation_json"] = result.report_path
        return labels
    done = run_set(images, sink or sys.stdout, sink or sys.stderr, resume=resume)
    found = {}
    for item in images.images:
        labels = open_labels(item.workflow.output.path)
        labels.attrs["run_json"] = run_json_path(item.workflow)
        labels.attrs["evaluation_json"] = done.report_path  # the set's: per image and pooled
        found[item.name] = labels
    return found


def _data_array(
    data: da.Array,
    dims: tuple[str, ...],
    coords: dict[str, Any],
    grid: PixelGrid,
    transform: Affine | None,
    name: str,
) -> xr.DataArray:
    spatial = dims[-len(grid.scale) :]
    array = xr.DataArray(data, dims=dims, coords=dict(coords), name=name)
    for axis, unit in zip(spatial, grid.units):
        if unit is not None:
            array.coords[axis].attrs["units"] = unit
    geo = grid.georeference
    if geo is not None and transform is not None:
        stated = Georeference(geo.crs, transform).as_dict()  # this grid's transform (a level's is coarser)
        wkt = crs_wkt(geo.crs)
        attrs = {"crs_wkt": wkt or "", "spatial_ref": wkt or geo.crs or "", "crs": geo.crs or "",
                 "GeoTransform": stated["GeoTransform"]}  # fmt: skip
        array = array.assign_coords(spatial_ref=xr.Variable((), 0, attrs))
    array.attrs["pixel_size_source"] = grid.source
    return array
