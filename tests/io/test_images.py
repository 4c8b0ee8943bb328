import numpy as np
import pytest
import tifffile
import zarr

from pipeline.errors import InputImageError
from pipeline.geometry import Box
from pipeline.io.images import ImageSpec, open_image
from tests.helpers import shared_data


def _write(tmp_path, name, data, **kwargs):
    path = tmp_path / name
    tifffile.imwrite(path, data, **kwargs)
    return str(path)


@pytest.mark.parametrize(
    "layout", [dict(tile=(64, 64), compression="zlib"), dict(rowsperstrip=7), dict()]
)
def test_tiff_regions_read_lazily_equal_the_file(tmp_path, rng, layout) -> None:
    data = rng.integers(0, 65535, (300, 257), dtype=np.uint16)
    reader = open_image(ImageSpec(_write(tmp_path, "a.tif", data, **layout)))
    assert reader.shape == (300, 257) and reader.channels == 1 and reader.dtype == np.uint16
    np.testing.assert_array_equal(reader.read((slice(10, 200), slice(3, 250)))[0], data[10:200, 3:250])
    padded = np.pad(data, 20, mode="symmetric")
    got = reader.read_box(Box((-20, 230), (60, 47)), "symmetric")[0]
    np.testing.assert_array_equal(got, padded[0:60, 250:297])


def test_rgb_tiff_with_channel_axis(tmp_path, rng) -> None:
    data = rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)
    path = _write(tmp_path, "rgb.tif", data, photometric="rgb", tile=(32, 32))
    reader = open_image(ImageSpec(path, channel_axis=-1))
    assert reader.shape == (100, 120) and reader.channels == 3
    np.testing.assert_array_equal(reader.read((slice(5, 9), slice(0, 120))), np.moveaxis(data[5:9], -1, 0))


def test_three_axes_without_channel_axis_suggests_one(tmp_path, rng) -> None:
    path = _write(tmp_path, "rgb.tif", rng.integers(0, 255, (10, 12, 3), dtype=np.uint8), photometric="rgb")
    with pytest.raises(InputImageError, match="set input.channel_axis: 2"):
        open_image(ImageSpec(path))


def test_zarr_array_and_ome_group(tmp_path, rng) -> None:
    data = rng.random((2, 50, 60)).astype(np.float32)
    zarr.create_array(str(tmp_path / "a.zarr"), data=data, chunks=(1, 16, 16))
    reader = open_image(ImageSpec(str(tmp_path / "a.zarr"), channel_axis=0))
    assert reader.shape == (50, 60) and reader.channels == 2 and reader.chunks == (16, 16)
    np.testing.assert_array_equal(reader.read((slice(0, 50), slice(0, 60))), data)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("s0", data=data[0], chunks=(16, 16))
    group.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "s0"}]}]}
    np.testing.assert_array_equal(open_image(ImageSpec(str(tmp_path / "g.zarr"))).read((slice(0, 5), slice(0, 5)))[0], data[0, :5, :5])


def test_errors_name_the_field_and_file(tmp_path) -> None:
    with pytest.raises(InputImageError, match=r"input.path: file not found: .*missing.tif"):
        open_image(ImageSpec(str(tmp_path / "missing.tif")))
    (tmp_path / "bad.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(InputImageError, match=r"input.path: .*bad.tif is not a readable TIFF"):
        open_image(ImageSpec(str(tmp_path / "bad.tif")))
    (tmp_path / "x.webp").write_bytes(b"webp")
    with pytest.raises(InputImageError, match="unsupported image format '.webp'"):
        open_image(ImageSpec(str(tmp_path / "x.webp")))
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(InputImageError, match=r"x.png is not a readable image"):
        open_image(ImageSpec(str(tmp_path / "x.png")))


def test_real_geotiff_reads_like_tifffile() -> None:
    path = shared_data("aerial", "spacenet_geotiff_samples", "sample_geotiff.tif")
    reader = open_image(ImageSpec(str(path)))
    whole = tifffile.imread(path)
    assert reader.shape == whole.shape == (900, 900)
    np.testing.assert_array_equal(reader.read((slice(100, 400), slice(850, 900)))[0], whole[100:400, 850:900])


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_single_strip_tiff_reads_the_same(tmp_path, rng, compression) -> None:
    """Uncompressed contiguous files are memory-mapped; compressed ones decode strips."""
    data = rng.integers(0, 255, (1100, 1030), dtype=np.uint8)
    path = _write(tmp_path, "strip.tif", data, compression=compression, rowsperstrip=1100)
    reader = open_image(ImageSpec(path))
    np.testing.assert_array_equal(reader.read((slice(1090, 1100), slice(7, 9)))[0], data[1090:, 7:9])
    # a memory map reads any region; a compressed strip is one 1100 x 1030 segment
    assert reader.chunks == ((1100, 1030) if compression else (1024, 1024))


def test_png_images_and_palette_masks(tmp_path) -> None:
    from PIL import Image

    grey = np.arange(30 * 40, dtype=np.uint8).reshape(30, 40)
    Image.fromarray(grey).save(tmp_path / "g.png")
    reader = open_image(ImageSpec(str(tmp_path / "g.png")))
    np.testing.assert_array_equal(reader.read((slice(0, 30), slice(0, 40)))[0], grey)
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[:5] = (60, 16, 152)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "p.png")
    reader = open_image(ImageSpec(str(tmp_path / "p.png"), channel_axis=2))
    assert reader.channels == 3
    np.testing.assert_array_equal(np.moveaxis(reader.read((slice(0, 10), slice(0, 12))), 0, -1), rgb)


def test_real_isbi_png_slice() -> None:
    path = shared_data("microscopy", "isbi2012_em_membranes", "images", "0.png")
    reader = open_image(ImageSpec(str(path)))
    assert reader.shape == (512, 512) and reader.dtype == np.uint8


def test_a_pyramid_level_of_an_ome_tiff_and_of_an_ome_zarr_is_read_with_its_pixel_size(tmp_path, rng) -> None:
    from pipeline.io.coordinates import read_pixel_grid

    full = rng.integers(0, 255, (256, 320), dtype=np.uint8)
    levels = [full, full[::2, ::2].copy(), full[::4, ::4].copy()]
    path = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], subifds=2, tile=(64, 64), metadata={
            "axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm",
        })  # fmt: skip
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(64, 64))
    for k, level in enumerate(levels):
        reader = open_image(ImageSpec(str(path), level=k))
        assert reader.shape == level.shape
        np.testing.assert_array_equal(reader.read((slice(10, 50), slice(3, 60)))[0], level[10:50, 3:60])
        grid = read_pixel_grid(reader)
        assert grid.scale == (0.25 * 2**k,) * 2 and grid.units == ("micrometer",) * 2
    with pytest.raises(InputImageError, match=r"input.level: 3, but .*pyr.ome.tif holds 3 pyramid levels \(0: 256 x 320; 1: 128 x 160; 2: 64 x 80\)"):
        open_image(ImageSpec(str(path), level=3))
    with pytest.raises(InputImageError, match=r"input.level: 1, but .*flat.tif holds 1 pyramid level \(0: 40 x 48\)"):
        open_image(ImageSpec(str(_write(tmp_path, "flat.tif", full[:40, :48])), level=1))
    group = zarr.open_group(str(tmp_path / "image.zarr"), mode="w")  # an OME-Zarr image as others write it
    axes = [{"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}]
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [4.0 * 2**k] * 2}]} for k in range(3)]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    for k, level in enumerate(levels):
        group.create_array(str(k), data=level, chunks=(32, 32))
    reader = open_image(ImageSpec(str(tmp_path / "image.zarr"), level=2))
    np.testing.assert_array_equal(reader.read((slice(None), slice(None)))[0], levels[2])
    grid = read_pixel_grid(reader)
    assert grid.scale == (16.0, 16.0) and grid.units == ("nanometer",) * 2 and grid.source == "OME-Zarr, level 2"
