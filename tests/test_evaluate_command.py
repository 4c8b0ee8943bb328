"""`pipeline evaluate` on real label images: every report, every policy, every bad input."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.encodings import colour_hex
from tests.helpers import shared_data
from tests.test_evaluation import DUBAI_CLASSES


@pytest.fixture
def isbi(tmp_path):
    """Five ISBI label slices (binary 0/255) and a prediction with 10% of pixels flipped."""
    labels = shared_data("microscopy", "isbi2012_em_membranes", "labels")
    rng = np.random.default_rng(1)
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    for i in range(5):
        shutil.copy(labels / f"{i}.png", tmp_path / "truth" / f"{i}.png")
        truth = np.asarray(Image.open(labels / f"{i}.png"))
        pred = np.where(rng.random(truth.shape) < 0.1, 255 - truth, truth).astype(np.uint8)
        tifffile.imwrite(tmp_path / "pred" / f"{i}.tif", pred, tile=(128, 128))
    return tmp_path


def test_folders_with_every_report(isbi, capsys) -> None:
    image = shared_data("microscopy", "isbi2012_em_membranes", "images", "0.png")
    out = isbi / "reports"
    out.mkdir()
    argv = [
        "evaluate", str(isbi / "pred"), str(isbi / "truth"), "--encoding", "binary",
        "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
        "--heatmap", str(out / "cm.png"), "--preview", str(out / "preview.png"), "--image", str(image),
        "--bootstrap", "100", "--regions", "256",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "5 image pairs" in printed and "| class 0" in printed and "mIoU" in printed
    doc = json.loads((out / "r.json").read_text())
    assert doc["images"] == 5 and len(doc["per_image"]) == 5
    assert doc["pooled"]["pixels_evaluated"] == 5 * 512 * 512
    assert 0.85 < doc["pooled"]["pixel_accuracy"] < 0.95
    assert "mean_of_per_image_iou" in doc and doc["policy"]["encoding"] == "binary"
    assert len(doc["regions"]["per_region"]) == 5 * 4
    assert doc["bootstrap"]["unit"] == "regions" and doc["bootstrap"]["units"] == 20
    low, high = doc["bootstrap"]["mean_iou_interval"]
    assert low <= doc["pooled"]["mean_iou"] <= high
    rows = list(csv.DictReader(open(out / "r.csv")))
    assert [r["name"] for r in rows] == ["class 0", "class 1"]
    assert float(rows[1]["iou"]) == pytest.approx(doc["pooled"]["per_class"][1]["iou"])
    heatmap, preview = Image.open(out / "cm.png"), Image.open(out / "preview.png")
    assert heatmap.size[0] > 100 and preview.size == (3 * 512 + 16, 512 + 26)
    errors = np.asarray(preview.convert("RGB"))[26:, 2 * 520 :]
    red = (errors[..., 0] > 200) & (errors[..., 1] < 60)
    assert 0.05 < red.mean() < 0.15  # the 10% flipped pixels show as errors


def test_bootstrap_over_images(isbi) -> None:
    report = isbi / "r.json"
    argv = ["evaluate", str(isbi / "pred"), str(isbi / "truth"), "--encoding", "binary",
            "--bootstrap", "300", "--confidence", "0.9", "--json", str(report)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(report.read_text())
    assert doc["bootstrap"]["unit"] == "images" and doc["bootstrap"]["units"] == 5
    assert doc["bootstrap"]["confidence"] == 0.9 and "regions" not in doc
    low, high = doc["bootstrap"]["mean_iou_interval"]
    assert low <= doc["pooled"]["mean_iou"] <= high


def test_palette_masks_with_class_names(tmp_path, capsys) -> None:
    masks = shared_data("aerial", "dubai_mbrsc_semantic_segmentation", "Tile 1", "masks")
    classes = tmp_path / "classes.yaml"
    classes.write_text(yaml.safe_dump([{"name": n, "colour": colour_hex(c)} for n, c in DUBAI_CLASSES]))
    argv = ["evaluate", str(masks), str(masks), "--encoding", "palette", "--classes", str(classes),
            "--ignore-colour", "#000000", "--json", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["class_names"] == [n for n, _ in DUBAI_CLASSES]
    assert doc["pooled"]["mean_iou"] == 1.0 and doc["pooled"]["pixel_accuracy"] == 1.0
    assert "| Building" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("class", r"truth.tif holds class ids 5 .*expected 0..1"),
        ("shape", r"truth.tif has shape \(40, 40\), but prediction: .*pred.tif has shape \(40, 30\)"),
        ("colour", r"colours not in the palette: #0A0B0C \(1 px\)"),
        ("empty", r"empty"),
        ("missing", r"not found"),
    ],
)
def test_bad_inputs_exit_non_zero_with_a_clear_message(tmp_path, capsys, case, message) -> None:
    pred = np.zeros((40, 40), np.uint8)
    truth = pred.copy()
    extra: list[str] = ["--num-classes", "2"]
    if case == "class":
        truth[3, 3] = 5
    if case == "shape":
        pred = pred[:, :30]
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    pred_path, truth_path = str(tmp_path / "pred.tif"), str(tmp_path / "truth.tif")
    if case == "colour":
        rgb = np.zeros((8, 8, 3), np.uint8)
        rgb[0, 0] = (10, 11, 12)
        Image.fromarray(rgb).save(tmp_path / "m.png")
        pred_path = truth_path = str(tmp_path / "m.png")
        extra = ["--encoding", "palette", "--classes", str(tmp_path / "c.yaml")]
        (tmp_path / "c.yaml").write_text(yaml.safe_dump([{"name": "a", "colour": "#000000"}, {"name": "b", "colour": "#FFFFFF"}]))
    if case == "empty":
        import zarr

        zarr.create_array(str(tmp_path / "e.zarr"), shape=(0, 4), dtype="uint8")
        pred_path = str(tmp_path / "e.zarr")
    if case == "missing":
        pred_path = str(tmp_path / "nope.tif")
    assert main(["evaluate", pred_path, truth_path, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_volume_per_slice_bootstrap_report(tmp_path) -> None:
    labels = shared_data("microscopy", "isbi2012_em_membranes", "labels")
    truth = np.stack([np.asarray(Image.open(labels / f"{i}.png")) for i in range(10)])
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "pred.tif", np.roll(truth, 3, axis=2), tile=(256, 256))
    argv = ["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "truth.tif"), "--encoding", "binary",
            "--per-slice", "--bootstrap", "200", "--json", str(tmp_path / "r.json"), "--preview", str(tmp_path / "p.png")]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["regions"]["kind"] == "z-slices" and len(doc["regions"]["per_region"]) == 10
    assert [r["offset"][0] for r in doc["regions"]["per_region"]] == list(range(10))
    assert doc["bootstrap"]["unit"] == "regions" and doc["bootstrap"]["units"] == 10
    assert Image.open(tmp_path / "p.png").size == (3 * 512 + 16, 512 + 26)
