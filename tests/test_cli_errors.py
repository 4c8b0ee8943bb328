"""Every user error is one line naming the file and field, exit status 2, never a traceback.

Including what careless runs do to outputs: an output onto an input, an impossible output
location, report files that are not ours, and random workflow documents (Hypothesis).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.io.labels import create_label_volume

VALID = {
    "input": {"path": "img.tif"},
    "model": {"arch": "unet", "depth": 1, "width": 2, "num_classes": 2},
    "tiling": {"tile": 32},
    "output": {"path": "out/labels.zarr"},
    "evaluation": {"ground_truth": "gt.tif"},
    "cluster": {"n_workers": 1},
}


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "img.tif", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "gt.tif", rng.integers(0, 2, (40, 48), dtype=np.uint8))
    return tmp_path


def _write(folder: Path, doc: dict | str | bytes, name: str = "wf.yaml") -> str:
    path = folder / name
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def _with(**changes) -> dict:
    doc = json.loads(json.dumps(VALID))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return doc


def _fails_cleanly(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    for text in expected:
        assert text in err, err
    return err


def test_a_non_utf8_workflow_file(folder, capsys) -> None:
    path = _write(folder, b"input:\n  path: caf\xe9.tif\n")
    _fails_cleanly(capsys, ["validate", path], f"{path}: not UTF-8 text (byte 0xe9 at offset 18)")


def test_a_folder_as_workflow_file(folder, capsys) -> None:
    _fails_cleanly(capsys, ["validate", str(folder)], "is a folder, expected a workflow YAML file")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_impossible_output_location(folder, capsys, command) -> None:
    (folder / "out").write_text("a file where a folder should be")
    path = _write(folder, VALID)
    _fails_cleanly(capsys, [command, path], "output.path: cannot create", "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_folder(folder, capsys) -> None:
    (folder / "out").mkdir()
    (folder / "out").chmod(0o500)
    try:
        _fails_cleanly(capsys, ["validate", _write(folder, VALID)], "no permission to write in")
    finally:
        (folder / "out").chmod(0o700)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("img.tif", "output.path: {f}/img.tif is the input.path {f}/img.tif"),
        ("sub/../img.tif", "is the input.path"),
        ("link.zarr", "is the input.path"),  # a symbolic link to the input
        ("gt.tif", "is the evaluation.ground_truth"),
        ("wf.yaml", "is the workflow file"),
        (".", "contains the input.path"),
    ],
)
def test_output_onto_an_input_is_refused_with_the_input_intact(folder, capsys, output, message) -> None:
    (folder / "sub").mkdir()
    (folder / "link.zarr").symlink_to(folder / "img.tif")
    before = (folder / "img.tif").read_bytes(), (folder / "gt.tif").read_bytes()
    path = _write(folder, _with(output__path=output, output__overwrite=True))
    for command in ("validate", "run"):
        _fails_cleanly(capsys, [command, path], message.format(f=folder))
    assert ((folder / "img.tif").read_bytes(), (folder / "gt.tif").read_bytes()) == before
    assert (folder / "wf.yaml").exists()


def test_output_inside_a_zarr_input_is_refused(folder, capsys) -> None:
    zarr.create_array(str(folder / "img.zarr"), shape=(40, 48), chunks=(16, 16), dtype="uint8")
    path = _write(folder, _with(input__path="img.zarr", output__path="img.zarr/labels/x.zarr"))
    _fails_cleanly(capsys, ["validate", path], "lies inside the input.path")


def test_report_files_that_are_not_ours_stop_the_run(folder, capsys) -> None:
    (folder / "out").mkdir()
    (folder / "out" / "labels.evaluation.csv").write_text("my own numbers\n")
    path = _write(folder, _with(output__overwrite=True))
    _fails_cleanly(capsys, ["run", path], "report file", "labels.evaluation.csv already exists")
    assert (folder / "out" / "labels.evaluation.csv").read_text() == "my own numbers\n"
    assert not (folder / "out" / "labels.zarr").exists()


def test_rerun_with_overwrite_replaces_its_own_volume_and_reports(folder, capsys) -> None:
    path = _write(folder, _with(output__overwrite=True))
    assert main(["run", path]) == 0
    first = zarr.open_group(str(folder / "out" / "labels.zarr"), mode="r").attrs["pipeline"]
    assert set(first["reports"]) == {"labels.evaluation.json", "labels.evaluation.csv", "labels.confusion.png", "labels.preview.png", "labels.run.json"}
    assert main(["run", path]) == 0
    second = zarr.open_group(str(folder / "out" / "labels.zarr"), mode="r").attrs["pipeline"]
    assert second["run_id"] != first["run_id"] and second["status"] == "complete"
    capsys.readouterr()


def test_multi_series_and_multi_page_tiffs_ask_which(folder, capsys) -> None:
    with tifffile.TiffWriter(folder / "two.tif") as tif:
        tif.write(np.zeros((40, 48), np.uint8))
        tif.write(np.zeros((20, 24), np.uint8))
    path = _write(folder, _with(input__path="two.tif", evaluation=None))
    _fails_cleanly(capsys, ["validate", path], "two.tif holds 2 image series (0: 40 x 48", "set input.series")
    assert main(["validate", _write(folder, _with(input__path="two.tif", input__series=0, evaluation=None))]) == 0
    _fails_cleanly(
        capsys, ["validate", _write(folder, _with(input__path="two.tif", input__series=5, evaluation=None))],
        "input.series: 5, but", "holds 2 image series",
    )  # fmt: skip
    second = np.random.default_rng(1).integers(0, 255, (20, 24), dtype=np.uint8)
    with tifffile.TiffWriter(folder / "two.tif") as tif:
        tif.write(np.zeros((40, 48), np.uint8))
        tif.write(second)
    assert main(["run", _write(folder, _with(input__path="two.tif", input__series=1, evaluation=None))]) == 0
    tifffile.imwrite(folder / "one.tif", second)  # the same image as a file of its own: the reference
    alone = _with(input__path="one.tif", output__path="out/alone.zarr", evaluation=None)
    assert main(["run", _write(folder, alone)]) == 0
    labels = zarr.open_group(str(folder / "out" / "labels.zarr"), mode="r")["0"][:]
    assert labels.shape == (20, 24)
    np.testing.assert_array_equal(labels, zarr.open_group(str(folder / "out" / "alone.zarr"), mode="r")["0"][:])
    capsys.readouterr()
    tifffile.imwrite(folder / "stack.tif", np.zeros((5, 40, 48), np.uint8))
    path = _write(folder, _with(input__path="stack.tif", output__path="out/stack.zarr", evaluation=None))
    assert main(["validate", path]) == 0  # pages of one series are a z-stack, segmented plane by plane
    assert "(5, 40, 48) image" in capsys.readouterr().out


def test_an_unfinished_run_as_input_is_refused(folder, capsys) -> None:
    create_label_volume(str(folder / "half.zarr"), (40, 48), (16, 16), np.dtype(np.uint8), {}, False)
    for name in ("half.zarr", "half.zarr/0"):
        path = _write(folder, _with(input__path=name, evaluation=None))
        _fails_cleanly(capsys, ["validate", path], f"{name} is (in) the label volume of an unfinished run")
    path = _write(folder, _with(evaluation__ground_truth="half.zarr"))
    _fails_cleanly(capsys, ["validate", path], "evaluation.ground_truth: ", "half.zarr is (in) the label volume of an unfinished run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_one(folder, capsys) -> None:
    path = _write(folder, _with(inference__device="cuda:0"))
    _fails_cleanly(capsys, ["validate", path], "inference.device: cuda:0 was requested, but this machine has no CUDA device")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model__width": 10**6}, "model: a unet with width 1000000"),
        ({"model__arch": "dilated", "model__front_width": 10**7, "model__depth": None, "model__width": None}, "parameters"),
        ({"cluster__n_workers": 10**4}, "cluster.n_workers: 10000 worker processes on a machine with"),
        ({"cluster__threads_per_worker": 10**4}, "cluster.threads_per_worker: 10000 threads"),
        ({"tiling__tile": 10**6, "input__path": "big.zarr", "evaluation": None}, "need more than this machine's"),
        ({"inference__batch_size": 10**6, "input__path": "big.zarr", "evaluation": None}, "need more than this machine's"),
    ],
)
def test_absurd_sizes_are_refused_before_allocating(folder, capsys, changes, message) -> None:
    zarr.create_array(str(folder / "big.zarr"), shape=(100_000, 100_000), chunks=(4096, 4096), dtype="uint8")
    _fails_cleanly(capsys, ["validate", _write(folder, _with(**changes))], message)


def test_evaluate_reports_never_overwrite_unasked_or_land_on_inputs(folder, capsys) -> None:
    pred, truth = str(folder / "img.tif"), str(folder / "gt.tif")
    (folder / "r.json").write_text("{}")
    _fails_cleanly(capsys, ["evaluate", truth, truth, "--json", str(folder / "r.json")], "--json: ", "already exists; pass --overwrite")
    assert (folder / "r.json").read_text() == "{}"
    _fails_cleanly(capsys, ["evaluate", pred, truth, "--csv", truth, "--overwrite"], "--csv: ", "is the ground truth")
    assert main(["evaluate", truth, truth, "--json", str(folder / "r.json"), "--overwrite"]) == 0
    assert json.loads((folder / "r.json").read_text())["pooled"]["pixel_accuracy"] == 1.0


def test_console_script_exit_status_and_stderr(folder) -> None:
    path = _write(folder, b"\xff\xfe")
    proc = subprocess.run([str(Path(sys.executable).parent / "pipeline"), "run", path], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# --- random workflow documents -----------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=300),  # plausible sizes, indices, counts
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "cuda", "unet", "dilated", "export", "custom", "bioimageio", "torchscript",
                     "reflect", "fill", "error", "palette", "binary", "img.tif", "gt.tif", "out.zarr", "..", "/",
                     "tests.helpers:BoxFilterNet", "os:system", "\x00", "s3://bucket/x.zarr", "local", "#12345"]),
)  # fmt: skip
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
FIELDS = [
    (section, key)
    for section, keys in {
        "input": ["path", "channel_axis", "channels", "series", "non_finite", "fill_value", "colour"],
        "model": ["arch", "path", "num_classes", "in_channels", "halo", "normalize", "depth", "width", "padding",
                  "front_width", "context", "factory", "kwargs", "shift_period", "size_min", "trust_code", "seed"],
        "tiling": ["tile", "mirror"],
        "inference": ["device", "batch_size", "precision", "channels_last", "tta"],
        "output": ["path", "overwrite"],
        "evaluation": ["ground_truth", "encoding", "classes", "ignore_index", "ignore_mask", "regions", "bootstrap"],
        "cluster": ["kind", "n_workers", "threads_per_worker", "dashboard"],
        "extra": ["x"],
    }.items()
    for key in keys
]  # fmt: skip


@st.composite
def workflow_documents(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)  # not even a mapping
    doc = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 4))):
        section, key = draw(st.sampled_from(FIELDS))
        action = draw(st.sampled_from(["set", "set", "set", "drop_key", "replace_section"]))
        if action == "replace_section":
            doc[section] = draw(VALUES)
        elif action == "drop_key" and isinstance(doc.get(section), dict):
            doc[section].pop(key, None)
        else:
            if not isinstance(doc.get(section), dict):
                doc[section] = {}
            doc[section][key] = draw(VALUES)
    return doc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=workflow_documents())
def test_random_workflow_documents_never_end_in_a_traceback(folder, capsys, doc) -> None:
    """Whatever the document holds: exit 0 (still valid) or 2 with one-line errors only."""
    path = folder / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    except yaml.YAMLError:
        return
    code = main(["validate", str(path)])  # a bug raises here and fails the test
    captured = capsys.readouterr()
    assert code in (0, 2), captured.err
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), captured.err
        assert all(len(line) < 2000 for line in lines)
    assert not (folder / "pwned").exists()


def test_demo_data_never_replaces_someone_elses_images(tmp_path, capsys) -> None:
    tifffile.imwrite(tmp_path / "image.tif", np.ones((50, 50), np.uint8))
    _fails_cleanly(capsys, ["demo-data", str(tmp_path), "--size", "64"], "image.tif already exists", "--overwrite")
    assert tifffile.imread(tmp_path / "image.tif").shape == (50, 50)
    assert main(["demo-data", str(tmp_path), "--size", "64", "--overwrite"]) == 0
    assert tifffile.imread(tmp_path / "image.tif").shape == (64, 64)
    assert main(["demo-data", str(tmp_path), "--size", "64"]) == 0  # ours, same size: kept as is
    (tmp_path / "file").write_text("x")
    _fails_cleanly(capsys, ["demo-data", str(tmp_path / "file" / "sub"), "--size", "64"], "cannot write into")


def test_overwrite_never_deletes_a_foreign_group_through_the_cli(folder, capsys) -> None:
    group = zarr.open_group(str(folder / "out" / "labels.zarr"), mode="w", zarr_format=3)
    group.create_array("0", shape=(40, 48), chunks=(40, 48), dtype="uint8")[:] = 9
    group.attrs["pipeline"] = {"status": "complete"}  # what the old check trusted
    path = _write(folder, _with(output__overwrite=True))
    for command in ("validate", "run"):
        _fails_cleanly(capsys, [command, path], "not a label volume this pipeline can prove it wrote")
    assert (zarr.open_group(str(folder / "out" / "labels.zarr"), mode="r")["0"][:] == 9).all()
