"""Per-class probabilities beside the labels: the softmax of the stitched logits, as stored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.probabilities import encode, one_hot, softmax
from tests.helpers import REPO

PIPELINE = str(Path(sys.executable).parent / "pipeline")
WEIGHT = [[1], [-1], [0]]


@given(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 6)), elements=st.floats(-80, 80, width=32)))
def test_softmax_is_a_distribution_per_pixel_and_keeps_the_argmax(logits) -> None:
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(axis=0), 1.0, rtol=1e-12)
    assert (p >= 0).all()
    expected = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(axis=0)
    np.testing.assert_allclose(p, expected, rtol=1e-9, atol=1e-300)
    stored = encode(p, "uint8")
    assert stored.dtype == np.uint8 and (np.abs(stored / 255 - p) <= 0.5 / 255 + 1e-12).all()
    assert encode(p, "float16").dtype == np.float16


def test_a_skipped_block_is_certain_of_its_class() -> None:
    assert one_hot(2, 3, (2, 2), "uint8").tolist() == [[[0, 0], [0, 0]], [[0, 0], [0, 0]], [[255, 255], [255, 255]]]


def _run(tmp_path: Path, probabilities: object, name: str) -> zarr.Group:
    image = np.random.default_rng(4).integers(0, 200, (96, 128), dtype=np.uint8)
    image[:40, :40] = 7  # block (0, 0) and its context uniform: skipped, written as class 2
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    doc = {
        "input": {"path": "img.tif"},
        "model": {"arch": "custom", "factory": "tests.helpers:SlowBoxFilter", "num_classes": 3, "halo": 2,
                  "normalize": {"mean": 100, "std": 50}, "kwargs": {"radius": 2, "weight": WEIGHT}},
        "tiling": {"tile": 32, "skip": {"uniform": True, "label": 2}},
        "output": {"path": f"{name}.zarr", "probabilities": probabilities},
        "cluster": {"n_workers": 1},
    }  # fmt: skip
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [PIPELINE, "run", str(tmp_path / f"{name}.yaml")], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_stored_probabilities_are_the_softmax_of_the_whole_image_logits(tmp_path, dtype) -> None:
    volume = _run(tmp_path, True if dtype == "uint8" else dtype, "with")
    image = tifffile.imread(tmp_path / "img.tif")
    x = ((image.astype(np.float32) - 100) / 50).astype(np.float64)  # normalised as the run does
    padded = np.pad(x, 2, mode="reflect")
    box = np.lib.stride_tricks.sliding_window_view(padded, (5, 5)).sum(axis=(-1, -2))
    logits = np.einsum("k,hw->khw", np.array(WEIGHT, np.float64)[:, 0], box)  # the whole image at once
    expected = softmax(logits)
    expected[:, :32, :32] = one_hot(2, 3, (32, 32), "float16")  # the skipped block: certain
    stored = volume["probabilities"][:]
    assert stored.dtype == np.dtype(dtype) and stored.shape == (3, 96, 128)
    scale = 255 if dtype == "uint8" else 1
    # Within the storage's rounding (summation order differs from the network's prefix sums).
    np.testing.assert_allclose(stored.astype(np.float64) / scale, expected, atol=(0.5 + 1e-3) / 255 if scale > 1 else 1e-3)
    assert volume.attrs["probabilities"]["classes"] == ["class 0", "class 1", "class 2"]
    without = _run(tmp_path, False, "without")
    np.testing.assert_array_equal(volume["0"][:], without["0"][:])  # the labels do not change
    assert "probabilities" not in without


def test_open_probabilities_gives_classes_and_the_labels_coordinates(tmp_path) -> None:
    import pipeline

    _run(tmp_path, "uint8", "with")
    found = pipeline.open_probabilities(tmp_path / "with.zarr")
    labels = pipeline.open_labels(tmp_path / "with.zarr")
    assert found.dims == ("c", "y", "x") and list(found.coords["c"].values) == ["class 0", "class 1", "class 2"]
    np.testing.assert_array_equal(found.coords["x"], labels.coords["x"])
    np.testing.assert_allclose(found.sum("c").values, 1.0, atol=2 / 255)
    _run(tmp_path, False, "without")
    with pytest.raises(ValueError, match="holds no array 'probabilities'"):
        pipeline.open_probabilities(tmp_path / "without.zarr")
