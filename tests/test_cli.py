"""The command line on real files: the demo workflow, and every kind of bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr

from pipeline.cli import main
from tests.helpers import REPO


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """workflows/demo.yaml beside demo data generated at 2048 x 2048 (its model path made
    absolute: the copy is elsewhere)."""
    folder = tmp_path_factory.mktemp("demo")
    wf = yaml.safe_load((REPO / "workflows" / "demo.yaml").read_text())
    wf["model"]["path"] = str(REPO / "models" / "demo_unet.safetensors")
    (folder / "demo.yaml").write_text(yaml.safe_dump(wf))
    assert main(["demo-data", str(folder / "demo-data"), "--size", "2048"]) == 0
    return folder / "demo.yaml"


def test_demo_validate_plan_run(demo, capsys) -> None:
    assert main(["validate", str(demo)]) == 0
    assert "valid" in capsys.readouterr().out

    assert main(["plan", str(demo)]) == 0
    plan = capsys.readouterr().out
    for expected in ("2048 x 2048 px", "halo 107 px", "read box 1248 x 1248", "2 x 2 = 4 blocks", "memory", "mirrored (reflect)"):
        assert expected in plan, expected
    # tile: auto says what it chose and why, what the halo costs and what a task needs
    assert "tiling.tile: auto: the fastest tile whose task fits" in plan
    assert "overlap 1.49x (pixels computed per image pixel)" in plan  # (2 x 1248)^2 / 2048^2
    assert re.search(r"memory     ~\d+(\.\d)? MiB per task", plan)

    assert main(["run", str(demo)]) == 0
    captured = capsys.readouterr()
    assert "blocks 4/4 (tiles 4/4) 100%" in captured.err and "MPx/s" in captured.err
    out_path = demo.parent / "out" / "demo.zarr"
    report_path = demo.parent / "out" / "demo.evaluation.json"
    assert str(out_path) in captured.out and str(report_path) in captured.out
    for name in ("demo.evaluation.csv", "demo.confusion.png", "demo.preview.png"):
        assert (demo.parent / "out" / name).stat().st_size > 0 and name in captured.out
    assert "mIoU" in captured.out and "untrained" not in captured.out
    assert "demo_unet.safetensors: trained by pipeline train on demo-1, demo-2; held-out demo-3: mIoU" in captured.out

    group = zarr.open_group(str(out_path), mode="r")
    assert group.attrs["pipeline"]["status"] == "complete"
    assert group.attrs["pipeline"]["model"]["weights"]["path"].endswith("demo_unet.safetensors")
    assert group.attrs["pipeline"]["workflow"]["model"]["arch"] == "unet"
    labels = group["0"][:]
    assert labels.shape == (2048, 2048) and labels.dtype == np.uint8
    report = json.loads(report_path.read_text())
    truth = tifffile.imread(demo.parent / "demo-data" / "labels.tif")
    assert report["pooled"]["pixel_accuracy"] == pytest.approx((labels == truth).mean(), abs=1e-12)
    assert "note" not in report and report["pooled"]["mean_iou"] > 0.85  # a trained model segments


@pytest.fixture
def small(tmp_path) -> dict:
    """A valid small workflow (as a dict) with its image and ground truth on disk."""
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "img.tif", rng.integers(0, 255, (96, 80), dtype=np.uint8), tile=(32, 32))
    tifffile.imwrite(tmp_path / "gt.tif", rng.integers(0, 2, (96, 80), dtype=np.uint8))
    return {
        "input": {"path": "img.tif"},
        "model": {"arch": "unet", "depth": 2, "width": 2, "num_classes": 2},
        "tiling": {"tile": 32},
        "output": {"path": "out/labels.zarr"},
        "evaluation": {"ground_truth": "gt.tif"},
        "cluster": {"n_workers": 1},
    }


def _write(tmp_path: Path, wf: dict) -> str:
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(wf))
    return str(path)


def _mutate(wf: dict, dotted: str, value) -> dict:
    wf = json.loads(json.dumps(wf))
    *parents, key = dotted.split(".")
    node = wf
    for p in parents:
        node = node[p]
    node[key] = value
    return wf


BAD_INPUTS = [
    ("model.colour", "red", "model.colour: unknown key"),
    ("tiling.tile", "big", "tiling.tile: expected an integer >= 1 or 'auto', got 'big'"),
    ("input.path", "missing.tif", "input.path: file not found"),
    ("model.halo", 500, "model.halo: 500 px is larger than allowed"),
    ("model.halo", 5, "model.halo: 5 px is smaller than the receptive-field radius"),
    ("model.in_channels", 3, "model.in_channels: 3, but"),
    ("tiling.tile", 30, "tiling.tile: 30 is not a legal tile size"),
    ("evaluation.ground_truth", "small_gt.tif", "evaluation.ground_truth: .*small_gt.tif has shape \\(50, 50\\)"),
    ("model.path", "nope.pt", "model.path: file not found"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(("field", "value", "message"), BAD_INPUTS, ids=[b[0] + "=" + str(b[1]) for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, small, capsys, command, field, value, message) -> None:
    tifffile.imwrite(tmp_path / "small_gt.tif", np.zeros((50, 50), np.uint8))
    wf = _write(tmp_path, _mutate(small, field, value))
    assert main([command, wf]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert str(tmp_path / "wf.yaml") in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_left_untouched(tmp_path, small, capsys) -> None:
    wf = _write(tmp_path, small)
    (tmp_path / "out" / "labels.zarr").mkdir(parents=True)
    marker = tmp_path / "out" / "labels.zarr" / "mine.txt"
    marker.write_text("keep me")
    for command in ("validate", "run"):
        assert main([command, wf]) == 2
        assert "output.path: " in capsys.readouterr().err
    assert marker.read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["labels.zarr"]


def test_python_dash_m_and_console_script_exit_codes(tmp_path, small) -> None:
    wf = _write(tmp_path, _mutate(small, "model.depth", "deep"))
    for argv in ([sys.executable, "-m", "pipeline"], [str(Path(sys.executable).parent / "pipeline")]):
        proc = subprocess.run([*argv, "validate", wf], capture_output=True, text=True)
        assert proc.returncode == 2
        assert "model.depth: expected an integer" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["aerial_dubai.yaml", "isbi_em.yaml", "isbi_slices.yaml"])
def test_shipped_examples_on_the_shared_data_validate_and_run(tmp_path, name, capsys) -> None:
    from tests.helpers import shared_data

    shared_data()  # skips without ../shared/data
    wf = yaml.safe_load((REPO / "workflows" / name).read_text())
    many = "{name}" in wf["output"]["path"]
    wf["output"]["path"] = str(tmp_path / ("{name}.zarr" if many else "out.zarr"))  # keep the checkout clean
    wf["cluster"] = {"n_workers": 1}
    path = REPO / "workflows" / f".test-{name}"  # beside the original: same relative paths
    path.write_text(yaml.safe_dump(wf))
    try:
        assert main(["validate", str(path)]) == 0
        assert main(["run", str(path)]) == 0
    finally:
        path.unlink()
    out = capsys.readouterr().out
    assert "mIoU" in out and "untrained" in out
    report = json.loads((tmp_path / ("evaluation.json" if many else "out.evaluation.json")).read_text())
    assert report["pooled"]["pixels_evaluated"] > 0
    if many:
        assert len(report["per_image"]) == 30 and (tmp_path / "29.zarr").is_dir()


def test_the_shipped_run_over_all_dubai_tiles_validates(tmp_path, capsys) -> None:
    from tests.helpers import shared_data

    shared_data()
    wf = yaml.safe_load((REPO / "workflows" / "dubai_tiles.yaml").read_text())
    wf["output"]["path"] = str(tmp_path / "tiles")  # keep the checkout clean
    path = REPO / "workflows" / ".test-dubai_tiles.yaml"  # beside the original: same relative paths
    path.write_text(yaml.safe_dump(wf))
    try:
        assert main(["validate", str(path)]) == 0
    finally:
        path.unlink()
    assert "valid: 72 images" in capsys.readouterr().out
