"""Instance labels end to end, as users run them: a workflow's ``instances:`` section through
`pipeline run` (2D, into an OME-Zarr image's labels group, a 3D stack) and `pipeline
instances` on a label TIFF and on a run's label volume. Each result is checked against
independent references: ``scipy.ndimage.label`` of the class mask (equal up to relabelling),
a growth written with ``scipy.ndimage.grey_erosion``, and ``skimage.measure.regionprops_table``
of the written instance volume for the object tables (Parquet and CSV)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage
from skimage.measure import regionprops_table

from tests.helpers import (
    BoxFilterNet,
    reference_instances,
    run_pipeline,
    same_up_to_relabelling,
    write_workflow,
)

RANK = {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}
# normalised (x - 127): class 0 where the 3 x 3 box sum is bright, class 2 where it is dark
MODEL = {
    "arch": "torchscript",
    "path": "box.pt",
    "num_classes": 3,
    "halo": 1,
    "normalize": {"mean": 127, "std": 1},
}
CLUSTER = {"n_workers": 1, "threads_per_worker": 2}


# ----------------------------------------------------------------------------- references


def blob_image(
    shape: tuple[int, ...], seed: int, sigma: float | tuple[float, ...] = 5.0
) -> np.ndarray:
    """Dark blobs (about 60) on a bright background (about 190), with noise: uint8."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    dark = field < np.quantile(field, 0.3)
    return (np.where(dark, 60, 190) + rng.integers(-25, 26, shape)).clip(0, 255).astype(np.uint8)


reference_labels = reference_instances


def reference_growth(
    seeds: np.ndarray, class_ids: np.ndarray, into, steps: int, neighbours: int
) -> np.ndarray:
    """Objects take over free pixels of ``into``, one ring per step, the smallest
    neighbouring id winning: a min filter (grey erosion) over the ids, 0 counted as none."""
    footprint = ndimage.generate_binary_structure(seeds.ndim, RANK[neighbours])
    none = 2**40  # exact as a double (scipy filters pass cval as one); far above any id
    ids = seeds.astype(np.int64)
    for _ in range(steps):
        free = np.isin(class_ids, into) & (ids == 0)
        nearest = ndimage.grey_erosion(
            np.where(ids == 0, none, ids), footprint=footprint, mode="constant", cval=none
        )
        take = free & (nearest != none)
        ids[take] = nearest[take]
    return ids


def read_volume(path: Path) -> tuple[zarr.Group, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return group, group["0"][:]


def read_tables(volume: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The object table beside ``volume``: its Parquet and its CSV file, as float columns."""
    stem = volume.name.removesuffix(".zarr")
    parquet = pq.read_table(volume.parent / f"{stem}.objects.parquet").to_pydict()
    with open(volume.parent / f"{stem}.objects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    from_csv = {
        name: np.array([float(r[name]) for r in rows]) for name in (rows[0] if rows else [])
    }
    return {k: np.asarray(v, dtype=np.float64) for k, v in parquet.items()}, from_csv


def check_table(
    volume: Path,
    ids: np.ndarray,
    class_ids: np.ndarray,
    classes,
    image: np.ndarray | None = None,
    area_column: tuple[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Both tables equal ``regionprops_table`` of the written ids (label, area, bbox,
    centroid, mean intensity of ``image``), with the class of each object's own pixels."""
    parquet, from_csv = read_tables(volume)
    labels = ids.astype(np.int64)
    properties = ["label", "area", "bbox", "centroid"] + (
        ["intensity_mean"] if image is not None else []
    )
    expected = regionprops_table(labels, intensity_image=image, properties=properties)
    if image is not None:
        expected["mean_intensity-0"] = expected.pop("intensity_mean")
    seed = np.isin(class_ids, classes) & (labels > 0)  # growth keeps each object's class
    pairs = np.unique(np.stack([labels[seed], class_ids[seed].astype(np.int64)]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]  # one class per object
    expected["class"] = pairs[1][np.searchsorted(pairs[0], expected["label"])]
    if area_column is not None:
        name, pixel_area = area_column
        expected[name] = expected["area"] * pixel_area
    assert set(parquet) == set(expected), (sorted(parquet), sorted(expected))
    assert list(from_csv) == list(parquet)  # the same columns, in the same order
    for table in (parquet, from_csv):
        assert len(table["label"]) == len(expected["label"])
        for name, values in expected.items():
            np.testing.assert_allclose(table[name], values, rtol=1e-9, atol=1e-9, err_msg=name)
    return parquet


def check_pyramid(group: zarr.Group, ids: np.ndarray, levels: int) -> None:
    """``levels`` levels in the metadata and on disk, each nearest (every 2nd pixel in y
    and x) of the one before; ids are never mixed."""
    ome = group.attrs["ome"]
    assert "image-label" in ome
    datasets = ome["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == [str(k) for k in range(levels)]
    level = ids
    for k in range(1, levels):
        level = level[..., ::2, ::2]
        np.testing.assert_array_equal(group[str(k)][:], level)
    assert str(levels) not in group


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def refused(done, *needles: str) -> str:
    """Exit code 2, one stderr line ``error: ...`` holding ``needles``, no traceback."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def crosses(table: dict[str, np.ndarray], axis: int, ndim: int, edge: int) -> bool:
    """Whether some object spans the block seam at ``edge`` along ``axis``."""
    lower, upper = table[f"bbox-{axis}"], table[f"bbox-{axis + ndim}"]
    return bool(np.any((lower < edge) & (upper > edge)))


def save_box_model(folder: Path) -> None:
    torch.jit.save(torch.jit.script(BoxFilterNet(1, np.array([[1], [0], [-1]]))), folder / "box.pt")


# ----------------------------------------------------------------------------- pipeline run


def test_a_run_writes_instances_and_tables_and_pipeline_instances_on_its_labels_agrees(
    tmp_path,
) -> None:
    image = blob_image((300, 230), seed=1)
    tifffile.imwrite(tmp_path / "img.tif", image)
    save_box_model(tmp_path)
    wf = write_workflow(
        tmp_path / "wf.yaml", input={"path": "img.tif"}, model=MODEL, tiling={"tile": 64}, inference={"batch_size": 1},
        output={"path": "out/labels.zarr"}, cluster=CLUSTER,
        instances={"classes": [2], "connectivity": 8, "min_size": 5},
    )  # fmt: skip
    done = run_pipeline("run", str(wf), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    labels_group, class_ids = read_volume(out / "labels.zarr")
    assert labels_group["0"].chunks == (64, 64)  # blocks of 64 px: many seams
    assert len(np.unique(class_ids)) == 2

    volume = out / "labels_instances.zarr"
    group, ids = read_volume(volume)
    assert ids.dtype == np.uint64 and ids.shape == class_ids.shape
    reference = reference_labels(class_ids, [2], 8, min_size=5)
    assert same_up_to_relabelling(ids, reference)
    count = len(np.unique(reference)) - 1
    assert count > 10
    assert f"instances  {count} objects -> " in done.stdout

    table = check_table(volume, ids, class_ids, [2], image=image)
    assert crosses(table, 0, 2, 128) and crosses(table, 1, 2, 64)  # objects joined across seams
    assert set(table["class"]) == {2}

    # OME-Zarr label image with the labels' pyramid (output.pyramid is on by default)
    levels = len(labels_group.attrs["ome"]["multiscales"][0]["datasets"])
    assert levels == 4
    check_pyramid(group, ids, levels)
    document = json.loads((volume / "zarr.json").read_text())["attributes"]
    assert document["ome"]["multiscales"][0]["axes"][0]["name"] == "y"
    assert document["pipeline"]["status"] == "complete"

    record = json.loads((out / "labels.run.json").read_text())
    assert record["status"] == "complete"
    assert record["instances"]["objects"] == count
    assert Path(record["instances"]["path"]) == volume
    assert Path(record["instances"]["parquet"]) == out / "labels_instances.objects.parquet"
    assert Path(record["instances"]["csv"]) == out / "labels_instances.objects.csv"

    # The same objects from the finished labels by `pipeline instances` (same blocks: same ids).
    again = run_pipeline(
        "instances", str(out / "labels.zarr"), "--classes", "2", "--connectivity", "8", "--min-size", "5",
        "--out", str(out / "again.zarr"), cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"instances  {count} objects -> " in again.stdout
    again_group, again_ids = read_volume(out / "again.zarr")
    np.testing.assert_array_equal(again_ids, ids)
    check_pyramid(again_group, again_ids, levels)
    again_table = check_table(
        out / "again.zarr", again_ids, class_ids, [2]
    )  # no --image: no intensities
    for name, values in again_table.items():
        np.testing.assert_array_equal(values, table[name])

    # A 2D volume has no 6-neighbourhood; nothing is written.
    before = tree(tmp_path)
    refused(
        run_pipeline(
            "instances",
            str(out / "labels.zarr"),
            "--classes",
            "2",
            "--connectivity",
            "6",
            "--out",
            str(out / "six.zarr"),
            cwd=tmp_path,
        ),  # fmt: skip
        "error: --connectivity: 6 ",
    )
    assert tree(tmp_path) == before


def _ome_zarr_image(path: Path, data: np.ndarray) -> None:
    """An OME-NGFF 0.5 image as other tools write it (two levels), 0.5 um pixels."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    axes = [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": [{"type": "scale", "scale": [0.5 * 2**k] * 2}],
        }
        for k in range(2)
    ]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    group.create_array("0", data=data, chunks=(32, 32), dimension_names=["y", "x"])
    group.create_array("1", data=data[::2, ::2], chunks=(32, 32), dimension_names=["y", "x"])


def test_instances_of_labels_in_an_ome_zarr_images_labels_group_join_it(tmp_path) -> None:
    from ome_zarr_models.v05.image_label import ImageLabel

    image = blob_image((128, 112), seed=2, sigma=3.0)
    _ome_zarr_image(tmp_path / "img.zarr", image)
    save_box_model(tmp_path)
    wf = write_workflow(
        tmp_path / "wf.yaml", input={"path": "img.zarr"}, model=MODEL, tiling={"tile": 32}, inference={"batch_size": 1},
        output={"path": "img.zarr/labels/cells"}, cluster=CLUSTER, instances={"classes": [0, 2]},
    )  # fmt: skip
    done = run_pipeline("run", str(wf), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    labels = tmp_path / "img.zarr" / "labels"
    assert zarr.open_group(str(labels), mode="r").attrs["ome"]["labels"] == [
        "cells",
        "cells_instances",
    ]
    _, class_ids = read_volume(labels / "cells")
    volume = labels / "cells_instances"
    group, ids = read_volume(volume)
    ImageLabel.from_zarr(group)  # a valid OME-NGFF 0.5 label image
    assert group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [0.5, 0.5]}
    ]
    assert same_up_to_relabelling(ids, reference_labels(class_ids, [0, 2], 4))
    table = check_table(
        volume, ids, class_ids, [0, 2], image=image, area_column=("area_micrometer2", 0.25)
    )
    assert set(table["class"]) == {0, 2}
    record = json.loads((labels / "cells.run.json").read_text())
    assert record["instances"]["objects"] == len(table["label"])


def test_a_3d_stack_with_26_neighbours(tmp_path) -> None:
    stack = blob_image((10, 48, 56), seed=3, sigma=(0.5, 1.2, 1.2))
    tifffile.imwrite(tmp_path / "stack.tif", stack, metadata={"axes": "ZYX"})
    save_box_model(tmp_path)
    wf = write_workflow(
        tmp_path / "wf.yaml", input={"path": "stack.tif"}, model=MODEL, tiling={"tile": 24}, inference={"batch_size": 2},
        output={"path": "stack.zarr"}, cluster=CLUSTER, instances={"classes": [2], "connectivity": 26, "min_size": 2},
    )  # fmt: skip
    done = run_pipeline("run", str(wf), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    labels_group, class_ids = read_volume(tmp_path / "stack.zarr")
    chunks = labels_group["0"].chunks
    assert chunks[0] < 10 and chunks[1] < 48  # seams in z and y
    volume = tmp_path / "stack_instances.zarr"
    group, ids = read_volume(volume)
    reference = reference_labels(class_ids, [2], 26, min_size=2)
    assert same_up_to_relabelling(ids, reference)
    assert not same_up_to_relabelling(
        ids, reference_labels(class_ids, [2], 6, min_size=2)
    )  # 26 matters here
    table = check_table(volume, ids, class_ids, [2], image=stack)
    assert {f"bbox-{k}" for k in range(6)} <= set(table) and "centroid-2" in table
    assert crosses(table, 0, 3, chunks[0])
    assert [a["name"] for a in group.attrs["ome"]["multiscales"][0]["axes"]] == ["z", "y", "x"]
    levels = len(labels_group.attrs["ome"]["multiscales"][0]["datasets"])
    assert len(group.attrs["ome"]["multiscales"][0]["datasets"]) == levels
    for k in range(1, levels):
        assert group[str(k)].shape[0] == 10  # the pyramid keeps every plane
    record = json.loads((tmp_path / "stack.run.json").read_text())
    assert record["instances"]["objects"] == len(table["label"]) == len(np.unique(reference)) - 1


# ----------------------------------------------------------------------------- pipeline instances


def _cells_and_borders(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Class 1: blobs (cells), class 2: a 3-pixel ring around them (contested where cells
    lie close), class 0: background."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 4)
    cells = field > np.quantile(field, 0.8)
    border = ndimage.binary_dilation(cells, iterations=3) & ~cells
    return np.where(cells, 1, np.where(border, 2, 0)).astype(np.uint8)


def test_pipeline_instances_on_a_label_tiff_with_growth_intensities_and_overwrite(tmp_path) -> None:
    class_ids = _cells_and_borders(
        (1100, 240), seed=4
    )  # LABELS are read in blocks of 1024 rows: one seam
    intensity = np.random.default_rng(5).integers(0, 4000, class_ids.shape).astype(np.uint16)
    tifffile.imwrite(tmp_path / "labels.tif", class_ids)
    tifffile.imwrite(tmp_path / "img.tif", intensity)
    args = ["instances", "labels.tif", "--classes", "1", "--connectivity", "8", "--min-size", "6"]
    done = run_pipeline(
        *args, "--grow-into", "2", "--grow-by", "3", "--image", "img.tif", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    volume = tmp_path / "labels_instances.zarr"  # beside LABELS by default
    group, ids = read_volume(volume)
    seeds = np.where(class_ids == 1, ids, 0)
    assert same_up_to_relabelling(seeds, reference_labels(class_ids, [1], 8, min_size=6))
    grown = reference_growth(seeds, class_ids, [2], 3, 8)
    np.testing.assert_array_equal(ids, grown)
    assert np.count_nonzero(ids) > np.count_nonzero(seeds)
    table = check_table(volume, ids, class_ids, [1], image=intensity)
    assert crosses(table, 0, 2, 1024)
    assert "image-label" in group.attrs["ome"]
    first_tables = tree(tmp_path)

    # Again without --overwrite: refused, nothing touched.
    refused(
        run_pipeline(*args, cwd=tmp_path), "labels_instances.zarr already exists", "set --overwrite"
    )
    assert tree(tmp_path) == first_tables
    # --grow-by without --grow-into: refused, nothing written.
    refused(
        run_pipeline(*args, "--grow-by", "2", "--out", "other.zarr", cwd=tmp_path),
        "--grow-by",
        "--grow-into",
    )
    assert tree(tmp_path) == first_tables

    # --overwrite replaces the volume and both tables (no growth, a larger minimum, level 0 only).
    done = run_pipeline(*args[:-1], "40", "--no-pyramid", "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    group, ids = read_volume(volume)
    reference = reference_labels(class_ids, [1], 8, min_size=40)
    assert same_up_to_relabelling(ids, reference)
    check_pyramid(group, ids, 1)
    replaced = check_table(volume, ids, class_ids, [1])
    assert len(replaced["label"]) == len(np.unique(reference)) - 1 < len(table["label"])
    assert "mean_intensity-0" not in replaced


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--classes", "1", "--grow-into", "1", "--grow-by", "2"], "--grow-into"),
        (["--classes", "-1"], "--classes"),
    ],
)
def test_pipeline_instances_class_errors_name_its_own_flags(tmp_path, flags, flag) -> None:
    tifffile.imwrite(tmp_path / "labels.tif", _cells_and_borders((64, 64), seed=6))
    before = tree(tmp_path)
    line = refused(run_pipeline("instances", "labels.tif", *flags, cwd=tmp_path))
    assert tree(tmp_path) == before
    assert line.startswith(f"error: {flag}:"), line


# ----------------------------------------------------------------------------- workflow errors


def _error_case(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """A workflow that must be refused, and what the error line must hold."""
    tifffile.imwrite(tmp_path / "img.tif", blob_image((96, 96), seed=7))
    save_box_model(tmp_path)
    instances: dict = {"classes": [2]}
    needles = ["instances.path:"]
    if case == "class out of range":
        instances, needles = {"classes": [2, 3]}, ["instances.classes:", "class 3", "0..2"]
    elif case == "path is output.path":
        instances["path"] = "out/labels.zarr"
        needles.append("is output.path")
    elif (
        case == "volume exists"
    ):  # an instance volume there already, written by `pipeline instances`
        (tmp_path / "out").mkdir()
        tifffile.imwrite(tmp_path / "other.tif", _cells_and_borders((96, 96), seed=8))
        done = run_pipeline(
            "instances",
            "other.tif",
            "--classes",
            "1",
            "--out",
            "out/labels_instances.zarr",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        needles += ["labels_instances.zarr already exists", "output.overwrite: true"]
    wf = write_workflow(
        tmp_path / "wf.yaml", input={"path": "img.tif"}, model=MODEL, tiling={"tile": 48},
        output={"path": "out/labels.zarr"}, cluster=CLUSTER, instances=instances,
    )  # fmt: skip
    return wf, needles


@pytest.mark.parametrize(
    "case, command",
    [("class out of range", "validate"), ("path is output.path", "run"), ("volume exists", "run")],
)
def test_a_workflows_instances_section_is_refused_before_anything_is_written(
    tmp_path, case, command
) -> None:
    wf, needles = _error_case(tmp_path, case)
    before = tree(tmp_path)
    refused(run_pipeline(command, str(wf), cwd=tmp_path), *needles)
    assert tree(tmp_path) == before  # no labels, no run.json, the existing volume untouched
