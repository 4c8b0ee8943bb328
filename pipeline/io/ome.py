"""OME-Zarr metadata of a label volume and its pyramid levels.

A label volume is an OME-NGFF 0.5 label image (``image-label``) with a multiscale pyramid:
arrays ``0`` (full resolution, written by the blocks), ``1``, ``2``, ... each halving y and x
(:mod:`pipeline.downsample`), until a level fits one chunk. Every level carries the input's
pixel size and units (:mod:`pipeline.coordinates`) times its factor, and for ``mode``
downsampling the translation to its windows' centres. Classes get a colour each (the
workflow's, or a fixed palette) and their names as properties, as napari and other viewers
read them.

Levels are computed after every block is written, level by level, one task per chunk of the
new level reading the ``2c x 2c`` pixels beneath it in the level before (never a whole level
in memory). A level chunk is a pure function of the level below, so a task Dask runs twice,
or a resumed run, writes the same bytes.
"""

from __future__ import annotations

import colorsys
import json
import os
import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from ..coordinates import PixelGrid, level_transformations
from ..downsample import FACTOR, Downsampling, downsample, level_offset, level_scale
from ..errors import OutputExistsError
from ..geometry import Box
from . import fs
from .labels import check_chunk_aligned, check_run, open_for_write, open_label_volume

NGFF_VERSION = "0.5"
# Distinct colours for the first classes (RGB), then hues around the circle by the golden angle.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)  # fmt: skip


def default_colour(class_id: int) -> tuple[int, int, int]:
    if class_id < len(_PALETTE):
        return _PALETTE[class_id]
    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618033988749895) % 1.0, 0.75, 0.95)
    return (round(r * 255), round(g * 255), round(b * 255))


def label_group_attributes(
    name: str,
    level_count: int,
    grid: PixelGrid,
    downsampling: Downsampling,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    class_colours: Sequence[tuple[int, int, int] | None] | None = None,
    source_image: str | None = None,
    version: str = NGFF_VERSION,
) -> dict[str, Any]:
    """The group's ``ome`` attribute: multiscales over ``level_count`` levels and image-label
    (``version`` "0.4": the top-level attributes of a zarr 2 group, as OME-NGFF 0.4 has them)."""
    ndim = len(grid.scale)
    axis_names = "zyx"[-ndim:]
    axes = []
    for axis, unit in zip(axis_names, grid.units):
        entry: dict[str, Any] = {"name": axis, "type": "space"}
        if unit is not None:
            entry["unit"] = unit
        axes.append(entry)
    datasets = []
    for level in range(level_count):
        factors = (1,) * (ndim - 2) + (level_scale(level),) * 2
        offsets = (0.0,) * (ndim - 2) + (level_offset(level, downsampling),) * 2
        datasets.append({"path": str(level), "coordinateTransformations": level_transformations(grid, factors, offsets)})
    colours = []
    properties = []
    for class_id in range(num_classes):
        given = class_colours[class_id] if class_colours and class_id < len(class_colours) else None
        rgb = given or default_colour(class_id)
        colours.append({"label-value": class_id, "rgba": [*map(int, rgb), 255]})
        if class_names and class_id < len(class_names):
            properties.append({"label-value": class_id, "class": class_names[class_id]})
    image_label: dict[str, Any] = {"version": NGFF_VERSION, "colors": colours}
    if properties:
        image_label["properties"] = properties
    if source_image is not None:
        image_label["source"] = {"image": source_image}
    multiscale: dict[str, Any] = {
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": downsampling,
        "metadata": {"method": "pipeline.downsample", "description": f"{downsampling} of 2 x 2 windows (y, x) per level"},
    }
    if version == "0.4":
        return {"multiscales": [{"version": "0.4", **multiscale}], "image-label": {**image_label, "version": "0.4"}}
    return {"version": NGFF_VERSION, "multiscales": [multiscale], "image-label": image_label}


LABELS_GROUP = "labels"


def label_image_name(output: str, image: str) -> str | None:
    """``name`` when ``output`` is ``<image>/labels/<name>`` of the OME-Zarr image at ``image``
    (where the specification puts an image's label images), else None."""
    name = _name_in_labels_group(output, image)
    return name if name is not None and read_multiscales(image) is not None else None


def _name_in_labels_group(output: str, image: str) -> str | None:
    """``name`` when ``output`` is ``<image>/labels/<name>`` by its path alone."""
    if fs.is_local(output) != fs.is_local(image):
        return None
    if fs.is_local(output):
        out, source = fs.location(output), fs.location(image)
    else:
        out, source = fs.bare_url(output), fs.bare_url(image)
    prefix = source.rstrip("/") + f"/{LABELS_GROUP}/"
    name = out[len(prefix) :] if out.startswith(prefix) else ""
    return None if not name or "/" in name or name in (".", "..") else name


def source_image_path(volume: str, image: str) -> str | None:
    """``image-label.source.image`` of a volume computed from ``image``: the path from the
    volume to the OME-Zarr image, relative as the specification has it (``../../`` from the
    image's own ``labels/<name>``); None when the input is no OME-Zarr image or lies in
    another store."""
    if fs.is_local(volume) != fs.is_local(image) or read_multiscales(image) is None:
        return None
    if _name_in_labels_group(volume, image) is not None:
        return "../../"
    if fs.is_local(volume):
        return os.path.relpath(fs.location(image), fs.location(volume))
    (scheme, out), (scheme_in, source) = (fs.bare_url(volume).split("://", 1), fs.bare_url(image).split("://", 1))
    if scheme != scheme_in or out.split("/", 1)[0] != source.split("/", 1)[0]:
        return None  # another bucket: no relative path leads there
    return posixpath.relpath(source, out)


def check_label_group(image: str, name: str) -> None:
    """Labels may go into ``<image>/labels/`` only of an OME-NGFF 0.5 (zarr 3) image whose
    ``labels`` group, if there is one, is a group this pipeline can add a name to."""
    if not fs.is_file(fs.join(image, "zarr.json")):
        raise OutputExistsError(
            f"output.path: {fs.redact(image)} is an OME-NGFF 0.4 (zarr 2) image; label images inside it "
            f"must be zarr 2 too, which this pipeline does not write: choose an output outside the image"
        )
    _label_names(image)  # readable, or an error naming the group


def register_label(image: str, name: str) -> None:
    """List ``name`` in the image's ``labels`` group (created if missing), once its volume is
    complete: a viewer finds only finished label images. The image's own arrays and
    metadata are never touched."""
    names = _label_names(image)
    if name in names:
        return
    path = fs.join(image, LABELS_GROUP)
    with fs.storage_errors("output.path", path, "write"):
        group = zarr.open_group(store=fs.zarr_store(path, read_only=False), mode="a", zarr_format=3)
        existing = group.attrs.get("ome")
        ome = dict(existing) if isinstance(existing, dict) else {"version": NGFF_VERSION}
        ome["labels"] = [*names, name]
        group.attrs["ome"] = ome


def _label_names(image: str) -> list[str]:
    """The names the image's ``labels`` group lists (none when it has no such group)."""
    path = fs.join(image, LABELS_GROUP, "zarr.json")
    with fs.storage_errors("output.path", path):
        if not fs.exists(path):
            return []
        try:
            document = json.loads(fs.read_bytes(path))
            names = (document.get("attributes", {}).get("ome") or {}).get("labels", [])
            if document.get("node_type") != "group" or not isinstance(names, list):
                raise ValueError("not a group listing label images")
        except (ValueError, AttributeError) as exc:
            raise OutputExistsError(
                f"output.path: {fs.redact(path)} is not an OME-Zarr labels group ({exc}); refusing to change it"
            ) from None
    return [str(n) for n in names]


def read_multiscales(image: str) -> list[Any] | None:
    """The ``multiscales`` of the OME-Zarr group at ``image`` (NGFF 0.5 or 0.4), None if none."""
    for name in ("zarr.json", ".zattrs"):
        try:
            document = json.loads(fs.read_bytes(fs.join(image, name)))
        except (OSError, ValueError):
            continue
        attributes = document.get("attributes", {}) if name == "zarr.json" else document
        found = (attributes.get("ome") or {}).get("multiscales") or attributes.get("multiscales")
        return found if isinstance(found, list) and found else None
    return None


def open_level(path: str, level: int, array: str | None = None) -> tuple[zarr.Array, dict[str, Any]]:
    """Pyramid ``level`` of the complete label volume at ``path`` (or its other ``array``,
    e.g. ``probabilities``), and the group's attributes."""
    open_label_volume(path)  # refuses an unfinished volume, or one this pipeline did not write
    group = zarr.open_group(store=fs.zarr_store(path, read_only=True), mode="r")
    attributes: dict[str, Any] = dict(group.attrs)
    if array is not None:
        other = group.get(array)
        if not isinstance(other, zarr.Array):
            raise ValueError(f"{fs.redact(path)} holds no array {array!r} (written with output.probabilities only)")
        return other, attributes
    multiscales = attributes.get("ome", {}).get("multiscales") or attributes.get("multiscales") or [{}]
    datasets = multiscales[0].get("datasets", [{"path": "0"}])
    if not 0 <= level < len(datasets):
        raise ValueError(f"{fs.redact(path)}: level {level}; the volume has levels 0 to {len(datasets) - 1}")
    found = group[datasets[level]["path"]]
    if not isinstance(found, zarr.Array):
        raise ValueError(f"{fs.redact(path)}: level {level} is not an array")
    return found, attributes


def level_chunk_indices(path: str, level: int) -> list[tuple[int, ...]]:
    """Every chunk of pyramid ``level`` (>= 1): one task each."""
    array = zarr.open_array(store=fs.zarr_store(fs.join(path, str(level)), read_only=True), mode="r")
    grid = [-(-n // c) for n, c in zip(array.shape, array.chunks)]
    return list(np.ndindex(*grid))


def write_level_chunk(
    index: tuple[int, ...], path: str, run_id: str, level: int, method: Downsampling, storage: fs.StorageRules
) -> None:
    """Compute chunk ``index`` of pyramid ``level`` from ``level - 1`` and write it whole
    (a task: ``storage`` are the run's storage options)."""
    fs.use_rules(storage)
    check_run(path, run_id)
    target = open_for_write(path, run_id, str(level))
    source = zarr.open_array(store=fs.zarr_store(fs.join(path, str(level - 1)), read_only=True), mode="r")
    chunks = tuple(target.chunks)
    start = tuple(i * c for i, c in zip(index, chunks))
    box = Box(start, tuple(min(c, n - s) for c, n, s in zip(chunks, target.shape, start)))
    check_chunk_aligned(box, tuple(target.shape), chunks)
    lead = len(chunks) - 2
    read = tuple(
        slice(s, s + n) if axis < lead else slice(FACTOR * s, min(FACTOR * (s + n), source.shape[axis]))
        for axis, (s, n) in enumerate(zip(box.offset, box.shape))
    )
    target[box.slices()] = downsample(np.asarray(source[read]), method)
