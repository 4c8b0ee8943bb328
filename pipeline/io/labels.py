"""Label volumes: an OME-Zarr 0.5 group (zarr format 3) holding one label array, ``0``.

Layout of ``out/slide.zarr``::

    zarr.json          group: ome.multiscales (napari opens it), pipeline.* provenance
    0/zarr.json        uint8/uint16 array, chunks = the tiling's blocks
    0/c/i/j            one chunk per block, written whole by exactly one task

``pipeline.status`` is ``"running"`` from creation and becomes ``"complete"`` only after
every block is written: a crashed run never looks complete. Rewriting a block (Dask
retries a task whose worker died) writes the same bytes to the same whole chunk.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import OutputExistsError, OutputIncompleteError
from ..geometry import Box

LABEL_ARRAY = "0"
STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer type holding class ids ``0 .. num_classes - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def check_output_free(path: str, overwrite: bool) -> None:
    """Refuse to touch an existing output unless overwriting one of ours was asked for."""
    p = Path(path)
    if not p.exists():
        return
    status = _status_of(p)
    if not overwrite:
        what = "a complete label volume" if status == STATUS_COMPLETE else (
            "an unfinished run's label volume" if status else "a file or folder"
        )
        raise OutputExistsError(
            f"output.path: {path} already exists ({what}); set output.overwrite: true to "
            f"replace it, or choose another path"
        )
    if status is None:
        raise OutputExistsError(
            f"output.path: {path} exists and is not a label volume written by this pipeline; "
            f"refusing to delete it even with output.overwrite: true"
        )


def create_label_volume(
    path: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: np.dtype,
    provenance: dict[str, Any],
    overwrite: bool,
) -> str:
    """Create the group and an empty label array, marked ``running``; returns the run id."""
    check_output_free(path, overwrite)
    if Path(path).exists():
        shutil.rmtree(path)
    run_id = uuid.uuid4().hex
    axes = [{"name": n, "type": "space"} for n in "zyx"[-len(shape) :]]
    group = zarr.open_group(path, mode="w", zarr_format=3)
    group.create_array(
        LABEL_ARRAY,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=0,
        dimension_names=[a["name"] for a in axes],
    )
    group.attrs.update(
        {
            "ome": {
                "version": "0.5",
                "multiscales": [
                    {
                        "name": Path(path).stem,
                        "axes": axes,
                        "datasets": [
                            {
                                "path": LABEL_ARRAY,
                                "coordinateTransformations": [
                                    {"type": "scale", "scale": [1.0] * len(shape)}
                                ],
                            }
                        ],
                    }
                ],
                "image-label": {"version": "0.5"},
            },
            "pipeline": {
                **provenance,
                "status": STATUS_RUNNING,
                "run_id": run_id,
                "started": _now(),
            },
        }
    )
    return run_id


def write_block(path: str, run_id: str, box: Box, labels: np.ndarray) -> None:
    """Write one block's labels; the box must cover whole chunks (checked, not assumed).

    ``run_id`` keys the per-process cache of open arrays, so a volume recreated under the
    same path is never written through a stale handle.
    """
    array = _open_for_write(path, run_id)
    check_chunk_aligned(box, tuple(array.shape), tuple(array.chunks))
    if labels.shape != box.shape:
        raise ValueError(f"labels of shape {labels.shape} for box {box}")
    array[box.slices()] = labels


def check_chunk_aligned(box: Box, shape: tuple[int, ...], chunks: tuple[int, ...]) -> None:
    """A write must start on a chunk boundary and end on one (or at the array's end).

    Misaligned concurrent writes to shared chunks lose data silently (dask #12583,
    zarr-python #3682), so this is an error, not a warning.
    """
    for o, s, n, c in zip(box.offset, box.shape, shape, chunks):
        end = o + s
        if o % c or (end % c and end != n) or o < 0 or end > n:
            raise ValueError(f"write box {box} is not aligned to chunks {chunks} of shape {shape}")


def mark_complete(path: str, summary: dict[str, Any]) -> None:
    group = zarr.open_group(path, mode="r+")
    info = dict(group.attrs["pipeline"])
    info.update(summary)
    info["status"] = STATUS_COMPLETE
    info["finished"] = _now()
    group.attrs["pipeline"] = info


def open_label_volume(path: str, require_complete: bool = True) -> zarr.Array:
    """The label array of a volume; refuses an unfinished one unless told otherwise."""
    status = _status_of(Path(path))
    if status is None:
        raise OutputIncompleteError(f"{path}: not a label volume written by this pipeline")
    if require_complete and status != STATUS_COMPLETE:
        raise OutputIncompleteError(
            f"{path}: label volume is incomplete (status {status!r}): its run did not finish"
        )
    return zarr.open_group(path, mode="r")[LABEL_ARRAY]


def is_label_volume(path: str) -> bool:
    """Whether ``path`` is a volume written by this pipeline (complete or not)."""
    return _status_of(Path(path)) is not None


def _status_of(path: Path) -> str | None:
    if not (path / "zarr.json").is_file():
        return None
    try:
        attrs = zarr.open_group(str(path), mode="r").attrs
    except Exception:
        return None
    info = attrs.get("pipeline")
    return info.get("status") if isinstance(info, dict) else None


@lru_cache(maxsize=8)
def _open_for_write(path: str, run_id: str) -> zarr.Array:
    return zarr.open_array(str(Path(path) / LABEL_ARRAY), mode="r+")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
