"""`pipeline run` end to end on a real local Dask cluster, TIFF in, zarr out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import zarr

from pipeline.config import parse_workflow
from pipeline.errors import EvaluationError, ExecutionError
from pipeline.io.labels import open_label_volume
from pipeline.runner import run
from tests.helpers import BoxFilterNet, FailOnBright, box_filter_reference


def _workflow(tmp_path, **overrides):
    raw = {
        "input": {"path": "img.tif", "channel_axis": 2},
        "model": {
            "arch": "torchscript",
            "path": "box.pt",
            "num_classes": 3,
            "in_channels": 3,
            "halo": 4,
        },
        "tiling": {"tile": 56, "mirror": "symmetric"},
        "inference": {"batch_size": 3},
        "output": {"path": "out/labels.zarr"},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_workflow(raw, source=tmp_path / "wf.yaml")


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_distributed_run_equals_the_numpy_whole_image_result(tmp_path, padding, capsys) -> None:
    """Exact seams through Dask workers, TIFF reads, batching and zarr chunk writes."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (203, 171, 3), dtype=np.uint8)  # channels last, RGB
    tifffile.imwrite(tmp_path / "img.tif", image, photometric="rgb", tile=(48, 48))
    weight = rng.integers(-2, 3, (3, 3))
    torch.jit.save(torch.jit.script(BoxFilterNet(4, weight, padding)), tmp_path / "box.pt")
    expected = box_filter_reference(np.moveaxis(image, -1, 0), 4, weight, "symmetric").argmax(0)
    tifffile.imwrite(tmp_path / "gt.tif", expected.astype(np.uint8))

    wf = _workflow(tmp_path, evaluation={"ground_truth": "gt.tif"})
    result = run(wf)

    labels = open_label_volume(result.output_path)
    assert labels.chunks == (56, 168)  # a block of 1 x 3 tiles of 56: one batch of 3
    np.testing.assert_array_equal(labels[:], expected)
    report = json.loads(open(result.report_path).read())
    assert report["pooled"]["mean_iou"] == 1.0 and report["pooled"]["pixel_accuracy"] == 1.0
    assert report["pooled"]["pixels_evaluated"] == 203 * 171
    assert "note" not in report  # a real model file: no untrained warning
    assert report["model"]["weights"]["path"].endswith("box.pt")


def test_a_failing_block_is_named_and_the_output_stays_incomplete(tmp_path) -> None:
    image = np.zeros((100, 100), np.uint16)
    image[90, 10] = 5000
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    torch.jit.save(torch.jit.script(FailOnBright()), tmp_path / "box.pt")
    wf = _workflow(
        tmp_path,
        input={"channel_axis": None},
        model={"num_classes": 2, "in_channels": 1, "halo": 0},
        tiling={"tile": 50},
        inference={"batch_size": 1},
    )
    with pytest.raises(ExecutionError, match=r"block \(1, 0\) \(pixels 50:100, 0:50\) .*corrupt tile"):
        run(wf)
    group = zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")
    assert group.attrs["pipeline"]["status"] == "running"


def test_ground_truth_with_unknown_classes_is_an_error_after_complete_labels(tmp_path) -> None:
    image = np.zeros((60, 60), np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    gt = np.zeros((60, 60), np.uint8)
    gt[5, 7] = 7
    tifffile.imwrite(tmp_path / "gt.tif", gt)
    torch.jit.save(torch.jit.script(BoxFilterNet(1, np.array([[1], [-1]]))), tmp_path / "box.pt")
    wf = _workflow(
        tmp_path,
        input={"channel_axis": None},
        model={"num_classes": 2, "in_channels": 1, "halo": 1},
        evaluation={"ground_truth": "gt.tif"},
        cluster={"n_workers": 1},
    )
    with pytest.raises(EvaluationError, match=r"evaluation.ground_truth: .*gt.tif holds class ids 7 in the region 0:56, 0:60; expected 0..1"):
        run(wf)
    assert open_label_volume(str(tmp_path / "out" / "labels.zarr")).shape == (60, 60)
    assert not (tmp_path / "out" / "labels.evaluation.json").exists()


def test_channel_selection_and_whole_image_percentiles(tmp_path) -> None:
    """The model sees channels [2, 0], scaled by percentiles of the whole image, not per tile."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 4096, (150, 130, 3)).astype(np.uint16)
    image[:75] //= 8  # darker top half: per-tile statistics would differ between tiles
    tifffile.imwrite(tmp_path / "img.tif", image, photometric="rgb", tile=(32, 32))
    weight = np.array([[1, -1], [-1, 1]])
    torch.jit.save(torch.jit.script(BoxFilterNet(2, weight)), tmp_path / "box.pt")
    wf = _workflow(
        tmp_path,
        input={"channels": [2, 0]},
        model={"num_classes": 2, "in_channels": 2, "halo": 2, "normalize": {"percentiles": [2, 98]}},
        tiling={"tile": 40, "mirror": "reflect"},
        inference={"batch_size": 2},
        cluster={"n_workers": 1},
    )
    result = run(wf)

    selected = np.moveaxis(image[..., [2, 0]], -1, 0).astype(np.float64)
    low = np.percentile(selected.reshape(2, -1), 2, axis=1)
    high = np.percentile(selected.reshape(2, -1), 98, axis=1)
    provenance = zarr.open_group(result.output_path, mode="r").attrs["pipeline"]["normalization"]
    np.testing.assert_allclose(provenance["mean"], low)
    np.testing.assert_allclose(provenance["std"], high - low)
    scaled = (selected - low[:, None, None]) / (high - low)[:, None, None]
    padded = np.pad(scaled, ((0, 0), (2, 2), (2, 2)), mode="reflect")
    box = np.lib.stride_tricks.sliding_window_view(padded, (5, 5), axis=(1, 2)).sum(axis=(-1, -2))
    logits = np.einsum("kc,chw->khw", weight, box)
    decided = np.abs(logits[0] - logits[1]) > 1e-3
    labels = open_label_volume(result.output_path)[:]
    np.testing.assert_array_equal(labels[decided], logits.argmax(0)[decided])
    assert decided.mean() > 0.99


def _format_files(tmp_path, fmt: str, net: torch.nn.Module) -> dict:
    """Write ``net`` in a model format; returns the workflow's model section for it."""
    from safetensors.torch import save_file
    from torch.export import Dim, export

    declared = {"num_classes": 2, "in_channels": 1, "halo": 2}
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(net), tmp_path / "m.pt")
        return {"arch": "torchscript", "path": "m.pt", **declared}
    if fmt == "export":
        h, w = Dim("h", min=8, max=4096), Dim("w", min=8, max=4096)
        program = export(net, (torch.rand(2, 1, 64, 64),), dynamic_shapes={"x": {0: Dim("n", max=64), 2: h, 3: w}})
        torch.export.save(program, tmp_path / "m.pt2")
        return {"arch": "export", "path": "m.pt2", **declared}
    if fmt == "custom":
        save_file(net.state_dict(), tmp_path / "m.safetensors")
        kwargs = {"radius": 2, "weight": [[0], [0]]}  # the weights come from the file
        return {"arch": "custom", "factory": "tests.helpers:BoxFilterNet", "kwargs": kwargs, "path": "m.safetensors", **declared}
    from tests.models.test_bioimageio import _v04

    if fmt == "bioimageio-source":  # an architecture file shipped with the model: trust_code
        (tmp_path / "arch.py").write_text("from tests.helpers import BoxFilterNet\n")
        torch.save(net.state_dict(), tmp_path / "w.pt")
        entry = {"source": "w.pt", "architecture": "arch.py:BoxFilterNet", "kwargs": {"radius": 2, "weight": [[0], [0]]}}
        _v04(tmp_path, {"pytorch_state_dict": entry}, halo=2, step=1)
        return {"arch": "bioimageio", "path": "rdf.yaml", "num_classes": 2, "trust_code": True}
    torch.jit.save(torch.jit.script(net), tmp_path / "m.pt")
    _v04(tmp_path, {"torchscript": {"source": "m.pt"}}, halo=2, step=1)
    return {"arch": "bioimageio", "path": "rdf.yaml", "num_classes": 2}


@pytest.mark.parametrize("fmt", ["torchscript", "export", "custom", "bioimageio", "bioimageio-source"])
def test_every_model_format_through_pipeline_run(tmp_path, fmt, capsys) -> None:
    """Each format the README lists, loaded and run end to end by `pipeline run`, exact."""
    from pipeline.cli import main
    from tests.helpers import write_workflow

    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (97, 83), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    weight = np.array([[1], [-1]])
    model = _format_files(tmp_path, fmt, BoxFilterNet(2, weight))
    path = write_workflow(
        tmp_path / "wf.yaml",
        input={"path": "img.tif"},
        model=model,
        tiling={"tile": 64 if fmt.startswith("bioimageio") else 40},
        output={"path": "out.zarr"},
        cluster={"n_workers": 1},
    )
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    expected = box_filter_reference(image[None], 2, weight, "reflect").argmax(0)
    np.testing.assert_array_equal(open_label_volume(str(tmp_path / "out.zarr"))[:], expected)
