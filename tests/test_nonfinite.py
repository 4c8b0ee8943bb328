"""NaN and infinity are never silent: parameters, input pixels, model outputs."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr

from pipeline.cli import main
from pipeline.config import parse_workflow
from pipeline.errors import ExecutionError
from pipeline.geometry import Box
from pipeline.io.labels import open_label_volume
from pipeline.nonfinite import fill_non_finite, find_non_finite
from pipeline.runner import run
from tests.helpers import BoxFilterNet, box_filter_reference, write_workflow


def test_find_counts_pixels_inside_the_region_in_image_coordinates() -> None:
    x = np.zeros((2, 6, 7), np.float32)
    x[0, 1, 2] = np.nan  # box offset (10, 20): image pixel (11, 22)
    x[1, 1, 2] = np.inf  # the same pixel, another channel: one pixel
    x[1, 4, 6] = -np.inf  # image pixel (14, 26)
    box = Box((10, 20), (6, 7))
    found = find_non_finite(x, box, Box((0, 0), (100, 100)))
    assert (found.count, found.first) == (2, (11, 22))
    assert "2 NaN/infinite pixels in pixels 10:16, 20:27 (first at 11, 22)" in found.describe()
    assert find_non_finite(x, box, Box((12, 0), (100, 100))).count == 1
    assert find_non_finite(np.zeros((1, 6, 7), np.uint8), box, box) is None  # integers hold none
    filled = fill_non_finite(x, -1.0)
    assert np.isfinite(filled).all() and filled[0, 1, 2] == -1 and filled[1, 4, 6] == -1


def _setup(tmp_path, image: np.ndarray, model: torch.nn.Module, halo: int) -> dict:
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(16, 16))
    torch.jit.save(torch.jit.script(model), tmp_path / "m.pt")
    return {
        "input": {"path": "img.tif"},
        "model": {"arch": "torchscript", "path": "m.pt", "num_classes": 2, "halo": halo},
        "tiling": {"tile": 32},
        "output": {"path": "out/labels.zarr"},
        "cluster": {"n_workers": 1},
    }


def _float_image_with_holes(seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 50, (70, 90)).astype(np.float32)
    holes = [(5, 7), (40, 81), (69, 0)]
    image[5, 7], image[40, 81], image[69, 0] = np.nan, np.inf, -np.inf
    return image, holes


def test_nan_pixels_are_an_error_by_default_naming_count_and_place(tmp_path) -> None:
    image, holes = _float_image_with_holes()
    raw = _setup(tmp_path, image, BoxFilterNet(1, np.array([[1], [-1]])), halo=1)
    raw["model"] = {"arch": "unet", "depth": 1, "width": 2, "num_classes": 2}  # no halo probe at validate
    # blocks run concurrently: whichever block with a hole fails first is reported
    places = "|".join(f"{y}, {x}" for y, x in holes)
    with pytest.raises(ExecutionError, match=rf"img.tif holds 1 NaN/infinite pixel in pixels .* \(first at ({places})\).*input.non_finite: fill"):
        run(parse_workflow(raw, source=tmp_path / "wf.yaml"))
    assert zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r").attrs["pipeline"]["status"] == "running"


def test_validate_finds_them_in_the_crops_it_probes(tmp_path, capsys) -> None:
    image = np.full((70, 90), 3.0, np.float32)
    image[35, 45] = np.nan  # the centre crop of the halo probe holds it
    path = write_workflow(tmp_path / "wf.yaml", **_setup(tmp_path, image, BoxFilterNet(1, np.array([[1], [-1]])), halo=1))
    assert main(["validate", str(path)]) == 2
    assert "holds 1 NaN/infinite pixel in pixels" in capsys.readouterr().err


def test_fill_policy_replaces_and_reports_every_non_finite_pixel_once(tmp_path, capsys) -> None:
    image, holes = _float_image_with_holes()
    weight = np.array([[1], [-1]])
    raw = _setup(tmp_path, image, BoxFilterNet(2, weight), halo=2)
    raw["input"].update(non_finite="fill", fill_value=25.0)
    assert main(["run", str(write_workflow(tmp_path / "wf.yaml", **raw))]) == 0  # as users run it
    output = str(tmp_path / "out" / "labels.zarr")

    filled = np.where(np.isfinite(image), image, 25.0)
    expected = box_filter_reference(filled[None].astype(np.int64), 2, weight, "reflect").argmax(0)
    np.testing.assert_array_equal(open_label_volume(output)[:], expected)
    record = zarr.open_group(output, mode="r").attrs["pipeline"]
    assert record["non_finite_pixels_filled"] == len(holes)  # each pixel in exactly one write box
    assert f"{len(holes)} NaN/infinite input pixels" in capsys.readouterr().out


def test_whole_image_statistics_name_the_non_finite_count(tmp_path) -> None:
    image, holes = _float_image_with_holes()
    raw = _setup(tmp_path, image, BoxFilterNet(1, np.array([[1], [-1]])), halo=1)
    raw["model"] = {"arch": "unet", "depth": 1, "width": 2, "num_classes": 2, "normalize": {"percentiles": [1, 99]}}
    with pytest.raises(Exception, match=f"holds {len(holes)} NaN/infinite pixels, so its statistics are undefined"):
        run(parse_workflow(raw, source=tmp_path / "wf.yaml"))


class NaNWhereBright(torch.nn.Module):
    """Finite logits, except NaN wherever the input exceeds 200 (a broken layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([x, -x], dim=1)
        return torch.where(x > 200, torch.full_like(y, float("nan")), y)


def test_nan_logits_fail_the_block_naming_the_model(tmp_path) -> None:
    image = np.zeros((64, 64), np.uint8)
    image[50, 40] = 255
    raw = _setup(tmp_path, image, NaNWhereBright(), halo=0)
    with pytest.raises(ExecutionError, match=r"block \(1, 1\) .*model .*m.pt emitted 1 NaN/infinite logits for pixels 32:64, 32:64"):
        run(parse_workflow(raw, source=tmp_path / "wf.yaml"))


@pytest.mark.parametrize(
    ("normalize", "field"),
    [({"mean": ".nan", "std": 1}, "model.normalize.mean"), ({"mean": 0, "std": [1, ".inf"]}, "model.normalize.std")],
)
def test_non_finite_normalisation_is_an_error_at_validate(tmp_path, capsys, normalize, field) -> None:
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32), np.uint8))
    text = (
        "input: {path: img.tif}\n"
        "model: {arch: unet, depth: 1, width: 2, num_classes: 2, normalize: {"
        + ", ".join(f"{k}: {v}" for k, v in normalize.items())
        + "}}\noutput: {path: out.zarr}\n"
    )
    (tmp_path / "wf.yaml").write_text(text)
    assert main(["validate", str(tmp_path / "wf.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{field}: expected a finite number" in err and "Traceback" not in err


def test_fill_value_must_be_finite(tmp_path, capsys) -> None:
    path = write_workflow(
        tmp_path / "wf.yaml",
        input={"path": "img.tif", "non_finite": "fill", "fill_value": float("nan")},
        model={"arch": "unet", "num_classes": 2},
        output={"path": "o.zarr"},
    )
    assert main(["validate", str(path)]) == 2
    assert "input.fill_value: expected a finite number" in capsys.readouterr().err
