"""output.geotiff through `pipeline run`: the labels as a tiled GeoTIFF with overviews, placed
on the map exactly as the input (read back by rasterio, i.e. GDAL)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr

from tests.helpers import shared_data

PIPELINE = str(Path(sys.executable).parent / "pipeline")
rasterio = pytest.importorskip("rasterio")


def _workflow(tmp_path: Path, image: str, **output) -> Path:
    raw = {
        "input": {"path": image},
        "model": {"arch": "unet", "depth": 2, "width": 4, "num_classes": 2, "normalize": {"mean": 300, "std": 200}},
        "tiling": {"tile": 256},
        "output": {"path": "out/labels.zarr", "geotiff": True, **output},
        "cluster": {"n_workers": 1, "threads_per_worker": 2},
    }
    workflow = tmp_path / "w.yaml"
    workflow.write_text(yaml.safe_dump(raw))
    return workflow


def _run(workflow: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PIPELINE, "run", str(workflow)], cwd=workflow.parent, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["sample_geotiff.tif", "road_mask_input.tif"])  # projected (UTM), geographic (lon/lat)
def test_the_export_sits_on_the_map_as_the_input_and_holds_every_level(tmp_path, name) -> None:
    source = shared_data("aerial", "spacenet_geotiff_samples", name)
    done = _run(_workflow(tmp_path, str(source)))
    assert done.returncode == 0, done.stderr + done.stdout
    exported = tmp_path / "out" / "labels.tif"
    assert f"geotiff    {exported}" in done.stdout
    volume = zarr.open_group(tmp_path / "out" / "labels.zarr", mode="r")
    levels = len(volume.attrs["ome"]["multiscales"][0]["datasets"])
    with rasterio.open(source) as src, rasterio.open(exported) as out:
        assert out.crs == src.crs
        assert out.transform.almost_equals(src.transform, precision=1e-12)
        assert out.shape == src.shape
        assert out.overviews(1) == [2**k for k in range(1, levels)]
        assert out.block_shapes == [(512, 512)] and out.compression.name == "deflate"
        np.testing.assert_array_equal(out.read(1), volume["0"][...])
    with tifffile.TiffFile(exported) as tif:
        assert len(tif.pages) == levels
        for level, page in enumerate(tif.pages):
            np.testing.assert_array_equal(page.asarray(), volume[str(level)][...], err_msg=f"level {level}")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # what is tested
def test_an_input_without_georeference_gives_a_plain_tiled_tiff_and_the_plan_says_so(tmp_path) -> None:
    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(0).integers(0, 600, (300, 260), dtype=np.uint16))
    workflow = _workflow(tmp_path, "img.tif", pyramid=False)
    plan = subprocess.run([PIPELINE, "plan", str(workflow)], capture_output=True, text=True, timeout=120)
    assert "no overviews (output.pyramid: false); not georeferenced: the input has no GeoTIFF tags" in plan.stdout
    assert _run(workflow).returncode == 0
    with rasterio.open(tmp_path / "out" / "labels.tif") as out:
        assert out.crs is None and out.overviews(1) == [] and out.shape == (300, 260)


def test_a_file_already_at_the_export_path_is_refused_and_kept(tmp_path) -> None:
    source = shared_data("aerial", "spacenet_geotiff_samples", "sample_geotiff.tif")
    (tmp_path / "out").mkdir()
    foreign = tmp_path / "out" / "labels.tif"
    foreign.write_bytes(b"someone else's map")
    done = _run(_workflow(tmp_path, str(source), overwrite=True))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'w.yaml'}: output.path: report file {foreign} already exists and no label volume "
        f"at {tmp_path / 'out' / 'labels.zarr'} records it as written by this pipeline; move it away or choose another output path"
    ]
    assert foreign.read_bytes() == b"someone else's map"
    assert not (tmp_path / "out" / "labels.zarr").exists()


def test_a_rerun_with_overwrite_replaces_the_export_it_wrote(tmp_path) -> None:
    source = shared_data("aerial", "spacenet_geotiff_samples", "sample_geotiff.tif")
    workflow = _workflow(tmp_path, str(source), overwrite=True)
    assert _run(workflow).returncode == 0
    assert _run(workflow).returncode == 0  # listed with its hash in the first run's record
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_an_overview_of_a_geotiff_as_input_keeps_its_place_on_the_map(tmp_path) -> None:
    source = shared_data("aerial", "spacenet_geotiff_samples", "sample_geotiff.tif")
    first = tmp_path / "first"
    first.mkdir()
    assert _run(_workflow(first, str(source))).returncode == 0
    pyramidal = first / "out" / "labels.tif"  # a GeoTIFF with overviews, as GDAL or this pipeline writes one
    raw = yaml.safe_load(_workflow(tmp_path, str(pyramidal)).read_text())
    raw["input"]["level"] = 1
    raw["model"]["normalize"] = {"mean": 0, "std": 1}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(raw))
    done = _run(tmp_path / "w.yaml")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "(pyramid level 1)" in done.stdout and "GeoTIFF, level 1" in done.stdout
    with rasterio.open(pyramidal) as src, rasterio.open(tmp_path / "out" / "labels.tif") as out:
        assert out.crs == src.crs
        assert out.shape == tuple(-(-n // 2) for n in src.shape)
        fy, fx = src.height / out.height, src.width / out.width
        expected = src.transform @ rasterio.Affine.scale(fx, fy)  # the same extent in coarser pixels
        assert out.transform.almost_equals(expected, precision=1e-9)
        assert out.bounds == pytest.approx(src.bounds)
