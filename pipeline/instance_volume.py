"""An instance volume written like a label volume: locked, signed, ``running`` until whole.

The instance ids (uint64) go into an OME-Zarr label image of their own (pyramid by nearest
downsampling: ids are never mixed), and the object table beside it as
``<stem>.objects.parquet`` and ``.objects.csv``. The table files are the volume's reports:
replaced by ``overwrite`` only while they hold the bytes this pipeline wrote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TextIO

import dask
import dask.array as da
import numpy as np

from . import __version__
from .coordinates import PixelGrid
from .downsample import level_shapes
from .errors import OutputExistsError, PipelineError
from .instance_labels import InstanceSpec, instance_ids, object_columns, resolve_objects, write_ids
from .io import fs
from .io.labels import create_label_volume, mark_complete, record_reports
from .io.locks import output_lock
from .io.ome import label_group_attributes, level_chunk_indices, write_level_chunk
from .io.tables import write_table

FIELD = "instances.path"


@dataclass(frozen=True)
class InstanceResult:
    path: str
    objects: int
    parquet: str
    csv: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "objects": self.objects, "parquet": self.parquet, "csv": self.csv,
                "seconds": round(self.seconds, 3)}  # fmt: skip


def default_instances_path(labels: str, zarr: bool = True) -> str:
    """``out/slide.zarr`` -> ``out/slide_instances.zarr``; ``img.zarr/labels/cells`` ->
    ``img.zarr/labels/cells_instances``; labels that are not zarr (``zarr`` false, a TIFF
    say): ``<stem>_instances.zarr``."""
    suffix = fs.suffix(labels) if zarr else ".zarr"
    return fs.sibling(labels, f"{fs.stem(labels)}_instances{suffix}")


def table_paths(volume: str) -> tuple[str, str]:
    stem = fs.stem(volume)
    return fs.sibling(volume, f"{stem}.objects.parquet"), fs.sibling(volume, f"{stem}.objects.csv")


def write_instance_volume(
    class_ids: da.Array,
    target: str,
    spec: InstanceSpec,
    *,
    overwrite: bool,
    grid: PixelGrid,
    image: da.Array | None = None,
    provenance: dict[str, Any] | None = None,
    ngff: str = "0.5",
    pyramid: bool = True,
    out: TextIO | None = None,
    names: tuple[str, str] = (FIELD, "output.overwrite: true"),
) -> InstanceResult:
    """Label the objects of ``class_ids`` (spatial Dask array of class ids) into ``target``
    (``names``: the target's field and the way to allow overwriting, for messages)."""
    start = time.perf_counter()
    shape, chunks = tuple(class_ids.shape), tuple(int(c) for c in class_ids.chunksize)
    parquet, csv = table_paths(target)
    storage = fs.active_rules()
    with output_lock(target, FIELD):
        objects = resolve_objects(class_ids, spec)
        levels = level_shapes(shape, chunks)[1:] if pyramid else []
        try:
            run_id = create_label_volume(
                target, shape=shape, chunks=chunks, dtype=np.dtype(np.uint64),
                provenance={**(provenance or {}), "version": __version__, "instances": spec.as_dict(),
                            "pixels": grid.as_dict(), "pyramid": {"levels": len(levels), "downsampling": "nearest"}},
                overwrite=overwrite, reports=[parquet, csv], pyramid=levels,
                ome=label_group_attributes(fs.stem(target), 1 + len(levels), grid, "nearest", 0, version=ngff),
                ngff=ngff,
            )  # fmt: skip
        except OutputExistsError as exc:
            raise OutputExistsError(as_field(str(exc), *names)) from None
        ids = instance_ids(class_ids, spec, objects)
        stats = write_ids(ids, target, run_id, image, storage)
        for level in range(1, len(levels) + 1):
            tasks = [
                dask.delayed(write_level_chunk, pure=False)(
                    index, target, run_id, level, "nearest", storage
                )
                for index in level_chunk_indices(target, level)
            ]
            dask.compute(tasks)
        channels = 0 if image is None else int(image.shape[0])
        columns = object_columns(stats, objects, grid.scale, grid.units, channels)
        write_table(
            columns, parquet, csv, {"instances": str(spec.as_dict()), "volume": fs.name(target)}
        )
        seconds = time.perf_counter() - start
        mark_complete(target, run_id, {"objects": objects.count, "seconds": round(seconds, 3)})
        record_reports(target, run_id, [parquet, csv])
    if out is not None:
        print(f"instances  {objects.count} objects -> {fs.redact(target)}", file=out, flush=True)
        print(f"objects    {fs.redact(parquet)}, {fs.redact(csv)}", file=out, flush=True)
    return InstanceResult(target, objects.count, parquet, csv, seconds)


def as_field(message: str, field: str = FIELD, overwrite: str = "output.overwrite: true") -> str:
    """The volume checks speak of ``output.path``; here the volume is ``field``, replaced
    when ``overwrite`` (the workflow's ``output.overwrite: true``, or a command's flag)."""
    message = message.replace("output.path:", f"{field}:", 1)
    return message.replace("set output.overwrite: true", f"set {overwrite}")


def check_instance_classes(spec: InstanceSpec, num_classes: int | None, fields: tuple[str, str]) -> None:
    """Refuse class ids the labels cannot hold (``num_classes`` None: unknown, not checked);
    ``fields`` name the classes and the grow-into classes in messages."""
    for field, ids in zip(fields, (spec.classes, spec.grow_into)):
        bad = [c for c in ids if c < 0 or (num_classes is not None and c >= num_classes)]
        if bad:
            expected = f"0..{num_classes - 1}" if num_classes is not None else "ids >= 0"
            raise PipelineError(f"{field}: class {bad[0]} is not a class of the labels (expected {expected})")
    overlap = set(spec.classes) & set(spec.grow_into)
    if overlap:
        raise PipelineError(
            f"{fields[1]}: class {min(overlap)} is also in {fields[0]}; objects grow into other classes"
        )
