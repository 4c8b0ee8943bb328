"""Many images per run: a list, glob or folder of images -> one label volume each, one cluster,
statistics per image and pooled, a set that resumes image by image.

Runs go through the ``pipeline`` command as users run it. References are independent: the
NumPy box filter on each whole mirrored image, and confusion matrices counted by NumPy on
the volumes read back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from PIL import Image

from pipeline.config import parse_workflow
from pipeline.errors import EvaluationError, OutputExistsError, WorkflowError
from pipeline.image_set import expand_images
from tests.helpers import (
    PIPELINE,
    REPO,
    box_filter_reference,
    pipeline_env,
    run_pipeline,
    shared_data,
    write_workflow,
)

WEIGHT = [[1], [-1]]
MEAN = 100
TILE = 32
SHAPES = {"a": (96, 160), "b": (128, 64), "deep/c": (64, 96)}  # names: the path below the folder


def _write_images(root: Path) -> None:
    rng = np.random.default_rng(5)
    for name, shape in SHAPES.items():
        image = rng.integers(0, 200, shape, dtype=np.uint8)
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "truth" / name).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / "images" / f"{name}.tif", image, tile=(32, 32))
        truth = (rng.random(shape) < 0.5).astype(np.uint8)
        Image.fromarray(truth).save(root / "truth" / f"{name}.png")


def _reference(root: Path, name: str) -> np.ndarray:
    image = tifffile.imread(root / "images" / f"{name}.tif")
    centred = image[None].astype(np.int64) - MEAN
    return box_filter_reference(centred, 2, np.array(WEIGHT), "reflect").argmax(0)


def _workflow(root: Path, seconds: float = 0.0, **changes: object) -> str:
    if not (root / "images").exists():
        _write_images(root)
    doc = {
        "input": {"path": "images"},
        "model": {
            "arch": "custom", "factory": "tests.helpers:SlowBoxFilter", "num_classes": 2, "halo": 2,
            "normalize": {"mean": MEAN, "std": 1},
            "kwargs": {"radius": 2, "weight": WEIGHT, "seconds": seconds, "log": str(root / "forward.log")},
        },
        "tiling": {"tile": TILE},
        "output": {"path": "out"},
        "evaluation": {"ground_truth": "truth/**/*.png"},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
    }  # fmt: skip
    for dotted, value in changes.items():
        if "__" not in dotted:  # a whole section: None drops it
            doc.pop(dotted) if value is None else doc.update({dotted: value})
            continue
        section, key = dotted.split("__")
        if value is None:
            doc[section].pop(key, None)
        else:
            doc.setdefault(section, {})[key] = value
    (root / "wf.yaml").write_text(yaml.safe_dump(doc))
    return str(root / "wf.yaml")


def _labels(root: Path, name: str) -> np.ndarray:
    return zarr.open_group(str(root / "out" / f"{name}.zarr"), mode="r")["0"][:]


def _confusion(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    return np.bincount(truth.ravel().astype(np.int64) * 2 + prediction.ravel(), minlength=4).reshape(2, 2)


def _iou(cm: np.ndarray) -> list[float]:
    return [cm[k, k] / (cm[k].sum() + cm[:, k].sum() - cm[k, k]) for k in range(2)]


def test_a_folder_of_images_gives_one_volume_each_equal_to_the_whole_image_reference_and_exact_statistics(
    tmp_path,
) -> None:
    wf = _workflow(tmp_path)
    proc = run_pipeline("run", wf)
    assert proc.returncode == 0, proc.stderr
    assert "images     3 images: a, b, deep/c" in proc.stdout
    assert "image      3 of 3: deep/c (64 x 96 px)" in proc.stdout
    pooled = np.zeros((2, 2), np.int64)
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    per_image = {entry["name"]: entry for entry in report["per_image"]}
    for name in SHAPES:
        labels = _labels(tmp_path, name)
        np.testing.assert_array_equal(labels, _reference(tmp_path, name))  # seamless, per image
        truth = np.asarray(Image.open(tmp_path / "truth" / f"{name}.png"))
        cm = _confusion(truth, labels)
        pooled += cm
        np.testing.assert_allclose(per_image[name]["iou"], _iou(cm), rtol=1e-12)
        assert per_image[name]["pixels"] == labels.size
        assert (tmp_path / "out" / f"{name}.run.json").is_file()  # each image's own record
    assert report["pooled"]["confusion_matrix"]["counts"] == pooled.tolist()  # exact: counts summed
    np.testing.assert_allclose([c["iou"] for c in report["pooled"]["per_class"]], _iou(pooled), rtol=1e-12)
    assert report["pooled"]["pixels_evaluated"] == sum(np.prod(s) for s in SHAPES.values())
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "complete" and record["kind"] == "image set"
    assert {name: entry["status"] for name, entry in record["images"].items()} == dict.fromkeys(SHAPES, "complete")
    blocks = sum(-(-h // TILE) * -(-w // TILE) for h, w in SHAPES.values())
    assert sum(e["blocks"]["computed"] for e in record["images"].values()) == blocks
    # A second run refuses to overwrite and says how to go on; nothing is touched.
    before = (tmp_path / "out" / "evaluation.json").stat().st_mtime_ns
    again = run_pipeline("run", wf)
    assert again.returncode == 2
    assert "already exists (a complete label volume)" in again.stderr and "--resume" in again.stderr
    assert (tmp_path / "out" / "evaluation.json").stat().st_mtime_ns == before


def _ledger(volume: Path) -> int:
    folder = volume / "blocks" / "c"
    return sum(1 for p in folder.rglob("*") if p.is_file() and "." not in p.name) if folder.exists() else 0


def test_an_interrupted_set_resumes_keeping_complete_volumes_and_finishing_the_interrupted_one(tmp_path) -> None:
    wf = _workflow(tmp_path, seconds=0.25)
    proc = subprocess.Popen(
        [PIPELINE, "run", wf], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=pipeline_env(),
        cwd=REPO, start_new_session=True,
    )  # fmt: skip
    second = tmp_path / "out" / "b.zarr"
    deadline = time.monotonic() + 120
    while _ledger(second) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the set reached no second image in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert [e["status"] for e in record["images"].values()] == ["complete", "interrupted", "pending"]
    done = _ledger(second)
    first = tmp_path / "out" / "a.zarr"
    kept = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    (tmp_path / "forward.log").unlink()
    resumed = run_pipeline("run", wf, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "complete from an earlier run of this set: kept" in resumed.stdout
    assert f"resume     {done} of 8 blocks were written by the interrupted run" in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == kept  # not touched
    passes = len((tmp_path / "forward.log").read_text().splitlines())
    assert passes == (8 - done) + 6  # the rest of b (8 blocks), all of deep/c (6); none of a
    for name in SHAPES:
        np.testing.assert_array_equal(_labels(tmp_path, name), _reference(tmp_path, name))
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "complete"
    assert [e["status"] for e in record["images"].values()] == ["kept", "complete", "complete"]


def _expand(root: Path, **changes: object):
    wf = yaml.safe_load(Path(_workflow(root, **changes)).read_text())
    return expand_images(parse_workflow(wf, source=str(root / "wf.yaml")))


def test_outputs_follow_the_folder_or_the_name_template(tmp_path) -> None:
    images = _expand(tmp_path)
    assert [i.name for i in images.images] == ["a", "b", "deep/c"]
    assert images.images[2].workflow.output.path == str(tmp_path / "out" / "deep" / "c.zarr")
    assert images.images[2].workflow.evaluation.ground_truth == str(tmp_path / "truth" / "deep" / "c.png")
    assert images.record_path == str(tmp_path / "out" / "run.json")
    templated = _expand(tmp_path, output__path="labels/{name}_seg.zarr", input__path=["images/a.tif", "images/b.tif"])
    assert [i.workflow.output.path for i in templated.images] == [
        str(tmp_path / "labels" / "a_seg.zarr"), str(tmp_path / "labels" / "b_seg.zarr"),
    ]  # fmt: skip
    assert templated.folder == str(tmp_path / "labels")
    assert _expand(tmp_path, input__path="images/a.tif", evaluation__ground_truth="truth/a.png") is None


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"output__path": "out/all.zarr"}, WorkflowError, r"output.path: .*all.zarr is one label volume, but input.path names 3 images; give a folder"),
        ({"evaluation__ground_truth": "truth/a.png"}, EvaluationError, r"evaluation.ground_truth: .*a.png is one file for 3 images"),
        ({"evaluation__ground_truth": "truth/*.png"}, EvaluationError, r"evaluation.ground_truth: no label image for 'deep/c' among 2"),
        ({"output__path": "images/out"}, OutputExistsError, r"output.path: .*images/out/a.zarr would lie among the images input.path names"),
        ({"input__path": "images/a.tif", "output__path": "o/{name}.zarr", "evaluation__ground_truth": "truth/a.png"}, WorkflowError, r"output.path: .*is a name template for several images, but input.path names one"),
        ({"tiling__skip": {"mask": "truth/a.png"}}, WorkflowError, r"tiling.skip.mask: one mask for 3 images"),
    ],
)  # fmt: skip
def test_a_set_that_cannot_run_is_an_error_naming_the_workflow_and_field(tmp_path, changes, error, message) -> None:
    with pytest.raises(error, match=str(tmp_path / "wf.yaml") + ": " + message):
        _expand(tmp_path, **changes)


def test_a_bad_image_in_a_set_stops_the_run_before_anything_is_written(tmp_path) -> None:
    wf = _workflow(tmp_path)
    tifffile.imwrite(tmp_path / "images" / "b.tif", np.zeros((2, 64, 64), np.uint8), photometric="minisblack")
    proc = run_pipeline("run", wf)
    assert proc.returncode == 2
    assert "b.tif" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_report_files_in_the_output_folder_are_never_replaced_unless_a_set_wrote_them(tmp_path) -> None:
    wf = _workflow(tmp_path, output__overwrite=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "evaluation.json").write_text("mine")
    proc = run_pipeline("run", wf)
    assert proc.returncode == 2
    assert "out/evaluation.json already exists; no record of a run over several images" in proc.stderr
    assert (tmp_path / "out" / "evaluation.json").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["evaluation.json"]


DUBAI_CLASSES = [
    ("Building", "#3C1098"), ("Land", "#8429F6"), ("Road", "#6EC1E4"),
    ("Vegetation", "#FEDD3A"), ("Water", "#E2A929"), ("Unlabeled", "#9B9B9B"),
]  # fmt: skip


def _palette_ids(mask_path: Path) -> np.ndarray:
    """Class ids of a Dubai mask decoded here, independently: -1 for black (ignored)."""
    rgb = np.asarray(Image.open(mask_path).convert("RGB")).astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    ids = np.full(code.shape, -1, np.int64)
    for k, (_, colour) in enumerate(DUBAI_CLASSES):
        ids[code == int(colour[1:], 16)] = k
    return ids


def _counts(truth: np.ndarray, prediction: np.ndarray, k: int) -> np.ndarray:
    keep = truth >= 0
    return np.bincount(truth[keep] * k + prediction[keep].astype(np.int64), minlength=k * k).reshape(k, k)


def test_the_dubai_tiles_as_one_run_with_statistics_per_image_and_pooled(tmp_path) -> None:
    import pipeline

    root = shared_data("aerial", "dubai_mbrsc_semantic_segmentation")
    workflow = {
        "input": {"path": f"{root}/Tile [12]/images/*.jpg", "channel_axis": 2},
        "model": {"arch": "unet", "depth": 2, "width": 4, "num_classes": 6, "in_channels": 3,
                  "normalize": {"percentiles": [1, 99]}},
        "tiling": {"tile": 256},
        "output": {"path": str(tmp_path / "dubai")},
        "evaluation": {"ground_truth": f"{root}/*/masks/*.png", "encoding": "palette",
                       "classes": [{"name": n, "colour": c} for n, c in DUBAI_CLASSES],
                       "ignore_colours": ["#000000"], "bootstrap": 200},
        "cluster": {"n_workers": 1},
    }  # fmt: skip
    labels = pipeline.run(workflow, show_progress=False)
    names = [f"Tile {t}/image_part_00{k}" for t in (1, 2) for k in range(1, 10)]
    assert list(labels) == names
    report = json.loads((tmp_path / "dubai" / "evaluation.json").read_text())
    per_image = {entry["name"]: entry for entry in report["per_image"]}
    pooled = np.zeros((6, 6), np.int64)
    for name in names:
        tile, part = name.split("/")
        truth = _palette_ids(root / tile / "masks" / f"{part}.png")
        prediction = labels[name].values
        assert prediction.shape == truth.shape and labels[name].dims == ("y", "x")
        counts = _counts(truth, prediction, 6)
        pooled += counts
        assert per_image[name]["pixels"] == counts.sum()
    assert report["pooled"]["confusion_matrix"]["counts"] == pooled.tolist()
    assert report["images"] == 18 and "bootstrap" in json.dumps(report)  # resampled over whole images


def test_isbi_slices_as_one_run_against_a_larger_folder_of_labels(tmp_path) -> None:
    root = shared_data("microscopy", "isbi2012_em_membranes")
    wf = {
        "input": {"path": f"{root}/images/?.png"},  # slices 0-9; the labels folder holds all 30
        "model": {"arch": "unet", "depth": 2, "width": 4, "num_classes": 2, "normalize": {"mean": 128.0, "std": 64.0}},
        "tiling": {"tile": 256},
        "output": {"path": str(tmp_path / "isbi" / "{name}_labels.zarr")},
        "evaluation": {"ground_truth": f"{root}/labels", "encoding": "binary"},
        "cluster": {"n_workers": 1},
    }  # fmt: skip
    path = write_workflow(tmp_path / "isbi.yaml", **wf)
    proc = run_pipeline("run", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "10 images; pooled (dataset-level) statistics:" in proc.stdout
    pooled = np.zeros((2, 2), np.int64)
    for k in range(10):
        truth = (np.asarray(Image.open(root / "labels" / f"{k}.png")) > 127).astype(np.int64)
        prediction = zarr.open_group(str(tmp_path / "isbi" / f"{k}_labels.zarr"), mode="r")["0"][:]
        pooled += _counts(truth, prediction, 2)
    report = json.loads((tmp_path / "isbi" / "evaluation.json").read_text())
    assert report["pooled"]["confusion_matrix"]["counts"] == pooled.tolist()
    assert sorted(e["name"] for e in report["per_image"]) == [str(k) for k in range(10)]


def test_validate_and_plan_check_every_image_and_describe_the_set(tmp_path) -> None:
    wf = _workflow(tmp_path)
    validated = run_pipeline("validate", wf)
    assert validated.returncode == 0, validated.stderr
    assert "valid: 3 images" in validated.stdout and "29 tiles in 29 blocks" in validated.stdout  # 15 + 8 + 6
    planned = run_pipeline("plan", wf)
    assert planned.returncode == 0, planned.stderr
    assert "images     3 images: a, b, deep/c" in planned.stdout
    assert f"output     {tmp_path / 'out'}: one label volume per image" in planned.stdout
    assert f"evaluation per image and pooled -> {tmp_path / 'out' / 'evaluation.json'}" in planned.stdout
    assert "first      a:" in planned.stdout and "tasks      3 x 5 = 15 blocks" in planned.stdout
    assert not (tmp_path / "out").exists()


def test_a_folder_of_ome_zarr_images_takes_labels_into_each_images_labels_group(tmp_path) -> None:
    for name in ("a", "b"):
        group = zarr.open_group(tmp_path / "imgs" / f"{name}.zarr", mode="w", zarr_format=3)
        group.create_array("0", data=np.zeros((64, 64), np.uint8), chunks=(32, 32), dimension_names=["y", "x"])
        axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}]}]}  # fmt: skip
    wf = _workflow(tmp_path, input__path="imgs", output__path="imgs/{name}.zarr/labels/cells", evaluation=None)
    proc = run_pipeline("run", wf)
    assert proc.returncode == 0, proc.stderr
    for name in ("a", "b"):
        labels = zarr.open_group(tmp_path / "imgs" / f"{name}.zarr" / "labels", mode="r")
        assert labels.attrs["ome"]["labels"] == ["cells"]
        assert labels["cells"]["0"].shape == (64, 64)

