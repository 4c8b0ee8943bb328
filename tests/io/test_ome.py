"""The label volume as an OME-Zarr label image: pyramid levels, metadata viewers read, and
the input's pixel size and georeference carried into it, through `pipeline run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

from pipeline.coordinates import PixelGrid
from pipeline.downsample import level_shapes
from pipeline.geometry import Box
from pipeline.io import fs
from pipeline.io.labels import (
    create_label_volume,
    delete_label_volume,
    foreign_entries,
    write_block,
)
from pipeline.io.ome import label_group_attributes, level_chunk_indices, write_level_chunk
from tests.helpers import BoxFilterNet, shared_data
from tests.test_downsample import reference_mode

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def _run(tmp_path: Path, image: str, output: dict, **sections) -> Path:
    done = _pipeline_run(tmp_path, image, output, **sections)
    assert done.returncode == 0, done.stderr + done.stdout
    return tmp_path / output.get("path", "labels.zarr")


def _pipeline_run(tmp_path: Path, image: str, output: dict, **sections) -> subprocess.CompletedProcess:
    raw = {
        "input": {"path": image},
        "model": {"arch": "unet", "depth": 2, "width": 4, "num_classes": 3, "normalize": {"mean": 100, "std": 60}},
        "tiling": {"tile": 64},
        "output": {"path": "labels.zarr", **output},
        "cluster": {"n_workers": 1, "threads_per_worker": 2},
        **sections,
    }
    workflow = tmp_path / "w.yaml"
    workflow.write_text(yaml.safe_dump(raw))
    return subprocess.run([PIPELINE, "run", str(workflow)], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _attributes(volume: Path) -> dict:
    return json.loads((volume / "zarr.json").read_text())["attributes"]


def _iterated(labels: np.ndarray, levels: int, method: str) -> list[np.ndarray]:
    found = [labels]
    for _ in range(levels - 1):
        found.append(reference_mode(found[-1]) if method == "mode" else found[-1][..., ::2, ::2])
    return found


@pytest.mark.parametrize("method", ["mode", "nearest"])
def test_each_level_written_chunk_by_chunk_equals_the_whole_array_downsampled(tmp_path, method) -> None:
    shape, chunks = (157, 203), (32, 32)  # odd sizes; chunks that cut every level
    labels = np.random.default_rng(1).integers(0, 4, shape, dtype=np.uint8)
    labels[40:90, 50:150] = 2  # regions, not only noise
    levels = level_shapes(shape, chunks)
    path = str(tmp_path / "v.zarr")
    run_id = create_label_volume(
        path, shape, (64, 64), np.dtype(np.uint8), {}, False, inner_chunks=chunks, pyramid=levels[1:],
        ome=label_group_attributes("v", len(levels), PixelGrid.unknown(2), method, 4),
    )  # fmt: skip
    for index in np.ndindex(3, 4):
        start = (index[0] * 64, index[1] * 64)
        box = Box(start, (min(64, shape[0] - start[0]), min(64, shape[1] - start[1])))
        write_block(path, run_id, box, labels[box.slices()])
    for level in range(1, len(levels)):
        for index in level_chunk_indices(path, level):
            write_level_chunk(index, path, run_id, level, method, fs.active_rules())
    group = zarr.open_group(path, mode="r")
    for level, expected in enumerate(_iterated(labels, len(levels), method)):
        np.testing.assert_array_equal(group[str(level)][...], expected, err_msg=f"level {level}")
    assert group[str(len(levels) - 1)].shape == (20, 26)  # the first level within one chunk
    assert foreign_entries(path) == []  # every level belongs to the volume's layout
    delete_label_volume(path)  # what overwrite: true does: every level goes
    assert not Path(path).exists()


def test_a_run_writes_a_label_image_that_ome_zarr_reads_and_the_ngff_models_validate(tmp_path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image_label import ImageLabel

    yy, xx = np.mgrid[:300, :230]
    image = (127 + 127 * np.sin(yy / 9.0) * np.cos(xx / 13.0)).astype(np.uint8)  # more than one class
    tifffile.imwrite(tmp_path / "img.tif", image, ome=True, metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
    classes = [{"name": "membrane", "colour": [10, 20, 30]}, {"name": "cytoplasm"}, {"name": "nucleus"}]
    torch.jit.save(torch.jit.script(BoxFilterNet(1, np.array([[1], [0], [-1]]))), tmp_path / "box.pt")
    model = {"arch": "torchscript", "path": "box.pt", "num_classes": 3, "halo": 1, "normalize": {"mean": 127, "std": 1}}
    volume = _run(tmp_path, "img.tif", {"classes": classes}, model=model)

    group = zarr.open_group(volume, mode="r")
    ImageLabel.from_zarr(group)  # raises on any deviation from the OME-NGFF 0.5 models
    node = next(iter(Reader(parse_url(str(volume)))()))
    assert [d.shape for d in node.data] == [(300, 230), (150, 115), (75, 58), (38, 29)]  # until one 64 px chunk holds it
    assert node.metadata["properties"] == {0: {"class": "membrane"}, 1: {"class": "cytoplasm"}, 2: {"class": "nucleus"}}
    assert node.metadata["color"][0] == pytest.approx([10 / 255, 20 / 255, 30 / 255, 1.0])
    assert len({tuple(c) for c in node.metadata["color"].values()}) == 3  # a default colour each

    ome = _attributes(volume)["ome"]
    axes = ome["multiscales"][0]["axes"]
    assert [(a["name"], a["unit"]) for a in axes] == [("y", "micrometer"), ("x", "micrometer")]
    transforms = [d["coordinateTransformations"] for d in ome["multiscales"][0]["datasets"]]
    assert transforms[0] == [{"type": "scale", "scale": [0.5, 0.25]}]
    # level 2: 4 x 4 input pixels each, centred on the 4 they summarise
    assert transforms[2] == [{"type": "scale", "scale": [2.0, 1.0]}, {"type": "translation", "translation": [0.75, 0.375]}]
    levels = [group[str(i)][...] for i in range(4)]
    assert len(np.unique(levels[0])) > 1
    for level, expected in enumerate(_iterated(levels[0], 4, "mode")):
        np.testing.assert_array_equal(levels[level], expected)


def test_an_ome_zarr_inputs_scale_and_units_reach_the_labels(tmp_path) -> None:
    source = zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=3)
    source.create_array("0", data=np.random.default_rng(2).integers(0, 255, (96, 80), dtype=np.uint8), chunks=(32, 32))
    source.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "axes": [{"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 3.0]}]}],
        }],
    }  # fmt: skip
    volume = _run(tmp_path, "img.zarr", {"pyramid": False})
    assert _attributes(volume)["ome"]["image-label"]["source"] == {"image": "../img.zarr"}  # from the volume
    assert (volume / "../img.zarr").resolve() == (tmp_path / "img.zarr").resolve()
    multiscale = _attributes(volume)["ome"]["multiscales"][0]
    assert multiscale["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 3.0]}]}]
    assert [a.get("unit") for a in multiscale["axes"]] == ["nanometer", "nanometer"]
    assert not (volume / "1").exists()


def test_a_geotiffs_crs_and_transform_reach_the_labels_as_rasterio_reads_them(tmp_path) -> None:
    rasterio = pytest.importorskip("rasterio")
    path = shared_data("aerial", "spacenet_geotiff_samples", "sample_geotiff.tif")
    volume = _run(tmp_path, str(path), {}, model={"arch": "unet", "depth": 2, "width": 4, "num_classes": 2, "normalize": {"mean": 300, "std": 200}})
    with rasterio.open(path) as source:
        crs, transform = source.crs, source.transform
    attributes = _attributes(volume)
    geo = attributes["georeference"]
    assert geo["crs"] == f"EPSG:{crs.to_epsg()}"
    import pyproj

    assert pyproj.CRS(geo["crs_wkt"]) == pyproj.CRS(crs.to_wkt())  # the WKT, as GDAL's CRS
    assert geo["transform"] == pytest.approx(list(transform)[:6])
    assert geo["GeoTransform"].split() == [repr(float(v)) for v in transform.to_gdal()]
    multiscale = attributes["ome"]["multiscales"][0]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [abs(transform.e), transform.a]
    assert {a["unit"] for a in multiscale["axes"]} == {"meter"}
    assert attributes["pipeline"]["pixels"]["georeference"]["crs"] == geo["crs"]  # in the signed record too


def _ome_zarr_image(path: Path, data: np.ndarray) -> None:
    """An OME-NGFF 0.5 image as other tools write it (two levels)."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    axes = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [0.5 * 2**k] * 2}]} for k in range(2)]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    group.create_array("0", data=data, chunks=(32, 32), dimension_names=["y", "x"])
    group.create_array("1", data=data[::2, ::2], chunks=(32, 32), dimension_names=["y", "x"])


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and "labels" not in p.parts}


def test_labels_written_into_an_ome_zarr_inputs_labels_group_as_the_specification_intends(tmp_path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    data = np.random.default_rng(3).integers(0, 255, (96, 80), dtype=np.uint8)
    _ome_zarr_image(tmp_path / "img.zarr", data)
    before = _tree_bytes(tmp_path / "img.zarr")
    volume = _run(tmp_path, "img.zarr", {"path": "img.zarr/labels/cells"})
    assert volume == tmp_path / "img.zarr" / "labels" / "cells"
    assert _tree_bytes(tmp_path / "img.zarr") == before  # the image itself is untouched
    labels_group = zarr.open_group(tmp_path / "img.zarr" / "labels", mode="r")
    assert labels_group.attrs["ome"]["labels"] == ["cells"]
    label = zarr.open_group(volume, mode="r")
    ImageLabel.from_zarr(label)
    assert label.attrs["ome"]["image-label"]["source"] == {"image": "../../"}
    Image.from_zarr(zarr.open_group(tmp_path / "img.zarr", mode="r"))  # still a valid image, now with labels
    nodes = list(Reader(parse_url(str(tmp_path / "img.zarr")))())
    assert any("cells" in str(node.zarr) for node in nodes[1:])  # the reader finds the label image
    # A second label image joins the list; a rerun of the first replaces it without listing it twice.
    _run(tmp_path, "img.zarr", {"path": "img.zarr/labels/other"})
    _run(tmp_path, "img.zarr", {"path": "img.zarr/labels/cells", "overwrite": True})
    assert zarr.open_group(tmp_path / "img.zarr" / "labels", mode="r").attrs["ome"]["labels"] == ["cells", "other"]


def test_labels_elsewhere_inside_an_input_or_inside_a_zarr_2_image_are_refused(tmp_path) -> None:
    data = np.random.default_rng(3).integers(0, 255, (64, 64), dtype=np.uint8)
    _ome_zarr_image(tmp_path / "img.zarr", data)
    for inside in ("img.zarr/cells", "img.zarr/labels/a/b"):
        done = _pipeline_run(tmp_path, "img.zarr", {"path": inside})
        assert done.returncode == 2 and "lies inside the input.path" in done.stderr, done.stderr
    old = zarr.open_group(tmp_path / "old.zarr", mode="w", zarr_format=2)
    old.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                                 "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}]}]  # fmt: skip
    old.create_array("0", data=data, chunks=(32, 32))
    done = _pipeline_run(tmp_path, "old.zarr", {"path": "old.zarr/labels/cells"})
    assert done.returncode == 2 and "OME-NGFF 0.4 (zarr 2) image" in done.stderr, done.stderr
    assert not (tmp_path / "old.zarr" / "labels").exists()


def test_ome_ngff_0_4_output_for_older_viewers_holds_the_same_labels(tmp_path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v04.image import Image
    from ome_zarr_models.v04.image_label import ImageLabel
    from pydantic_zarr.v2 import ArraySpec, GroupSpec

    for model in (Image, ImageLabel):  # ome-zarr-models 1.6 leaves these to be completed by the caller
        model.model_rebuild(_types_namespace={"ArraySpec": ArraySpec, "GroupSpec": GroupSpec})
    yy, xx = np.mgrid[:150, :130]
    tifffile.imwrite(tmp_path / "img.tif", (127 + 127 * np.sin(yy / 9.0) * np.cos(xx / 13.0)).astype(np.uint8))
    new = _run(tmp_path, "img.tif", {"path": "new.zarr"})
    old = _run(tmp_path, "img.tif", {"path": "old.zarr", "ngff": "0.4"})
    group = zarr.open_group(old, mode="r")
    assert group.metadata.zarr_format == 2
    ImageLabel.from_zarr(group)  # raises on any deviation from the OME-NGFF 0.4 models
    assert group.attrs["multiscales"][0]["version"] == "0.4" and group.attrs["image-label"]["version"] == "0.4"
    node = next(iter(Reader(parse_url(str(old)))()))
    levels = [zarr.open_group(new, mode="r")[str(k)][...] for k in range(len(node.data))]
    assert len(levels) > 1
    for level, data in zip(levels, node.data):
        np.testing.assert_array_equal(np.asarray(data), level)  # the same labels and pyramid in either format
    refused = _pipeline_run(tmp_path, "img.tif", {"path": "x.zarr", "ngff": "0.4", "shard": True})
    assert refused.returncode == 2 and "output: expected ngff: '0.5' with shard: true" in refused.stderr
