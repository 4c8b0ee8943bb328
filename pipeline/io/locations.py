"""Where outputs may go: never onto an input, always somewhere writable (checked up front).

Paths are compared after resolving symbolic links and ``..``, and existing files also by
identity (hard links), so ``out -> data/slide.tif`` or ``data/../data/slide.tif`` is the
input however it is spelt; URLs are compared as keys of the same bucket. An output may not
be an input, contain one (overwriting would delete it) or lie inside one (a zarr or
OME-Zarr input folder).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import OutputExistsError, PipelineError
from . import fs


def check_not_an_input(output: str, field: str, inputs: Mapping[str, str | None]) -> None:
    """Refuse an output that is, contains or lies inside any of ``inputs`` (field -> path)."""
    if not fs.is_local(output):
        _check_url_not_an_input(output, field, inputs)
        return
    out = Path(os.path.realpath(fs.local_path(output)))
    for name, path in inputs.items():
        if path is None or not fs.is_local(path):
            continue
        source = Path(os.path.realpath(fs.local_path(path)))
        if out == source or _same_file(output, path):
            raise OutputExistsError(
                f"{field}: {output} is the {name} {path}; refusing to write over an input"
            )
        if out in source.parents:
            raise OutputExistsError(
                f"{field}: {output} contains the {name} {path}; refusing an output that would "
                f"replace an input"
            )
        if source in out.parents:
            raise OutputExistsError(
                f"{field}: {output} lies inside the {name} {path}; choose a path outside the inputs"
            )


def _check_url_not_an_input(output: str, field: str, inputs: Mapping[str, str | None]) -> None:
    out = fs.bare_url(output)
    for name, path in inputs.items():
        if path is None or fs.protocol(path) != fs.protocol(output):
            continue
        source = fs.bare_url(path)
        shown, shown_source = fs.redact(output), fs.redact(path)
        if out == source:
            raise OutputExistsError(f"{field}: {shown} is the {name} {shown_source}; refusing to write over an input")
        if source.startswith(out + "/"):
            raise OutputExistsError(
                f"{field}: {shown} contains the {name} {shown_source}; refusing an output that would "
                f"replace an input"
            )
        if out.startswith(source + "/"):
            raise OutputExistsError(
                f"{field}: {shown} lies inside the {name} {shown_source}; choose a path outside the inputs"
            )


def check_writable(path: str, field: str) -> None:
    """The nearest existing folder above ``path`` must be a writable folder on a writable mount.

    In a store: a writable protocol, and a bucket that exists and these credentials can list.
    """
    if not fs.is_local(path):
        fs.check_store_writable(path, field)
        return
    p = Path(os.path.abspath(fs.local_path(path)))
    ancestor = p.parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PipelineError(f"{field}: cannot create {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PipelineError(f"{field}: cannot create {path}: no permission to write in {ancestor}")
    try:
        read_only = bool(os.statvfs(ancestor).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise PipelineError(f"{field}: cannot create {path}: {ancestor} is on a read-only file system")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
