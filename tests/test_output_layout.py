"""output.chunk and output.shard: checked against the blocks at validate, described by plan."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr

from pipeline.config import parse_workflow
from pipeline.errors import PipelineError
from pipeline.planning import describe_plan, prepare, storage_rules

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def _workflow(tmp_path, **output):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((128, 96), np.uint8))
    raw = {
        "input": {"path": "img.tif"},
        "model": {"arch": "unet", "depth": 2, "width": 2, "num_classes": 2},
        "tiling": {"tile": 64},
        "output": {"path": "o.zarr", **output},
    }
    return parse_workflow(raw, source=tmp_path / "w.yaml")


def test_a_chunk_that_does_not_divide_the_block_is_refused_with_a_divisor(tmp_path) -> None:
    with pytest.raises(PipelineError, match=r"output.chunk: 48 does not divide the blocks of 64 x 64 px; expected a divisor of the block edge \(e.g. 32\)"):
        prepare(_workflow(tmp_path, chunk=48))


@pytest.mark.parametrize(
    ("output", "described"),
    [
        ({}, "chunks 64 x 64, one per block"),
        ({"chunk": 16}, "chunks 16 x 16, 16 per block of 64 x 64"),
        ({"chunk": 16, "shard": True}, "chunks 16 x 16, in one shard per block of 64 x 64"),
    ],
)
def test_plan_says_how_the_labels_are_stored(tmp_path, output, described) -> None:
    assert f"(uint8, {described})" in describe_plan(prepare(_workflow(tmp_path, **output)))


def test_a_run_with_smaller_chunks_writes_whole_chunks_and_the_same_labels(tmp_path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (128, 96), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    labels = {}
    for name, output in (("blocks", {}), ("chunks", {"chunk": 16})):
        raw = {
            "input": {"path": "img.tif"},
            "model": {"arch": "unet", "depth": 2, "width": 2, "num_classes": 2, "normalize": {"mean": 120, "std": 40}},
            "tiling": {"tile": 64},
            "output": {"path": f"{name}.zarr", **output},
            "cluster": {"n_workers": 1, "threads_per_worker": 1},
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        proc = subprocess.run(
            [PIPELINE, "run", str(tmp_path / f"{name}.yaml")], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        labels[name] = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")["0"]
    assert labels["chunks"].chunks == (16, 16) and labels["blocks"].chunks == (64, 64)
    np.testing.assert_array_equal(labels["chunks"][:], labels["blocks"][:])


def test_storage_rules_cover_every_path_and_a_bioimageio_model_folder(tmp_path) -> None:
    raw = {
        "storage_options": {"endpoint_url": "https://s3.example.org"},
        "input": {"path": "s3://in/img.tif", "storage_options": {"anon": True}},
        "model": {"arch": "bioimageio", "path": "s3://models/m/rdf.yaml", "num_classes": 2,
                  "storage_options": {"profile": "zoo"}},
        "output": {"path": "s3://out/o.zarr", "storage_options": {"profile": "lab"}},
        "evaluation": {"ground_truth": "s3://in/truth.tif"},
    }  # fmt: skip
    rules = storage_rules(parse_workflow(raw))
    assert rules.options_for("s3://in/img.tif") == {"endpoint_url": "https://s3.example.org", "anon": True}
    assert rules.options_for("s3://models/m/weights.pt")["profile"] == "zoo"  # beside the rdf
    for written in ("s3://out/o.zarr/0/c/0/0", "s3://out/o.run.json", "s3://out/o.evaluation.json", "s3://out/.o.zarr.lock"):
        assert rules.options_for(written)["profile"] == "lab"
    assert rules.options_for("s3://in/truth.tif") == {"endpoint_url": "https://s3.example.org"}
