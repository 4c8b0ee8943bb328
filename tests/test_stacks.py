"""3D stacks: tiled equals whole-volume inference, plane by plane for a 2D network and in 3D
for a 3D one (Hypothesis, a box filter with a known result); the ISBI slices as a stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.inference import predict_image
from pipeline.tiling import plan_tiles
from tests.helpers import (
    REPO,
    BoxFilterNet,
    BoxFilterNet3D,
    box_filter_reference,
    shared_data,
    write_workflow,
)

PIPELINE = str(Path(sys.executable).parent / "pipeline")


@st.composite
def stack_cases(draw: st.DrawFn) -> tuple:
    shape = tuple(draw(st.integers(1, n)) for n in (6, 40, 40))
    return (
        draw(st.integers(1, 2)),  # channels
        draw(st.integers(0, 3)),  # radius
        shape,
        draw(st.integers(1, 24)),  # tile
        draw(st.integers(1, 4)),  # batch: planes per forward pass
        draw(st.sampled_from(["reflect", "symmetric"])),
        draw(st.sampled_from(["same", "valid"])),
        draw(st.integers(0, 2**16)),
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stack_cases())
def test_a_2d_network_on_a_stack_equals_each_whole_plane_bit_for_bit(case) -> None:
    channels, radius, shape, tile, batch, mode, padding, seed = case
    if mode == "reflect" and min(shape[1:]) <= radius:
        return  # numpy's reflect needs more pixels than the radius (as for 2D images)
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (channels,) + shape).astype(np.uint8)
    weight = rng.integers(-3, 4, (2, channels))
    net = BoxFilterNet(radius, weight, padding)
    plan = plan_tiles(shape, net.geometry(), tile=tile, mirror=mode, batch_size=batch, plane_axes=1)
    assert plan.contexts[0] == 0 and plan.tile[0] == 1 and plan.block_shape[0] == batch
    logits = predict_image(image, net, plan, output="logits")
    expected = np.stack([box_filter_reference(image[:, z], radius, weight, mode) for z in range(shape[0])], axis=1)
    np.testing.assert_array_equal(logits, expected.astype(np.float32))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stack_cases())
def test_a_3d_network_tiled_in_3d_equals_the_whole_volume_bit_for_bit(case) -> None:
    channels, radius, shape, tile, batch, mode, padding, seed = case
    if mode == "reflect" and min(shape) <= radius:
        return
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (channels,) + shape).astype(np.uint8)
    weight = rng.integers(-3, 4, (2, channels))
    net = BoxFilterNet3D(radius, weight, padding)
    plan = plan_tiles(shape, net.geometry(), tile=tile, mirror=mode, batch_size=batch)
    assert plan.plane_axes == 0 and plan.contexts == (plan.context,) * 3  # a 3D halo, mirrored in z too
    logits = predict_image(image, net, plan, output="logits")
    np.testing.assert_array_equal(logits, box_filter_reference(image, radius, weight, mode).astype(np.float32))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PIPELINE, *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_isbi_slices_as_a_stack_equal_the_same_slices_run_one_by_one(tmp_path) -> None:
    root = shared_data("microscopy", "isbi2012_em_membranes")
    slices = [np.asarray(Image.open(root / "images" / f"{k}.png")) for k in range(5)]
    labels = [(np.asarray(Image.open(root / "labels" / f"{k}.png")) > 127).astype(np.uint8) for k in range(5)]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(slices), tile=(256, 256), metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "truth.tif", np.stack(labels), metadata={"axes": "ZYX"})
    model = {"arch": "unet", "depth": 2, "width": 4, "num_classes": 2, "normalize": {"mean": 128.0, "std": 64.0}}
    common = {"model": model, "tiling": {"tile": 256}, "inference": {"batch_size": 2}, "cluster": {"n_workers": 1}}
    stack = write_workflow(
        tmp_path / "stack.yaml", input={"path": str(tmp_path / "stack.tif")}, output={"path": str(tmp_path / "stack.zarr")},
        evaluation={"ground_truth": str(tmp_path / "truth.tif"), "per_slice": True}, **common,
    )  # fmt: skip
    one_by_one = write_workflow(
        tmp_path / "slices.yaml", input={"path": f"{root}/images/[0-4].png"}, output={"path": str(tmp_path / "slices")},
        evaluation={"ground_truth": f"{root}/labels", "encoding": "binary"}, **{**common, "inference": {"batch_size": 1}},
    )  # fmt: skip
    proc = _run("run", str(stack))
    assert proc.returncode == 0, proc.stderr
    assert "plane by plane: the 2D network sees one plane at a time, 2 planes per forward pass" in proc.stdout
    assert _run("run", str(one_by_one)).returncode == 0
    volume = zarr.open_group(str(tmp_path / "stack.zarr"), mode="r")
    assert [a["name"] for a in volume.attrs["ome"]["multiscales"][0]["axes"]] == ["z", "y", "x"]
    assert volume["1"].shape == (5, 256, 256)  # the pyramid keeps every plane
    for k in range(5):
        alone = zarr.open_group(str(tmp_path / "slices" / f"{k}.zarr"), mode="r")
        np.testing.assert_array_equal(volume["0"][k], alone["0"][:])
        np.testing.assert_array_equal(volume["1"][k], alone["1"][:])  # the stack's pyramid, plane by plane
    stacked = json.loads((tmp_path / "stack.evaluation.json").read_text())
    separate = json.loads((tmp_path / "slices" / "evaluation.json").read_text())
    assert stacked["pooled"]["confusion_matrix"] == separate["pooled"]["confusion_matrix"]
    assert stacked["regions"]["kind"] == "z-slices"
    per_slice = [r["iou"] for r in stacked["regions"]["per_region"]]  # per plane, as the slices alone
    assert per_slice == [e["iou"] for e in sorted(separate["per_image"], key=lambda e: int(e["name"]))]
