"""Where outputs may go: never onto an input, always somewhere writable (checked up front).

Paths are compared after resolving symbolic links and ``..``, and existing files also by
identity (hard links), so ``out -> data/slide.tif`` or ``data/../data/slide.tif`` is the
input however it is spelt. An output may not be an input, contain one (overwriting would
delete it) or lie inside one (a zarr or OME-Zarr input folder).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import OutputExistsError, PipelineError


def is_url(path: str) -> bool:
    return "://" in path


def check_not_an_input(output: str, field: str, inputs: Mapping[str, str | None]) -> None:
    """Refuse an output that is, contains or lies inside any of ``inputs`` (field -> path)."""
    if is_url(output):
        return
    out = Path(os.path.realpath(output))
    for name, path in inputs.items():
        if path is None or is_url(path):
            continue
        source = Path(os.path.realpath(path))
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


def check_writable(path: str, field: str) -> None:
    """The nearest existing folder above ``path`` must be a writable folder on a writable mount."""
    if is_url(path):
        return
    p = Path(os.path.abspath(path))
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
