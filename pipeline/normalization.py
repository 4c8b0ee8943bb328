"""Image-wide normalisation statistics, computed once before any tile is predicted.

Per-tile statistics make seams (each tile would be scaled differently), so percentile
normalisation is resolved against the whole image first and every task then applies the
same fixed ``(x - low) / (high - low)`` per channel.

Exactness: for 8- and 16-bit integer images the percentiles come from exact per-chunk
histograms summed over the image, and equal ``numpy.percentile`` (linear interpolation)
of the whole image. Other types use a 65536-bin histogram between the image's minimum and
maximum: exact to 1/65536 of the value range.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from .config import NormalizeConfig
from .errors import InputImageError
from .io.images import ImageSpec, as_dask_array
from .nonfinite import FILL_HINT

FLOAT_BINS = 1 << 16


def percentile_from_histogram(counts: np.ndarray, values: np.ndarray, q: float) -> float:
    """``numpy.percentile(data, q)`` (linear) of data given as value counts (sorted values)."""
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no data")
    position = q / 100.0 * (total - 1)
    below, frac = int(np.floor(position)), position - np.floor(position)
    cumulative = np.cumsum(counts)
    lo = values[np.searchsorted(cumulative, below, side="right")]
    hi = values[np.searchsorted(cumulative, min(below + 1, total - 1), side="right")]
    return float(lo + (hi - lo) * frac)


def finite_image(spec: ImageSpec, fill_value: float | None) -> da.Array:
    """The image as Dask ``(C, *spatial)``, under the non-finite policy of the run.

    NaN/infinite pixels are replaced by ``fill_value``, or, when it is None, counted and
    reported as an error naming how many there are (integer images hold none).
    """
    image = as_dask_array(spec)
    if not np.issubdtype(image.dtype, np.inexact):
        return image
    if fill_value is not None:
        return da.where(da.isfinite(image), image, image.dtype.type(fill_value))
    bad = int((~da.isfinite(image).all(axis=0)).sum().compute())
    if bad:
        raise InputImageError(
            f"{spec.field}: {spec.path} holds {bad} NaN/infinite pixels, so its statistics are "
            f"undefined; {FILL_HINT}"
        )
    return image


def image_percentiles(spec: ImageSpec, q: tuple[float, ...], fill_value: float | None = None) -> np.ndarray:
    """Percentiles ``q`` of every channel over the whole image: ``(C, len(q))``."""
    image = finite_image(spec, fill_value)
    channels = image.shape[0]
    if np.issubdtype(image.dtype, np.integer) and image.dtype.itemsize <= 2:
        info = np.iinfo(image.dtype)
        values = np.arange(info.min, info.max + 1)
        counts = _histograms(image, int(info.min), values.size)
    else:
        spatial = tuple(range(1, image.ndim))
        lo, hi = da.compute(image.min(axis=spatial), image.max(axis=spatial))
        return np.stack(
            [_float_percentiles(image[c], float(lo[c]), float(hi[c]), q) for c in range(channels)]
        )
    return np.array([[percentile_from_histogram(counts[c], values, p) for p in q] for c in range(channels)])


def _histograms(image: da.Array, offset: int, bins: int) -> np.ndarray:
    def block_counts(block: np.ndarray) -> np.ndarray:
        flat = block.reshape(block.shape[0], -1).astype(np.int64) - offset
        counts = np.stack([np.bincount(row, minlength=bins) for row in flat])
        return counts.reshape((1,) * (block.ndim - 1) + counts.shape)

    # The function form: Array.map_blocks is functools.wraps-ed, which its stubs type unbound.
    per_block = da.map_blocks(
        block_counts,
        image,
        chunks=(1,) * (image.ndim - 1) + (image.shape[0], bins),
        drop_axis=0,
        new_axis=[image.ndim - 1, image.ndim],
        dtype=np.int64,
    )
    return per_block.sum(axis=tuple(range(image.ndim - 1))).compute()


def _float_percentiles(channel: da.Array, lo: float, hi: float, q: tuple[float, ...]) -> np.ndarray:
    if not np.isfinite([lo, hi]).all():
        raise InputImageError("image holds NaN or infinite values; percentiles are undefined")
    if hi == lo:
        return np.full(len(q), lo)
    counts, edges = da.histogram(channel, bins=FLOAT_BINS, range=(lo, hi))
    counts = counts.compute()
    centres = (edges[:-1] + edges[1:]) / 2
    return np.array([percentile_from_histogram(counts, centres, p) for p in q])


def image_mean_std(spec: ImageSpec, fill_value: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over the whole image (float64 sums)."""
    image = finite_image(spec, fill_value).astype(np.float64)
    spatial = tuple(range(1, image.ndim))
    mean, std = da.compute(image.mean(axis=spatial), image.std(axis=spatial))
    return np.asarray(mean), np.asarray(std)


def resolve_normalization(cfg: NormalizeConfig, spec: ImageSpec, fill_value: float | None = None) -> NormalizeConfig:
    """A fixed normalisation: unchanged if already fixed, else from whole-image statistics."""
    if cfg.fixed:
        return cfg
    if cfg.zscore:
        mean, std = image_mean_std(spec, fill_value)
        flat = [c for c in range(len(std)) if not std[c] > 0]
        if flat:
            raise InputImageError(
                f"model.normalize.zscore: channel {flat[0]} of {spec.path} is constant "
                f"(standard deviation 0); use fixed mean/std"
            )
        return NormalizeConfig(mean=tuple(map(float, mean)), std=tuple(map(float, std)))
    assert cfg.percentiles is not None
    stats = image_percentiles(spec, cfg.percentiles, fill_value)
    low, high = stats[:, 0], stats[:, 1]
    flat = [c for c in range(len(low)) if high[c] <= low[c]]
    if flat:
        raise InputImageError(
            f"model.normalize.percentiles: {list(cfg.percentiles)} of channel {flat[0]} of "
            f"{spec.path} are equal ({low[flat[0]]}): the channel is constant there; use fixed "
            f"mean/std or wider percentiles"
        )
    return NormalizeConfig(mean=tuple(float(v) for v in low), std=tuple(float(v) for v in high - low))
