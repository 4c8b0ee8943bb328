import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import NormalizeConfig
from pipeline.errors import InputImageError
from pipeline.io.images import ImageSpec
from pipeline.normalization import (
    image_percentiles,
    percentile_from_histogram,
    resolve_normalization,
)


@settings(max_examples=80, deadline=None)
@given(
    data=st.lists(st.integers(0, 20), min_size=1, max_size=60),
    q=st.floats(0, 100),
)
def test_histogram_percentile_equals_numpy(data, q) -> None:
    values = np.arange(21)
    counts = np.bincount(data, minlength=21)
    assert percentile_from_histogram(counts, values, q) == pytest.approx(np.percentile(data, q), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_whole_image_percentiles_are_exact_for_integer_images(tmp_path, rng, dtype) -> None:
    info = np.iinfo(dtype)
    data = rng.integers(info.min, info.max, (2, 150, 130), endpoint=True).astype(dtype)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.moveaxis(data, 0, -1), tile=(64, 64), planarconfig="contig")
    got = image_percentiles(ImageSpec(str(path), channel_axis=2), (1.0, 99.8))
    expected = np.percentile(data.reshape(2, -1), [1.0, 99.8], axis=1).T
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_float_percentiles_are_within_a_bin(tmp_path, rng) -> None:
    data = rng.normal(100, 20, (300, 200)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", data, tile=(64, 64))
    got = image_percentiles(ImageSpec(str(tmp_path / "f.tif")), (2.0, 98.0))[0]
    bin_width = (data.max() - data.min()) / 65536
    np.testing.assert_allclose(got, np.percentile(data, [2.0, 98.0]), atol=bin_width)


def test_resolved_percentile_normalisation_is_fixed_per_channel(tmp_path, rng) -> None:
    data = rng.integers(0, 4000, (100, 90, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb")
    spec = ImageSpec(str(tmp_path / "rgb.tif"), channel_axis=2, channels=(2, 0))
    fixed = resolve_normalization(NormalizeConfig(percentiles=(1, 99)), spec)
    low = np.percentile(data[..., [2, 0]].reshape(-1, 2), 1, axis=0)
    high = np.percentile(data[..., [2, 0]].reshape(-1, 2), 99, axis=0)
    np.testing.assert_allclose(fixed.mean, low)
    np.testing.assert_allclose(fixed.std, high - low)


def test_constant_channel_is_an_error(tmp_path) -> None:
    tifffile.imwrite(tmp_path / "flat.tif", np.full((20, 20), 7, np.uint8))
    with pytest.raises(InputImageError, match="constant"):
        resolve_normalization(NormalizeConfig(percentiles=(1, 99)), ImageSpec(str(tmp_path / "flat.tif")))


def test_zscore_uses_whole_image_statistics(tmp_path, rng) -> None:
    data = rng.normal(50, 9, (2, 120, 100)).astype(np.float32)
    tifffile.imwrite(tmp_path / "z.tif", np.moveaxis(data, 0, -1), tile=(32, 32), planarconfig="contig")
    fixed = resolve_normalization(NormalizeConfig(zscore=True), ImageSpec(str(tmp_path / "z.tif"), channel_axis=2))
    np.testing.assert_allclose(fixed.mean, data.reshape(2, -1).mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(fixed.std, data.reshape(2, -1).std(axis=1), rtol=1e-6)
