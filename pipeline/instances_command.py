"""``pipeline instances LABELS``: the objects of an existing label volume or label image.

The same instance volume and object table as a workflow's ``instances:`` section, for
labels written earlier (by ``pipeline run``, or any integer label image: zarr, TIFF, PNG).
"""

from __future__ import annotations

import argparse
import sys

import dask.array as da
import numpy as np

from .coordinates import PixelGrid
from .errors import PipelineError
from .instance_labels import InstanceSpec, check_connectivity, label_blocks
from .instance_volume import check_instance_classes, default_instances_path, write_instance_volume
from .io import fs
from .io.coordinates import read_pixel_grid
from .io.images import ImageSpec, as_dask_array, open_image
from .io.labels import is_label_volume, open_label_volume, recorded_run
from .io.locations import check_not_an_input, check_writable
from .io.ome import check_label_group, label_image_name, register_label


def instances_command(args: argparse.Namespace) -> int:
    labels, num_classes, grid = _labels(args.labels)
    ndim = labels.ndim
    neighbours = args.connectivity or (4 if ndim == 2 else 6)
    check_connectivity(ndim, neighbours, "--connectivity")
    if bool(args.grow_into) != bool(args.grow_by):
        raise PipelineError(
            "--grow-into and --grow-by: give both (classes to grow into, and by how many pixels)"
        )
    spec = InstanceSpec(
        tuple(args.classes), neighbours, args.min_size, tuple(args.grow_into or ()), args.grow_by
    )
    check_instance_classes(spec, num_classes, ("--classes", "--grow-into"))
    if spec.grow_by and min(labels.chunksize) < spec.grow_by:
        raise PipelineError(
            f"--grow-by: {spec.grow_by} pixels is more than the blocks' edge {min(labels.chunksize)}"
        )
    target = args.out or default_instances_path(args.labels, zarr=is_label_volume(args.labels))
    image_root = fs.parent(fs.parent(target))  # when the target is <image>/labels/<name>
    name = label_image_name(target, image_root)
    inputs = {"LABELS": args.labels, **({"--image": args.image} if args.image else {})}
    if name is not None:  # beside the classes in an OME-Zarr image's labels group: listed there when done
        check_label_group(image_root, name)
        inputs = {k: v for k, v in inputs.items() if not (v and fs.location(v) == fs.location(image_root))}
    check_not_an_input(target, "--out", inputs)
    check_writable(target, "--out")
    image = None
    if args.image:
        image = as_dask_array(
            ImageSpec(args.image, args.image_channel_axis, "--image", volume=True)
        )
        if tuple(image.shape[1:]) != tuple(labels.shape):
            raise PipelineError(
                f"--image: {fs.redact(args.image)} has spatial shape {tuple(image.shape[1:])}, but the labels "
                f"have shape {tuple(labels.shape)}; expected the same"
            )
    result = write_instance_volume(
        labels, target, spec, overwrite=args.overwrite, grid=grid, image=image,
        provenance={"labels": fs.name(args.labels)}, ngff="0.5", pyramid=not args.no_pyramid, out=sys.stdout,
        names=("--out" if args.out else "LABELS_instances", "--overwrite"),
    )  # fmt: skip
    if name is not None:
        register_label(image_root, name)
    return 0 if result.path else 1


def _labels(path: str) -> tuple[da.Array, int | None, PixelGrid]:
    """The labels as a spatial Dask array, their class count when known, their pixel grid."""
    if is_label_volume(path):
        array = open_label_volume(path)
        record = recorded_run(path) or {}
        if "instances" in record:
            raise PipelineError(
                f"LABELS: {fs.redact(path)} is an instance volume already; expected class labels"
            )
        pixels = record.get("pixels") or {}
        grid = PixelGrid(
            tuple(pixels.get("scale") or (1.0,) * array.ndim),
            tuple(pixels.get("units") or (None,) * array.ndim),
            str(pixels.get("source", "none")),
        )
        classes = record.get("workflow", {}).get("model", {}).get("num_classes")
        return da.from_zarr(array), (int(classes) if classes else None), grid
    spec = ImageSpec(path, None, "LABELS", volume=True)
    reader = open_image(spec)
    if reader.channels != 1:
        raise PipelineError(
            f"LABELS: {fs.redact(path)} has {reader.channels} channels; expected one of class ids"
        )
    if not np.issubdtype(reader.dtype, np.integer):
        raise PipelineError(
            f"LABELS: {fs.redact(path)}: expected integer class ids, got dtype {reader.dtype}"
        )
    return label_blocks(as_dask_array(spec)[0]), None, read_pixel_grid(reader)
