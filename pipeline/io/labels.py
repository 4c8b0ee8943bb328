"""Label volumes: an OME-Zarr 0.5 group (zarr format 3) holding one label array, ``0``.

Layout of ``out/slide.zarr`` (a local folder or a prefix in an object store)::

    zarr.json          group: ome.multiscales + image-label (napari opens it), pipeline.*
                       provenance, georeference (a GeoTIFF input's CRS and transform)
    0/zarr.json        uint8/uint16 array, chunks = the tiling's blocks (or ``output.chunk``)
    1/, 2/, ...        pyramid levels (y, x halved each), written after every block (:mod:`.ome`)
    0/c/i/j            one chunk per block (or per ``output.chunk``; with ``output.shard`` one
                       shard per block), written whole by exactly one task
    blocks/zarr.json   uint8 ledger, one element (and one chunk) per block
    blocks/c/i/j       written (1) only after block (i, j)'s chunk is written

The ledger is what ``--resume`` trusts: a block is done when its ledger chunk exists, and
that is written after the block's labels, so a block cut off halfway is computed again.
Which blocks are done is read by listing the ledger's prefix once, not by a read per block.

``pipeline.status`` is ``"running"`` from creation and becomes ``"complete"`` only after
the ledger records every block: a crashed run never looks complete. Rewriting a block (Dask
retries a task whose worker died) writes the same bytes to the same whole chunk.

With ``output.ngff: "0.4"`` the same layout is an OME-NGFF 0.4 group in zarr format 2 (for
older viewers): ``.zgroup``/``.zattrs``/``.zarray`` metadata, the OME attributes at the top
of ``.zattrs``, chunk keys ``0/i/j`` and ``blocks/i/j`` ("/"-separated, no ``c/``), no shards.

The ``pipeline`` record is signed (:mod:`.ownership`), so ``overwrite: true`` replaces only a
volume this user's pipeline provably wrote at this path, deletes only the entries the layout
above explains, and replaces report files only while they have the bytes the record lists.
Every block write and the completion mark check the volume's ``run_id``: a task that
outlives its run never writes into another run's volume.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import uuid
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import zarr

from ..errors import (
    OutputExistsError,
    OutputIncompleteError,
    OutputReplacedError,
    ResumeRefusedError,
)
from ..geometry import Box
from . import fs, ownership

LABEL_ARRAY = "0"
LEDGER = "blocks"
PROBABILITIES = "probabilities"  # (c, [z,] y, x): per-class probabilities, when asked for
ARRAYS = (LABEL_ARRAY, LEDGER, PROBABILITIES)
STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
# zarr's LocalStore writes through "<name>.<uuid hex>.partial" files: an interrupted write leaves one
_METADATA = re.compile(r"zarr\.json|zarr\.[0-9a-f]{32}\.partial")
_METADATA_V2 = re.compile(r"\.(zarray|zattrs|zgroup)(\.[0-9a-f]{32}\.partial)?")
_CHUNK_KEY = re.compile(r"(\d+)(\.[0-9a-f]{32}\.partial)?")


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned integer type holding class ids ``0 .. num_classes - 1``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def check_output_free(path: str, overwrite: bool, reports: Sequence[str] = ()) -> None:
    """Refuse to touch an existing output unless overwriting one proven ours was asked for.

    ``reports`` are the files a run writes beside the volume: they follow the same rule
    (replaced only when the volume being replaced records them with their current bytes).
    """
    _replaceable_record(path, overwrite, reports)


def _replaceable_record(path: str, overwrite: bool, reports: Sequence[str]) -> dict[str, Any] | None:
    """The verified record of the volume at ``path`` that may be replaced; None if there is none."""
    shown = fs.redact(path)
    with fs.storage_errors("output.path", path):
        existing = [str(r) for r in reports if fs.exists(str(r))]
        present = fs.exists(path)
    if not present:
        if existing:
            raise OutputExistsError(
                f"output.path: report file {fs.redact(existing[0])} already exists and no label "
                f"volume at {shown} records it as written by this pipeline; move it away or "
                f"choose another output path"
            )
        return None
    if not overwrite:
        status = _status_of(path)
        if status == STATUS_RUNNING:
            raise OutputExistsError(
                f"output.path: {shown} holds an interrupted run's label volume; rerun with "
                f"--resume to compute only its missing blocks, or set output.overwrite: true to "
                f"start over"
            )
        what = "a complete label volume" if status == STATUS_COMPLETE else "a file or folder"
        raise OutputExistsError(
            f"output.path: {shown} already exists ({what}); set output.overwrite: true to "
            f"replace it, or choose another path"
        )
    record = _verified_record(path)
    if record is None:
        raise OutputExistsError(
            f"output.path: {shown} exists and is not a label volume this pipeline can prove it "
            f"wrote (no valid signature of this user's key, {ownership.key_path()}); refusing to "
            f"delete it even with output.overwrite: true"
        )
    foreign = foreign_entries(path)
    if foreign:
        raise OutputExistsError(
            f"output.path: {shown} holds {len(foreign)} entr{'ies' if len(foreign) > 1 else 'y'} "
            f"this pipeline did not write (e.g. {fs.redact(foreign[0])}); refusing to delete it "
            f"even with output.overwrite: true"
        )
    ours = _recorded_reports(path, record)
    for report in existing:
        if report not in ours:
            raise OutputExistsError(
                f"output.path: report file {fs.redact(report)} was not written by the run that "
                f"wrote {shown} (or was changed since); refusing to replace it"
            )
    return record


def _recorded_reports(volume: str, record: dict[str, Any]) -> list[str]:
    """Report files beside ``volume`` that its verified record lists, still with those bytes."""
    listed = record.get("reports")
    if not isinstance(listed, dict):
        return []
    found = []
    for name, digest in listed.items():
        name = str(name)
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            continue
        report = fs.sibling(volume, name)
        if fs.is_symlink(report) or not fs.is_file(report):
            continue
        if fs.file_sha256(report) == digest:
            found.append(report)
    return found


def create_label_volume(
    path: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: np.dtype,
    provenance: dict[str, Any],
    overwrite: bool,
    reports: Sequence[str] = (),
    *,
    inner_chunks: tuple[int, ...] | None = None,
    sharded: bool = False,
    pyramid: Sequence[tuple[int, ...]] = (),
    ome: dict[str, Any] | None = None,
    attributes: dict[str, Any] | None = None,
    probabilities: tuple[int, str] | None = None,
    ngff: str = "0.5",
) -> str:
    """Create the group and an empty label array, marked ``running``; returns the run id.

    ``chunks`` is the block: the unit one task writes. ``inner_chunks`` (dividing it) is the
    unit a reader fetches: stored as separate chunks, or with ``sharded`` as the inner
    chunks of one shard per block (one object per block in a store). ``pyramid``: the
    shapes of the levels after the first (arrays ``1``, ``2``, ..., chunked like
    ``inner_chunks``), computed once every block is written (:mod:`.ome`); ``ome``: the
    group's OME-NGFF attribute (default: one level, unit-less pixels); ``attributes``: more
    group attributes (a georeference); ``probabilities``: ``(classes, dtype)`` of a
    ``probabilities`` array ``(c, *shape)`` chunked like the labels along space. Call under
    :func:`pipeline.io.locks.output_lock`: the check and the replacement must not
    interleave with another run's.
    """
    record = _replaceable_record(path, overwrite, reports)
    if record is not None:
        for report in _recorded_reports(path, record):
            fs.remove_file(report)
        delete_label_volume(path)
    run_id = uuid.uuid4().hex
    axes = [{"name": n, "type": "space"} for n in "zyx"[-len(shape) :]]
    inner = inner_chunks or chunks
    if any(c % i for c, i in zip(chunks, inner)):
        raise ValueError(f"chunks {inner} do not divide the blocks {chunks}")
    v2 = ngff == "0.4"
    if v2 and sharded:
        raise ValueError("zarr format 2 (OME-NGFF 0.4) has no shards")
    names = [a["name"] for a in axes]

    def layout(dimension_names: list[str] | None) -> dict[str, Any]:
        """What differs between the formats: key encoding, dimension names."""
        if v2:
            return {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        return {"dimension_names": dimension_names}

    with fs.storage_errors("output.path", path, "write"):
        group = zarr.open_group(store=fs.zarr_store(path, read_only=False), mode="w-", zarr_format=2 if v2 else 3)
        group.create_array(
            LABEL_ARRAY, shape=shape, chunks=inner, shards=chunks if sharded else None, dtype=dtype,
            fill_value=0, **layout(names),
        )  # fmt: skip
        for level, level_shape in enumerate(pyramid, start=1):
            group.create_array(
                str(level), shape=level_shape, chunks=tuple(min(c, n) for c, n in zip(inner, level_shape)),
                dtype=dtype, fill_value=0, **layout(names),
            )  # fmt: skip
        if probabilities is not None:
            classes, probability_dtype = probabilities
            group.create_array(
                PROBABILITIES, shape=(classes, *shape), chunks=(classes, *inner),
                shards=(classes, *chunks) if sharded else None, dtype=probability_dtype, fill_value=0,
                **layout(["c", *names]),
            )  # fmt: skip
        group.create_array(
            LEDGER, shape=tuple(-(-n // c) for n, c in zip(shape, chunks)), chunks=(1,) * len(shape),
            dtype=np.uint8, fill_value=0, **layout(None),
        )  # fmt: skip
        record = {**provenance, "status": STATUS_RUNNING, "run_id": run_id, "started": _now()}
        ome = ome or {
            "version": "0.5",
            "multiscales": [{
                "name": fs.stem(path),
                "axes": axes,
                "datasets": [{"path": LABEL_ARRAY, "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(shape)}]}],
            }],
            "image-label": {"version": "0.5"},
        }  # fmt: skip
        group.attrs.update(
            {
                **(dict(ome) if v2 else {"ome": ome}),  # OME-NGFF 0.4: at the top level of .zattrs
                "pipeline": ownership.signed(record, fs.location(path)),
                **(attributes or {}),
            }
        )
    return run_id


def delete_label_volume(path: str) -> None:
    """Delete a volume of ours: only the entries its layout explains (a store: by listing its prefix).

    Anything else (an entry that appeared since the check, a symbolic link) stays, and the
    folder holding it cannot be removed: an error, never a deleted foreign file.
    """
    grids = _chunk_grids(path)
    if fs.is_symlink(path) or grids is None:
        raise OutputExistsError(f"output.path: {fs.redact(path)} is not a label volume this pipeline can delete")
    v2 = _is_v2(path)
    fs.remove_keys(path, [".zgroup", ".zattrs"] if v2 else ["zarr.json"])  # first: a half-deleted volume must not look like one
    listed = fs.entries(path)
    fs.remove_keys(path, [e.key for e in listed if not e.is_dir and not e.is_link and _expected(e.key, False, grids, v2)])
    kept = fs.remove_empty_folders(path)
    if not fs.is_local(path):
        kept = [fs.join(path, e.key) for e in listed if not _expected(e.key, False, grids, v2)]
    if kept:
        raise OutputExistsError(
            f"output.path: {fs.redact(kept[0])} holds entries this pipeline did not write; they were kept"
        )


def foreign_entries(path: str) -> list[str]:
    """Entries under a volume that its layout does not explain (or symbolic links)."""
    if fs.is_symlink(path) or (fs.is_local(path) and not fs.is_dir(path)):
        return [path]
    grids = _chunk_grids(path)
    if grids is None:
        return [fs.join(path, LABEL_ARRAY, "zarr.json")]
    v2 = _is_v2(path)
    return [
        fs.join(path, *e.key.split("/"))
        for e in fs.entries(path)
        if e.is_link or not _expected(e.key, e.is_dir, grids, v2)
    ]


def _is_v2(path: str) -> bool:
    """Whether the volume at ``path`` is zarr format 2 (``output.ngff: "0.4"``)."""
    return not fs.is_file(fs.join(path, "zarr.json")) and fs.is_file(fs.join(path, ".zgroup"))


def _chunk_grids(path: str) -> dict[str, list[int]] | None:
    """Chunks (or shards) along each axis of each array of the volume (None if unreadable)."""
    grids = {}
    for name in ARRAYS:
        grid = _chunk_grid(path, name)
        if grid is None and name == LABEL_ARRAY:
            return None
        if grid is not None:
            grids[name] = grid
    level = 1  # pyramid levels "1", "2", ...: consecutive
    while (grid := _chunk_grid(path, str(level))) is not None:
        grids[str(level)] = grid
        level += 1
    return grids


def _chunk_grid(path: str, name: str) -> list[int] | None:
    """Chunks (or shards) along each axis of array ``name`` of the volume (None if unreadable)."""
    try:
        array = json.loads(fs.read_bytes(fs.join(path, name, "zarr.json")))
        return [-(-int(n) // int(c)) for n, c in zip(array["shape"], array["chunk_grid"]["configuration"]["chunk_shape"])]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:  # zarr format 2
        array = json.loads(fs.read_bytes(fs.join(path, name, ".zarray")))
        return [-(-int(n) // int(c)) for n, c in zip(array["shape"], array["chunks"])]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _expected(key: str, is_dir: bool, grids: dict[str, list[int]], v2: bool = False) -> bool:
    """Whether ``key`` (relative, ``/``-separated) belongs to the layout of a volume with
    ``grids`` (zarr format 3: ``<array>/c/i/j``; ``v2``: ``<array>/i/j``)."""
    parts = key.split("/")
    rel, name = tuple(parts[:-1]), parts[-1]
    metadata = _METADATA_V2 if v2 else _METADATA
    if (rel == () or (len(rel) == 1 and rel[0] in grids)) and not is_dir and metadata.fullmatch(name):
        return True
    if rel == ():
        return is_dir and name in grids
    prefix = 1 if v2 else 2  # the array's folder (and, in format 3, its "c")
    if not v2 and len(rel) == 1:
        return rel[0] in grids and is_dir and name == "c"
    grid = grids.get(rel[0])
    depth = len(rel) - prefix  # index of the chunk-grid axis this entry names
    if grid is None or (not v2 and rel[1] != "c") or depth >= len(grid):
        return False
    if any(_CHUNK_KEY.fullmatch(p) is None or int(p) >= grid[i] for i, p in enumerate(rel[prefix:])):
        return False
    match = _CHUNK_KEY.fullmatch(name)
    if match is None or int(match.group(1)) >= grid[depth]:
        return False
    last = depth == len(grid) - 1
    return (not last and match.group(2) is None) if is_dir else last


def write_block(path: str, run_id: str, box: Box, labels: np.ndarray) -> None:
    """Write one block's labels; the box must cover whole chunks (shards) (checked, not assumed).

    The volume must still be this run's (its ``run_id``): a task that outlived its run never
    writes into the volume of another. ``run_id`` also keys the per-process cache of open
    arrays, so a volume recreated under the same path is never written through a stale handle.
    """
    check_run(path, run_id)
    array = open_for_write(path, run_id, LABEL_ARRAY)
    check_chunk_aligned(box, tuple(array.shape), tuple(array.shards or array.chunks))
    if labels.shape != box.shape:
        raise ValueError(f"labels of shape {labels.shape} for box {box}")
    array[box.slices()] = labels


def write_probabilities(path: str, run_id: str, box: Box, probabilities: np.ndarray) -> None:
    """Write one block's ``(c, *box.shape)`` probabilities, as :func:`write_block` its labels."""
    check_run(path, run_id)
    array = open_for_write(path, run_id, PROBABILITIES)
    check_chunk_aligned(box, tuple(array.shape[1:]), tuple((array.shards or array.chunks)[1:]))
    if probabilities.shape[1:] != box.shape:
        raise ValueError(f"probabilities of shape {probabilities.shape} for box {box}")
    array[(slice(None),) + box.slices()] = probabilities


def check_chunk_aligned(box: Box, shape: tuple[int, ...], chunks: tuple[int, ...]) -> None:
    """A write must start on a chunk boundary and end on one (or at the array's end).

    Misaligned concurrent writes to shared chunks lose data silently (dask #12583,
    zarr-python #3682), so this is an error, not a warning.
    """
    for o, s, n, c in zip(box.offset, box.shape, shape, chunks):
        end = o + s
        if o % c or (end % c and end != n) or o < 0 or end > n:
            raise ValueError(f"write box {box} is not aligned to chunks {chunks} of shape {shape}")


def check_run(path: str, run_id: str) -> dict[str, Any]:
    """The volume's record, if it still belongs to run ``run_id``; else OutputReplacedError."""
    info = _record(path)
    found = info.get("run_id") if isinstance(info, dict) else None
    if found != run_id:
        raise OutputReplacedError(
            f"output.path: {fs.redact(path)} no longer belongs to run {run_id[:8]} "
            f"({'it was removed' if found is None else f'run {str(found)[:8]} replaced it'}); "
            f"nothing more of this run was written"
        )
    return dict(info)  # type: ignore[arg-type]


def mark_block_done(path: str, run_id: str, index: tuple[int, ...]) -> None:
    """Record in the ledger that block ``index`` is written (call after :func:`write_block`)."""
    open_for_write(path, run_id, LEDGER)[index] = 1


def done_blocks(path: str) -> set[tuple[int, ...]]:
    """The blocks the ledger records as written: its chunk keys, by one listing of its prefix."""
    chunks = fs.join(path, LEDGER) if _is_v2(path) else fs.join(path, LEDGER, "c")
    if not fs.exists(chunks):
        return set()
    done = set()
    for entry in fs.entries(chunks):
        parts = entry.key.split("/")
        if not entry.is_dir and all(p.isdigit() for p in parts):
            done.add(tuple(int(p) for p in parts))
    return done


def resume_label_volume(
    path: str, fingerprints: dict[str, Any], reports: Sequence[str] = ()
) -> tuple[str, set[tuple[int, ...]]]:
    """Take over an interrupted run's volume: its run id and the blocks already written.

    Refused (:class:`ResumeRefusedError`, naming what changed) unless the volume provably is
    this pipeline's, is unfinished, and was started with the same ``fingerprints`` (input,
    model weights, the workflow fields that decide labels, pipeline version, plan).
    Call under :func:`pipeline.io.locks.output_lock`.
    """
    shown = fs.redact(path)
    record = _replaceable_record(path, True, reports)
    if record is None:
        raise ResumeRefusedError(f"output.path: {shown}: there is no interrupted run to resume")
    if _chunk_grid(path, LEDGER) is None:
        raise ResumeRefusedError(
            f"output.path: {shown} was written by a pipeline version without a block ledger; "
            f"set output.overwrite: true to start over"
        )
    changed = changed_fingerprints(record.get("fingerprints", {}), fingerprints)
    if changed:
        raise ResumeRefusedError(
            f"output.path: cannot resume {shown}: since the interrupted run started, "
            + "; ".join(changed)
            + "; its blocks would not match: set output.overwrite: true to start over"
        )
    return str(record["run_id"]), done_blocks(path)


def is_complete(path: str) -> bool:
    return _status_of(path) == STATUS_COMPLETE


def changed_fingerprints(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two fingerprint records, as ``name changed (a -> b)`` phrases."""
    changes = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_fingerprints(a, b, f"{name}.")
        else:
            changes.append(f"{name} changed ({_short(a)} -> {_short(b)})")
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else f"{text[:16]}...{text[-12:]}"


def mark_complete(path: str, run_id: str, summary: dict[str, Any]) -> None:
    """Record the summary and mark the volume ``complete`` (re-signed).

    Only when the ledger records every block: a run never reports success with one missing.
    """
    check_run(path, run_id)
    grid = (_chunk_grids(path) or {}).get(LEDGER, [])
    missing = int(np.prod(grid)) - len(done_blocks(path))
    if missing:
        raise OutputIncompleteError(
            f"{fs.redact(path)}: {missing} block{'s' * (missing > 1)} not recorded as written; "
            f"the volume stays incomplete (rerun with --resume)"
        )
    update_record(path, run_id, {**summary, "status": STATUS_COMPLETE, "finished": _now()})


def record_reports(path: str, run_id: str, reports: Sequence[str]) -> None:
    """List the report files written beside the volume, with their SHA-256, in its record.

    A later ``overwrite: true`` replaces them only while they still have those bytes.
    """
    digests = {fs.name(str(r)): fs.file_sha256(str(r)) for r in reports}
    update_record(path, run_id, {"reports": digests})


def update_record(path: str, run_id: str, changes: dict[str, Any]) -> None:
    info = check_run(path, run_id)
    info.update(changes)
    group = zarr.open_group(store=fs.zarr_store(path, read_only=False), mode="r+")
    group.attrs["pipeline"] = ownership.signed(info, fs.location(path))


def open_label_volume(path: str, require_complete: bool = True) -> zarr.Array:
    """The label array of a volume; refuses an unfinished one unless told otherwise."""
    shown = fs.redact(path)
    status = _status_of(path)
    if status is None:
        raise OutputIncompleteError(f"{shown}: not a label volume written by this pipeline")
    if require_complete and status != STATUS_COMPLETE:
        raise OutputIncompleteError(
            f"{shown}: label volume is incomplete (status {status!r}): its run did not finish"
        )
    array = zarr.open_group(store=fs.zarr_store(path, read_only=True), mode="r")[LABEL_ARRAY]
    if not isinstance(array, zarr.Array):
        raise OutputIncompleteError(f"{shown}: {LABEL_ARRAY} is not an array; not a label volume of this pipeline")
    return array


def is_label_volume(path: str) -> bool:
    """Whether ``path`` is a volume written by this pipeline (complete or not)."""
    return _status_of(path) is not None


def recorded_run(path: str) -> dict[str, Any] | None:
    """The verified record of the volume at ``path`` (what its run planned and resolved), or None."""
    return _verified_record(path)


def _record(path: str) -> dict[str, Any] | None:
    """The group's ``pipeline`` attribute as stored (unverified), None if there is none."""
    try:
        info = json.loads(fs.read_bytes(fs.join(path, "zarr.json")))["attributes"]["pipeline"]
    except (OSError, ValueError, KeyError, TypeError):
        try:  # zarr format 2: the attributes file
            info = json.loads(fs.read_bytes(fs.join(path, ".zattrs")))["pipeline"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return info if isinstance(info, dict) else None


def _verified_record(path: str) -> dict[str, Any] | None:
    """The volume's ``pipeline`` record if its signature verifies for this location."""
    if fs.is_symlink(path):
        return None
    info = _record(path)
    return info if info is not None and ownership.verifies(info, fs.location(path)) else None


def _status_of(path: str) -> str | None:
    info = _record(path)
    status = info.get("status") if info is not None else None
    return status if isinstance(status, str) else None


@lru_cache(maxsize=8)
def open_for_write(path: str, run_id: str, name: str) -> zarr.Array:
    """Array ``name`` of this run's volume, opened once per process (``run_id`` keys the cache)."""
    # Every chunk is written, also one of zeros: one PUT, never a DELETE (and its listing).
    array = zarr.open_array(store=fs.zarr_store(fs.join(path, name), read_only=False), mode="r+")
    return array.with_config({"write_empty_chunks": True})


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
