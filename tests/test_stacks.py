"""3D stacks: tiled equals whole-volume inference, plane by plane for a 2D network and in 3D
for a 3D one (Hypothesis, a box filter with a known result); the ISBI slices as a stack."""

from __future__ import annotations

import json

import numpy as np
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.inference import predict_image
from pipeline.tiling import plan_tiles
from tests.helpers import (
    BoxFilterNet,
    BoxFilterNet3D,
    box_filter_reference,
    run_pipeline,
    shared_data,
    write_workflow,
)


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
    proc = run_pipeline("run", str(stack))
    assert proc.returncode == 0, proc.stderr
    assert "plane by plane: the 2D network sees one plane at a time, 2 planes per forward pass" in proc.stdout
    assert run_pipeline("run", str(one_by_one)).returncode == 0
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


def test_a_3d_unet_tiled_in_3d_equals_one_forward_pass_over_the_whole_volume() -> None:
    import torch

    from pipeline.config import NormalizeConfig
    from pipeline.inference import normalise
    from pipeline.models.unet import UNet, unet_geometry

    torch.manual_seed(0)
    net = UNet(1, 3, depth=2, width=4, dims=3).eval()
    geometry = unet_geometry(2, "same", dims=3)
    assert geometry.dims == 3 and geometry.halo == 23
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:36, :44, :40]
    volume = (120 + 60 * np.sin(zz / 5) * np.cos(yy / 7 + xx / 9) + rng.normal(0, 20, zz.shape)).clip(0, 255)
    image = volume.astype(np.uint8)[None]
    normalize = NormalizeConfig(mean=120.0, std=60.0)
    plan = plan_tiles(image.shape[1:], geometry, tile=16, mirror="reflect", batch_size=2)
    assert plan.plane_axes == 0 and plan.n_tiles == 3 * 3 * 3 and plan.read_shape == (64, 64, 64)
    tiled = predict_image(image, net, plan, normalize, output="logits")
    c, m = plan.context, geometry.tile_multiple
    pads = tuple((c, c + (-n) % m) for n in plan.image_shape)  # mirrored, then to a legal size
    padded = np.pad(image, ((0, 0), *pads), mode="reflect")
    with torch.inference_mode():
        whole = net(torch.from_numpy(normalise(padded, normalize))[None])[0].numpy()
    whole = whole[(slice(None),) + tuple(slice(c, c + n) for n in plan.image_shape)]
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)


def test_a_3d_unet_runs_on_a_stack_through_pipelinerun_pipeline(tmp_path) -> None:
    stack = np.random.default_rng(3).integers(0, 255, (12, 40, 48), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, tile=(16, 16), metadata={"axes": "ZYX"})
    model = {"arch": "unet", "dims": 3, "depth": 1, "width": 2, "num_classes": 2, "normalize": {"mean": 128.0, "std": 64.0}}
    wf = write_workflow(
        tmp_path / "wf.yaml", input={"path": str(tmp_path / "stack.tif")}, model=model, tiling={"tile": 16},
        output={"path": str(tmp_path / "out.zarr")}, cluster={"n_workers": 1},
    )  # fmt: skip
    done = run_pipeline("run", str(wf))
    assert done.returncode == 0, done.stderr
    assert "3D U-Net (depth 1, same padding)" in done.stdout and "write box 12 x 16 x 16" in done.stdout
    assert "tasks      1 x 3 x 3 = 9 blocks" in done.stdout  # 3D tiles, no plane axis
    assert zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["0"].shape == (12, 40, 48)
    flat = write_workflow(
        tmp_path / "flat.yaml", input={"path": str(tmp_path / "flat.tif")}, model=model, tiling={"tile": 16},
        output={"path": str(tmp_path / "flat.zarr")}, cluster={"n_workers": 1},
    )  # fmt: skip
    tifffile.imwrite(tmp_path / "flat.tif", stack[0])
    refused = run_pipeline("validate", str(flat))
    assert refused.returncode == 2 and "model.dims: 3, but" in refused.stderr and "needs a stack" in refused.stderr
