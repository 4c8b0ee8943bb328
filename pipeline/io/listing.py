"""Name the images a path, folder, glob or list stands for, so that sets of images pair up.

Every image gets a *name* that does not depend on where its set lives, so that an input
set, its ground truth and its predictions pair by name:

- a glob: the path parts its wildcards matched, without the suffix
  (``dubai/*/images/*.jpg`` names ``Tile 1/image_part_001``, and so does
  ``dubai/*/masks/*.png`` for the mask beside it); with ``**``, the path below the glob's
  fixed prefix;
- a folder: the path below it, without the suffix (zarr folders are one image each);
- a list: each file's name without the suffix (the path below the list's common folder
  when two names clash);
- a single path: its name without the suffix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePosixPath

from ..errors import PipelineError
from . import fs
from .images import PILLOW_SUFFIXES, TIFF_SUFFIXES, ZARR_METADATA

IMAGE_SUFFIXES = TIFF_SUFFIXES + PILLOW_SUFFIXES + (".zarr",)
WILDCARDS = "*?["


def is_pattern(path: str) -> bool:
    """A glob, unless a file or folder of that very name exists (``scan[1].tif``)."""
    return any(ch in path for ch in WILDCARDS) and not fs.exists(path)


def names_many(path: str | Sequence[str]) -> bool:
    """Whether ``path`` stands for a set of images: a list, a glob, or a folder that is
    not itself a zarr image."""
    if not isinstance(path, str):
        return True
    if any(ch in path for ch in WILDCARDS):
        return is_pattern(path)
    if not fs.is_local(path) and _is_image(path):
        return False  # an image by its name: no query to a store before the run's own checks
    return fs.is_dir(path) and not is_zarr(path)


def list_images(
    path: str | Sequence[str], field: str, error: type[PipelineError] = PipelineError
) -> dict[str, str]:
    """``{name: path}`` of the images ``path`` stands for (see the module docstring); an
    empty set, a missing file or two images of one name are ``error`` naming ``field``."""
    if not isinstance(path, str):
        return _listed(list(path), field, error)
    with fs.storage_errors(field, path):
        if is_pattern(path):
            files = [p for p in fs.glob(path) if _is_image(p)]
            named = [(glob_name(path, p), p) for p in files]
        elif fs.is_dir(path) and not is_zarr(path):
            named = [(_below(p, path), p) for p in images_under(path)]
        elif fs.exists(path):
            return {fs.stem(path): path}
        else:
            raise error(f"{field}: not found: {fs.redact(path)}")
    if not named:
        raise error(
            f"{field}: no images in {fs.redact(path)} (expected files ending in "
            f"{', '.join(IMAGE_SUFFIXES)})"
        )
    return _unique(named, field, error)


def fixed_folder(path: str) -> str:
    """``path`` up to the folder holding its first wildcard or ``{name}`` (the path itself
    when it has none): where every path it stands for lies, for storage options."""
    cut = re.search(r"[*?\[{]", path)
    if cut is None:
        return path
    head = path[: cut.start()]
    return head[: head.rfind("/") + 1] if "/" in head else ""


def glob_name(pattern: str, path: str) -> str:
    """The parts of ``path`` that ``pattern``'s wildcards matched, without the suffix."""
    pattern_parts = pattern.replace("\\", "/").rstrip("/").split("/")
    path_parts = path.replace("\\", "/").rstrip("/").split("/")
    if "**" in pattern or len(path_parts) < len(pattern_parts):
        prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
        base = prefix.rstrip("/") if prefix.endswith("/") or fs.is_dir(prefix) else fs.parent(prefix)
        return _below(path, base)
    aligned = zip(pattern_parts, path_parts[len(path_parts) - len(pattern_parts) :], strict=True)
    kept = [part for wild, part in aligned if any(ch in wild for ch in WILDCARDS)]
    return _without_suffix("/".join(kept))


def images_under(root: str) -> list[str]:
    """Image files under ``root``, and zarr folders (not the files inside them)."""
    keys = [_relative(f, root) for f in fs.files_under(root)]
    zarr_roots = set()
    for key in keys:
        parts = key.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder.lower().endswith(".zarr") or parts[depth] in ZARR_METADATA and depth == len(parts) - 1:
                zarr_roots.add(folder)
                break
    found = set()
    for key in keys:
        parts = key.split("/")
        inside = next(("/".join(parts[:d]) for d in range(1, len(parts)) if "/".join(parts[:d]) in zarr_roots), None)
        found.add(inside if inside is not None else key)
    return sorted(fs.join(root, *key.split("/")) for key in found if _is_image(key) or key in zarr_roots)


def is_zarr(path: str) -> bool:
    return any(fs.is_file(fs.join(path, name)) for name in ZARR_METADATA)


def _listed(paths: list[str], field: str, error: type[PipelineError]) -> dict[str, str]:
    if not paths:
        raise error(f"{field}: an empty list; expected at least one image")
    for p in paths:
        with fs.storage_errors(field, p):
            if not fs.exists(p):
                raise error(f"{field}: not found: {fs.redact(p)}")
    stems = [fs.stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return dict(zip(stems, paths, strict=True))
    common = _common_folder(paths)
    return _unique([(_below(p, common), p) for p in paths], field, error)


def _unique(named: list[tuple[str, str]], field: str, error: type[PipelineError]) -> dict[str, str]:
    listing: dict[str, str] = {}
    for name, p in sorted(named):
        if name in listing:
            raise error(
                f"{field}: {fs.redact(listing[name])} and {fs.redact(p)} are both named {name!r} "
                f"(names are the path parts the wildcards match, without suffix); keep one"
            )
        listing[name] = p
    return listing


def _common_folder(paths: list[str]) -> str:
    parts = [p.replace("\\", "/").split("/")[:-1] for p in paths]
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    return "/".join(common)


def _below(path: str, base: str) -> str:
    return _without_suffix(_relative(path, base))


def _relative(path: str, base: str) -> str:
    path, base = path.replace("\\", "/"), base.replace("\\", "/").rstrip("/")
    return path[len(base) + 1 :] if path.startswith(base + "/") else fs.name(path)


def _without_suffix(name: str) -> str:
    return str(PurePosixPath(name).with_suffix("")) if PurePosixPath(name).suffix else name


def _is_image(path: str) -> bool:
    return fs.suffix(path).lower() in IMAGE_SUFFIXES
