"""The Python interface: pipeline.open_image, open_labels and run return dask-backed xarray
DataArrays whose coordinates agree with rasterio (GeoTIFF) and OME metadata."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pyproj
import pytest
import tifffile
import yaml
import zarr

import pipeline
from pipeline.errors import OutputIncompleteError
from pipeline.io.labels import create_label_volume
from tests.helpers import shared_data

rasterio = pytest.importorskip("rasterio")
GEOTIFF = ("aerial", "spacenet_geotiff_samples", "sample_geotiff.tif")


def _workflow(image: str, **output) -> dict:
    return {
        "input": {"path": image},
        "model": {"arch": "unet", "depth": 2, "width": 4, "num_classes": 2, "normalize": {"mean": 300, "std": 200}},
        "tiling": {"tile": 128},
        "output": {"path": "out/labels.zarr", **output},
        "cluster": {"n_workers": 1, "threads_per_worker": 2},
    }


def test_a_geotiff_opens_lazily_with_the_map_coordinates_rasterio_gives() -> None:
    path = shared_data(*GEOTIFF)
    image = pipeline.open_image(path)
    assert image.dims == ("c", "y", "x") and isinstance(image.data, da.Array)
    with rasterio.open(path) as src:
        rows, cols = np.arange(src.height), np.arange(src.width)
        xs, _ = rasterio.transform.xy(src.transform, np.zeros_like(cols), cols)  # pixel centres
        _, ys = rasterio.transform.xy(src.transform, rows, np.zeros_like(rows))
        np.testing.assert_allclose(image.x.values, xs)
        np.testing.assert_allclose(image.y.values, ys)
        assert image.spatial_ref.attrs["crs"] == f"EPSG:{src.crs.to_epsg()}"
        assert pyproj.CRS(image.spatial_ref.attrs["crs_wkt"]) == pyproj.CRS(src.crs.to_wkt())  # as rioxarray reads it
        assert image.spatial_ref.attrs["spatial_ref"] == image.spatial_ref.attrs["crs_wkt"]
        assert image.spatial_ref.attrs["GeoTransform"].split() == [repr(float(v)) for v in src.transform.to_gdal()]
        np.testing.assert_array_equal(image.isel(c=0, y=slice(100, 160), x=slice(7, 90)).values, src.read(1)[100:160, 7:90])
    assert image.x.attrs["units"] == "meter"


def test_an_ome_tiff_gives_its_physical_sizes_and_channels(tmp_path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.ome.tif", data, ome=True, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5})
    image = pipeline.open_image(tmp_path / "rgb.ome.tif", channel_axis=2)
    assert image.dims == ("c", "y", "x") and image.shape == (3, 40, 30)
    np.testing.assert_allclose(image.y.values, np.arange(40) * 0.5)
    np.testing.assert_allclose(image.x.values, np.arange(30) * 0.25)
    assert image.y.attrs["units"] == "micrometer" and image.attrs["pixel_size_source"] == "OME-TIFF"
    np.testing.assert_array_equal(image.transpose("y", "x", "c").values, data)


def test_run_from_a_dict_returns_the_labels_and_each_level_sits_where_it_summarises(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a mapping's relative paths are relative to the working directory
    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(1).integers(0, 600, (300, 260), dtype=np.uint16))
    labels = pipeline.run(_workflow("img.tif"), show_progress=False)
    assert labels.dims == ("y", "x") and isinstance(labels.data, da.Array)
    np.testing.assert_array_equal(labels.values, zarr.open_group(tmp_path / "out" / "labels.zarr", mode="r")["0"][...])
    assert labels.attrs["run_json"] == str(tmp_path / "out" / "labels.run.json") and labels.attrs["status"] == "complete"
    np.testing.assert_array_equal(labels.x.values, np.arange(260))  # no pixel size: pixel indices
    level = pipeline.open_labels(tmp_path / "out" / "labels.zarr", level=1)
    assert level.shape == (150, 130)
    np.testing.assert_allclose(level.x.values, 2 * np.arange(130) + 0.5)  # the centre of the 2 it summarises


def test_run_on_a_geotiff_gives_labels_on_the_inputs_map_at_every_level(tmp_path) -> None:
    path = shared_data(*GEOTIFF)
    workflow = tmp_path / "w.yaml"
    workflow.write_text(yaml.safe_dump(_workflow(str(path), geotiff=True)))
    labels = pipeline.run(workflow, show_progress=False)
    image = pipeline.open_image(path)
    np.testing.assert_allclose(labels.x.values, image.x.values)
    np.testing.assert_allclose(labels.y.values, image.y.values)
    coarse = pipeline.open_labels(tmp_path / "out" / "labels.zarr", level=2)
    with rasterio.open(tmp_path / "out" / "labels.tif", overview_level=1) as overview:  # the export's level 2
        assert coarse.spatial_ref.attrs["GeoTransform"].split() == [repr(float(v)) for v in overview.transform.to_gdal()]
        np.testing.assert_array_equal(coarse.values, overview.read(1))


def test_open_labels_refuses_an_unfinished_volume_and_names_the_levels_there_are(tmp_path) -> None:
    path = str(tmp_path / "v.zarr")
    create_label_volume(path, (64, 64), (32, 32), np.dtype(np.uint8), {}, False)
    with pytest.raises(OutputIncompleteError, match="incomplete"):
        pipeline.open_labels(path)
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((64, 64), np.uint16))
    workflow = tmp_path / "w.yaml"
    workflow.write_text(yaml.safe_dump(_workflow(str(tmp_path / "img.tif"), pyramid=False)))
    pipeline.run(workflow, show_progress=False)
    with pytest.raises(ValueError, match="level 1; the volume has levels 0 to 0"):
        pipeline.open_labels(tmp_path / "out" / "labels.zarr", level=1)
