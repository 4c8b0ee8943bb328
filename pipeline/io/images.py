"""Open images lazily: TIFF/BigTIFF through tifffile's zarr interface, zarr arrays directly.

An :class:`ImageSpec` is a small picklable description (path, channel axis, storage
options) that crosses to Dask workers; each worker process opens the file once
(:func:`open_image` caches) and reads only the regions its tasks ask for. Pixel data is
never loaded whole. In an object store a TIFF is read with ranged GETs (its header and
tile offsets once per process, then the tiles a region needs) and a zarr array costs one
GET per chunk read, with no listing.

Internally images are channel-first: ``(C, *spatial)``; a single-channel image has C = 1.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from ..errors import InputImageError
from ..geometry import Box
from ..mirror import MirrorMode, read_mirrored
from . import fs

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".gtif")
# Formats without random access: read whole (by Pillow), so for images that fit in memory.
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup")  # a folder holding one of these is a zarr node


@dataclass(frozen=True)
class ImageSpec:
    """Where an image is and how to read its axes; ``field`` names it in error messages."""

    path: str
    channel_axis: int | None = None
    field: str = "input.path"
    channels: tuple[int, ...] | None = None
    volume: bool = False  # also accept 3 spatial axes (z, y, x): label volumes for evaluation
    series: int | None = None  # the image series of a TIFF holding several
    level: int = 0  # the pyramid level of a pyramidal TIFF or an OME-Zarr multiscale image
    storage: fs.StorageRules = dataclasses.field(default_factory=fs.active_rules)  # as where the spec was made
    version: str | None = None  # of the file, pinned by the driver (pinned_version): workers need not ask


class ImageReader:
    """A lazily read image: ``shape`` is spatial, ``channels`` the channel count."""

    def __init__(self, spec: ImageSpec, array: zarr.Array | _InMemoryArray, keepalive: object = None) -> None:
        self.spec = spec
        self._array = array
        self._keepalive = keepalive  # the open TIFF file behind the store
        self._lock = threading.Lock() if keepalive is not None else None
        ndim = array.ndim
        axis = spec.channel_axis
        spatial_ok = (2, 3) if spec.volume else (2,)
        if axis is not None:
            if not -ndim <= axis < ndim:
                raise InputImageError(
                    f"{fs.redact(spec.path)}: input.channel_axis: expected an axis index in "
                    f"[{-ndim}, {ndim - 1}] for an image of shape {array.shape}, got {axis}"
                )
            axis %= ndim
            if ndim - 1 not in spatial_ok:
                raise InputImageError(
                    f"{fs.redact(spec.path)}: expected a 2D image with one channel axis (3 axes), got shape "
                    f"{array.shape}; 3D volumes are not supported yet"
                )
        elif ndim not in spatial_ok or ndim == 3 and array.shape[-1] <= 4:  # (y, x, RGB) is no stack
            hint = (
                f"; if the last axis holds channels (e.g. RGB), set input.channel_axis: {ndim - 1}"
                if ndim == 3
                else ""
            )
            what = "a 2D image or a 3D stack (z, y, x)" if spec.volume else "a 2D image"
            if ndim == 3 and spec.volume and array.shape[-1] <= 4:
                hint = f": its last axis looks like channels, not x; set input.channel_axis: {ndim - 1}"
            raise InputImageError(
                f"{fs.redact(spec.path)}: expected {what} (or input.channel_axis for a multi-channel "
                f"one), got {ndim} axes with shape {array.shape}{hint}"
            )
        self._channel_axis = axis
        spatial = [s for i, s in enumerate(array.shape) if i != axis]
        self.shape: tuple[int, ...] = tuple(int(s) for s in spatial)
        stored = 1 if axis is None else int(array.shape[axis])
        self._select = None
        if spec.channels is not None:
            bad = [c for c in spec.channels if c >= stored]
            if bad:
                raise InputImageError(
                    f"{fs.redact(spec.path)}: input.channels: index {bad[0]} is out of range for an image "
                    f"with {stored} channel{'s' * (stored > 1)} (shape {array.shape})"
                )
            if list(spec.channels) != list(range(stored)):
                self._select = list(spec.channels)
        self.channels: int = stored if spec.channels is None else len(spec.channels)
        self.dtype = np.dtype(array.dtype)
        if any(s == 0 for s in self.shape) or self.channels == 0:
            raise InputImageError(f"{fs.redact(spec.path)}: image is empty (shape {array.shape})")
        chunks = tuple(int(c) for i, c in enumerate(array.chunks) if i != axis)
        self.chunks: tuple[int, ...] = chunks

    @property
    def tiff(self) -> tifffile.TiffFile | None:
        """The open TIFF file behind the image (its header and tags); None for other formats."""
        return self._keepalive if isinstance(self._keepalive, tifffile.TiffFile) else None

    def read(self, spatial: tuple[slice, ...]) -> np.ndarray:
        """In-image region as ``(C, *spatial)``."""
        index: list[slice] = list(spatial)
        if self._channel_axis is not None:
            index.insert(self._channel_axis, slice(None))
        if self._lock is not None:
            with self._lock:
                data = self._array[tuple(index)]
        else:
            data = self._array[tuple(index)]
        data = np.asarray(data)
        data = data[np.newaxis] if self._channel_axis is None else np.moveaxis(data, self._channel_axis, 0)
        return data if self._select is None else data[self._select]

    def read_box(self, box: Box, mirror: MirrorMode) -> np.ndarray:
        """``box`` (which may reach past the image) with mirrored context, ``(C, *box.shape)``."""
        return read_mirrored(self.read, box, self.shape, mirror)


def open_image(spec: ImageSpec) -> ImageReader:
    """Open (once per process) the image at ``spec.path``; InputImageError if impossible."""
    fs.use_rules(spec.storage)
    with fs.storage_errors(spec.field, spec.path):
        return _open_cached(spec, spec.version or _version(spec))


def pinned_version(spec: ImageSpec) -> ImageSpec:
    """``spec`` with the file's current version: tasks carrying it open the file without a query."""
    fs.use_rules(spec.storage)
    with fs.storage_errors(spec.field, spec.path):
        return spec if spec.version is not None else dataclasses.replace(spec, version=_version(spec))


@lru_cache(maxsize=16)
def _open_cached(spec: ImageSpec, version: str) -> ImageReader:
    array, keepalive = _open_array(spec)
    return ImageReader(spec, array, keepalive)


def _version(spec: ImageSpec) -> str:
    """Changes when the file is replaced; a zarr folder's is its metadata file's."""
    try:
        if is_zarr(spec.path):
            return fs.version_token(_zarr_metadata(spec.path))
        return fs.version_token(spec.path)
    except (FileNotFoundError, NotADirectoryError):
        raise InputImageError(f"{spec.field}: file not found: {fs.redact(spec.path)}") from None


def is_zarr(path: str) -> bool:
    if fs.is_local(path):
        return fs.is_dir(path)
    if fs.suffix(path).lower() in TIFF_SUFFIXES + PILLOW_SUFFIXES:
        return False  # a file by its name: no query
    return _zarr_metadata(path) != path


def _zarr_metadata(path: str) -> str:
    """The metadata file of a zarr folder at ``path`` (``path`` itself if it is none)."""
    if fs.is_local(path) and not fs.is_dir(path):
        return path
    for name in ZARR_METADATA:
        candidate = fs.join(path, name)
        if fs.is_file(candidate):
            return candidate
    return path  # a folder that is no zarr: its own version; opening it says what is wrong


def _open_array(spec: ImageSpec) -> tuple[zarr.Array | _InMemoryArray, object]:
    suffix = fs.suffix(spec.path).lower()
    if is_zarr(spec.path):
        return _open_zarr(spec), None
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(spec)
    if suffix in PILLOW_SUFFIXES:
        if spec.level:
            raise _no_level(spec, ["its only image"])
        return _open_pillow(spec), None
    raise InputImageError(
        f"{spec.field}: {fs.redact(spec.path)}: unsupported image format {suffix or '(no suffix)'!r}; "
        f"expected a TIFF file ({', '.join(TIFF_SUFFIXES)}), a zarr array folder, or a small "
        f"image ({', '.join(PILLOW_SUFFIXES)})"
    )


def _open_pillow(spec: ImageSpec) -> _InMemoryArray:
    """PNG/JPEG/BMP, decoded whole; palette images become RGB (their indices mean nothing)."""
    from PIL import Image

    try:
        source = spec.path if fs.is_local(spec.path) else io.BytesIO(fs.read_bytes(spec.path))
        with Image.open(source) as opened:
            img: Image.Image = opened
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
            data = np.asarray(img)
    except Exception as exc:
        raise InputImageError(f"{spec.field}: {fs.redact(spec.path)} is not a readable image: {exc}") from None
    return _InMemoryArray(data)


def _open_tiff(spec: ImageSpec) -> tuple[zarr.Array | _InMemoryArray, object]:
    local = fs.is_local(spec.path)
    try:
        # In a store: one file object read in ranges; the header and offsets once per process.
        tif = tifffile.TiffFile(fs.local_path(spec.path) if local else fs.open_read(spec.path))
    except Exception as exc:
        if fs.describe_failure(exc) and not local:
            raise
        raise InputImageError(f"{spec.field}: {fs.redact(spec.path)} is not a readable TIFF: {exc}") from None
    array: zarr.Array | _InMemoryArray
    try:
        series = _choose_series(tif, spec)
        if spec.level >= len(series.levels):
            raise _no_level(spec, [" x ".join(map(str, level.shape)) for level in series.levels])
        if spec.level:
            array = zarr.open_array(series.aszarr(level=spec.level), mode="r")
        elif local and series.dataoffset is not None and not series.is_multifile:
            # Uncompressed and contiguous: a memory map reads only the pages a region needs,
            # where the zarr view would decode whole strips (often one strip = the image).
            array = _InMemoryArray(
                tifffile.memmap(fs.local_path(spec.path), series=tif.series.index(series), mode="r")
            )
        else:
            array = zarr.open_array(series.aszarr(level=0), mode="r")
    except InputImageError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise InputImageError(f"{spec.field}: {fs.redact(spec.path)}: cannot read TIFF image: {exc}") from None
    return array, tif


def _choose_series(tif: tifffile.TiffFile, spec: ImageSpec) -> tifffile.TiffPageSeries:
    """The series the workflow chose, or the only one; pages of a stack are named, not guessed."""
    found = tif.series
    listing = "; ".join(f"{i}: {' x '.join(map(str, s.shape))} ({s.axes})" for i, s in enumerate(found[:8]))
    if not found:
        raise InputImageError(f"{spec.field}: {fs.redact(spec.path)}: TIFF holds no image series")
    if spec.series is not None:
        if spec.series >= len(found):
            raise InputImageError(
                f"input.series: {spec.series}, but {fs.redact(spec.path)} holds {len(found)} image series ({listing})"
            )
        series = found[spec.series]
    elif len(found) > 1:
        hint = "set input.series to the one to segment" if spec.field == "input.path" else "expected one"
        raise InputImageError(
            f"{spec.field}: {fs.redact(spec.path)} holds {len(found)} image series ({listing}); {hint}"
        )
    else:
        series = found[0]
    stacked = series.ndim == 3 and series.axes[0] in "IZTQ" and series.axes[-1] != "S"
    if stacked and spec.channel_axis is None and not spec.volume:
        raise InputImageError(
            f"{spec.field}: {fs.redact(spec.path)} holds a stack of {series.shape[0]} pages of "
            f"{series.shape[1]} x {series.shape[2]} (axes {series.axes}); expected one 2D image "
            f"(3D stacks are not supported yet); if the pages are channels, set input.channel_axis: 0"
        )
    return series


class _InMemoryArray:
    """A NumPy or memory-mapped array with the interface the reader uses (nominal chunks)."""

    CHUNK = 1024

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.chunks = tuple(min(n, self.CHUNK) for n in data.shape)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.array(self._data[index])


def _open_zarr(spec: ImageSpec) -> zarr.Array:
    try:
        node = zarr.open(store=fs.zarr_store(spec.path, read_only=True), mode="r")
    except Exception as exc:
        if fs.describe_failure(exc) and not isinstance(exc, FileNotFoundError):
            raise
        raise InputImageError(
            f"{spec.field}: {fs.redact(spec.path)} is neither a TIFF file nor a zarr array: {exc}"
        ) from None
    group = node
    if isinstance(node, zarr.Array):
        try:  # the array of a label volume: its group holds the run's status
            group = zarr.open_group(store=fs.zarr_store(fs.parent(spec.path), read_only=True), mode="r")
        except Exception:
            return node
    record = group.attrs.get("pipeline")
    if isinstance(record, dict) and record.get("status") not in (None, "complete"):
        raise InputImageError(
            f"{spec.field}: {fs.redact(spec.path)} is (in) the label volume of an unfinished run (status "
            f"{record.get('status')!r}); expected a complete one"
        )
    if isinstance(node, zarr.Array):
        if spec.level:
            raise _no_level(spec, [" x ".join(map(str, node.shape))])
        return node
    attrs: Mapping[str, Any] = node.attrs  # JSON metadata, read as the OME-Zarr layout says
    multiscales = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    if multiscales:
        datasets = multiscales[0]["datasets"]
        if spec.level >= len(datasets):
            raise _no_level(spec, [str(d.get("path")) for d in datasets])
        dataset_path = datasets[spec.level]["path"]
        dataset = node[dataset_path]
        if not isinstance(dataset, zarr.Array):
            raise InputImageError(
                f"{spec.field}: {fs.redact(spec.path)}: the multiscale dataset {dataset_path!r} is a group; "
                f"expected an array"
            )
        return dataset
    members = dict(node.arrays())
    arrays = sorted(members)
    if len(arrays) == 1:
        if spec.level:
            raise _no_level(spec, arrays)
        return members[arrays[0]]
    raise InputImageError(
        f"{spec.field}: {fs.redact(spec.path)} is a zarr group with arrays {arrays}; expected one array, "
        f"an OME-Zarr multiscale group, or the path of the array itself (e.g. {fs.redact(spec.path)}/{arrays[0] if arrays else '0'})"
    )


def _no_level(spec: ImageSpec, levels: list[str]) -> InputImageError:
    return InputImageError(
        f"input.level: {spec.level}, but {fs.redact(spec.path)} holds {len(levels)} pyramid "
        f"level{'s' * (len(levels) > 1)} ({'; '.join(f'{i}: {text}' for i, text in enumerate(levels[:8]))}); "
        f"expected 0 to {len(levels) - 1}"
    )


def as_dask_array(spec: ImageSpec, chunks: tuple[int, ...] | None = None) -> da.Array:
    """The image as a Dask array ``(C, *spatial)``, chunked like its storage by default.

    Tasks carry only the spec; each worker process opens the file itself on first read.
    """
    spec = pinned_version(spec)
    source = _LazyImage(spec)
    spatial = chunks or source.chunks
    return da.from_array(
        source,
        chunks=(source.shape[0],) + tuple(spatial),
        name="image-" + tokenize(spec),
        asarray=False,
    )


class _LazyImage:
    """Array-like ``(C, *spatial)`` view of an image for ``dask.array.from_array``."""

    def __init__(self, spec: ImageSpec) -> None:
        reader = open_image(spec)
        self.spec = spec
        self.shape = (reader.channels,) + reader.shape
        self.dtype = reader.dtype
        self.ndim = len(self.shape)
        self.chunks = reader.chunks

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        channels, *spatial = index
        return open_image(self.spec).read(tuple(spatial))[channels]
