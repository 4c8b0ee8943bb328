"""A CPU worker runs at most its compute slots' forward passes at once, with a thread more
that reads and writes; the run measures the split of cores and says what it chose."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
import yaml

from pipeline.cli import main
from tests.helpers import box_filter_reference, most_at_once

CORES = len(os.sched_getaffinity(0))


def _run(tmp_path, inference: dict) -> tuple[list[tuple[float, float]], dict]:
    image = np.random.default_rng(3).integers(0, 256, (128, 256), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    log = tmp_path / "passes.log"
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "img.tif"},
        "model": {"arch": "custom", "factory": "tests.helpers:ConcurrencyLog", "num_classes": 2, "halo": 2,
                  "kwargs": {"radius": 2, "weight": [[1], [-1]], "log": str(log)}},
        "tiling": {"tile": 32},
        "inference": {"channels_last": False, **inference},
        "output": {"path": "out/labels.zarr"},
    }))  # fmt: skip
    assert main(["run", str(tmp_path / "wf.yaml")]) == 0
    import zarr

    labels = zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["0"][:]
    expected = box_filter_reference(image[None], 2, np.array([[1], [-1]]), "reflect").argmax(0)
    np.testing.assert_array_equal(labels, expected)
    intervals = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    return intervals, json.loads((tmp_path / "out" / "labels.run.json").read_text())


def test_one_slot_when_each_pass_takes_every_core(tmp_path, capsys) -> None:
    intervals, run = _run(tmp_path, {"torch_threads": CORES})
    assert len(intervals) == 32  # one pass per block
    assert most_at_once(intervals) == 1
    assert run["runtime"]["slots"] == 1 and run["runtime"]["torch_threads"] == CORES
    assert run["cluster"]["threads"] == CORES + 1  # the other threads read and write meanwhile


@pytest.mark.skipif(CORES < 2, reason="one core: one slot")
def test_one_slot_per_core_with_one_torch_thread_each(tmp_path, capsys) -> None:
    intervals, run = _run(tmp_path, {"torch_threads": 1})
    assert most_at_once(intervals) == CORES  # never more, and the cores are used
    assert run["runtime"] == {
        "slots": CORES, "torch_threads": 1, "channels_last": False, "measured": [], "source": "configured",
    }  # fmt: skip
    assert "runtime    " in capsys.readouterr().out
