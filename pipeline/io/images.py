"""Open images lazily: TIFF/BigTIFF through tifffile's zarr interface, zarr arrays directly.

An :class:`ImageSpec` is a small picklable description (path, channel axis) that crosses
to Dask workers; each worker process opens the file once (:func:`open_image` caches) and
reads only the regions its tasks ask for. Pixel data is never loaded whole.

Internally images are channel-first: ``(C, *spatial)``; a single-channel image has C = 1.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile
import zarr

from ..errors import InputImageError
from ..geometry import Box
from ..mirror import MirrorMode, read_mirrored

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".gtif")


@dataclass(frozen=True)
class ImageSpec:
    """Where an image is and how to read its axes; ``field`` names it in error messages."""

    path: str
    channel_axis: int | None = None
    field: str = "input.path"


class ImageReader:
    """A lazily read image: ``shape`` is spatial, ``channels`` the channel count."""

    def __init__(self, spec: ImageSpec, array: zarr.Array | _MemmapArray, keepalive: object = None) -> None:
        self.spec = spec
        self._array = array
        self._keepalive = keepalive  # the open TIFF file behind the store
        self._lock = threading.Lock() if keepalive is not None else None
        ndim = array.ndim
        axis = spec.channel_axis
        if axis is not None:
            if not -ndim <= axis < ndim:
                raise InputImageError(
                    f"{spec.path}: input.channel_axis: expected an axis index in "
                    f"[{-ndim}, {ndim - 1}] for an image of shape {array.shape}, got {axis}"
                )
            axis %= ndim
            if ndim != 3:
                raise InputImageError(
                    f"{spec.path}: expected a 2D image with one channel axis (3 axes), got shape "
                    f"{array.shape}; 3D volumes are not supported yet"
                )
        elif ndim != 2:
            hint = (
                f"; if the last axis holds channels (e.g. RGB), set input.channel_axis: {ndim - 1}"
                if ndim == 3
                else ""
            )
            raise InputImageError(
                f"{spec.path}: expected a 2D image (or input.channel_axis for a multi-channel "
                f"one), got {ndim} axes with shape {array.shape}{hint}"
            )
        self._channel_axis = axis
        spatial = [s for i, s in enumerate(array.shape) if i != axis]
        self.shape: tuple[int, ...] = tuple(int(s) for s in spatial)
        self.channels: int = 1 if axis is None else int(array.shape[axis])
        self.dtype = np.dtype(array.dtype)
        if any(s == 0 for s in self.shape) or self.channels == 0:
            raise InputImageError(f"{spec.path}: image is empty (shape {array.shape})")
        chunks = tuple(int(c) for i, c in enumerate(array.chunks) if i != axis)
        self.chunks: tuple[int, ...] = chunks

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
        if self._channel_axis is None:
            return data[np.newaxis]
        return np.moveaxis(data, self._channel_axis, 0)

    def read_box(self, box: Box, mirror: MirrorMode) -> np.ndarray:
        """``box`` (which may reach past the image) with mirrored context, ``(C, *box.shape)``."""
        return read_mirrored(self.read, box, self.shape, mirror)


def open_image(spec: ImageSpec) -> ImageReader:
    """Open (once per process) the image at ``spec.path``; InputImageError if impossible."""
    return _open_cached(spec, _mtime(spec))


@lru_cache(maxsize=16)
def _open_cached(spec: ImageSpec, mtime: float) -> ImageReader:
    array, keepalive = _open_array(spec)
    return ImageReader(spec, array, keepalive)


def _mtime(spec: ImageSpec) -> float:
    try:
        return Path(spec.path).stat().st_mtime
    except OSError:
        raise InputImageError(f"{spec.field}: file not found: {spec.path}") from None


def _open_array(spec: ImageSpec) -> tuple[zarr.Array | _MemmapArray, object]:
    path = Path(spec.path)
    if path.is_dir():
        return _open_zarr(spec), None
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _open_tiff(spec)
    raise InputImageError(
        f"{spec.field}: {spec.path}: unsupported image format {path.suffix or '(no suffix)'!r}; "
        f"expected a TIFF file ({', '.join(TIFF_SUFFIXES)}) or a zarr array folder"
    )


def _open_tiff(spec: ImageSpec) -> tuple[zarr.Array | _MemmapArray, object]:
    try:
        tif = tifffile.TiffFile(spec.path)
    except Exception as exc:
        raise InputImageError(f"{spec.field}: {spec.path} is not a readable TIFF: {exc}") from None
    try:
        if not tif.series:
            raise InputImageError(f"{spec.field}: {spec.path}: TIFF holds no image series")
        series = tif.series[0]
        if series.dataoffset is not None and not series.is_multifile:
            # Uncompressed and contiguous: a memory map reads only the pages a region needs,
            # where the zarr view would decode whole strips (often one strip = the image).
            array = _MemmapArray(tifffile.memmap(spec.path, series=0, mode="r"))
        else:
            array = zarr.open_array(series.aszarr(level=0), mode="r")
    except InputImageError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise InputImageError(f"{spec.field}: {spec.path}: cannot read TIFF image: {exc}") from None
    return array, tif


class _MemmapArray:
    """A read-only memory map with the array interface the reader uses (and nominal chunks)."""

    CHUNK = 1024

    def __init__(self, mm: np.memmap) -> None:
        self._mm = mm
        self.shape, self.dtype, self.ndim = mm.shape, mm.dtype, mm.ndim
        self.chunks = tuple(min(n, self.CHUNK) for n in mm.shape)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.array(self._mm[index])


def _open_zarr(spec: ImageSpec) -> zarr.Array:
    try:
        node = zarr.open(spec.path, mode="r")
    except Exception as exc:
        raise InputImageError(
            f"{spec.field}: {spec.path} is neither a TIFF file nor a zarr array: {exc}"
        ) from None
    if isinstance(node, zarr.Array):
        return node
    multiscales = node.attrs.get("ome", {}).get("multiscales") or node.attrs.get("multiscales")
    if multiscales:
        return node[multiscales[0]["datasets"][0]["path"]]
    arrays = sorted(name for name, _ in node.arrays())
    if len(arrays) == 1:
        return node[arrays[0]]
    raise InputImageError(
        f"{spec.field}: {spec.path} is a zarr group with arrays {arrays}; expected one array, "
        f"an OME-Zarr multiscale group, or the path of the array itself (e.g. {spec.path}/{arrays[0] if arrays else '0'})"
    )


class LazyImageArray:
    """Array-like single-channel view of an image for ``dask.array.from_array``.

    Pickles as its spec; each worker process opens the file itself on first read.
    """

    def __init__(self, spec: ImageSpec) -> None:
        reader = open_image(spec)
        if reader.channels != 1:
            raise InputImageError(
                f"{spec.field}: {spec.path}: expected a single-channel label image, got "
                f"{reader.channels} channels"
            )
        self.spec = spec
        self.shape = reader.shape
        self.dtype = reader.dtype
        self.ndim = len(self.shape)
        self.chunks = reader.chunks

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        return open_image(self.spec).read(tuple(index))[0]
