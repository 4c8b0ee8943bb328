"""A checkpoint (safetensors + description) runs in `pipeline run` from model.path alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

from pipeline.config import UNetConfig, parse_workflow
from pipeline.errors import WorkflowError
from pipeline.models.loading import build_module
from pipeline.train.checkpoints import save_checkpoint
from tests.helpers import run_pipeline

SECTION = {"arch": "unet", "depth": 2, "width": 4, "num_classes": 3, "in_channels": 1, "padding": "same",
           "normalize": {"mean": 100.0, "std": 50.0}}  # fmt: skip


def _checkpoint(tmp_path) -> str:
    torch.manual_seed(5)
    module = build_module(UNetConfig.model_validate(SECTION))
    with torch.no_grad():  # louder weights: an untrained net's logits would hardly depend on the image
        for p in module.parameters():
            p.mul_(4.0)
    weights = str(tmp_path / "models" / "tiny.safetensors")
    save_checkpoint(weights, module, SECTION, {"classes": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                                                 "training": {"data": "none", "figures": {}}})  # fmt: skip
    return weights


def test_a_model_section_of_only_a_path_is_completed_from_the_checkpoint(tmp_path) -> None:
    weights = _checkpoint(tmp_path)
    description = json.loads((tmp_path / "models" / "tiny.json").read_text())
    assert description["model"] == SECTION and description["format"] == "gigaseg-checkpoint"
    base = {"input": {"path": "img.tif"}, "output": {"path": "out.zarr"}}
    wf = parse_workflow({**base, "model": {"path": "models/tiny.safetensors"}}, source=str(tmp_path / "wf.yaml"))
    assert wf.model.arch == "unet" and wf.model.depth == 2 and wf.model.num_classes == 3 and wf.model.path == weights
    # a workflow may set its own normalisation, not another architecture
    wf = parse_workflow({**base, "model": {"path": weights, "normalize": {"zscore": True}}})
    assert wf.model.normalize.zscore
    with pytest.raises(WorkflowError, match=r"model.depth: 3, but the checkpoint .* was trained with 2; leave model.depth out"):
        parse_workflow({**base, "model": {"path": weights, "depth": 3}})


def test_pipeline_run_with_only_the_checkpoint_path_equals_the_full_section(tmp_path) -> None:
    weights = _checkpoint(tmp_path)
    yy, xx = np.mgrid[:96, :80]
    image = ((np.sin(yy / 5.0) * np.cos(xx / 7.0) + 1) * 120).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    for name, model in (("short", {"path": "models/tiny.safetensors"}), ("full", {**SECTION, "path": weights})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "input": {"path": "img.tif"}, "model": model, "tiling": {"tile": 32},
            "inference": {"torch_threads": 1, "channels_last": False},
            "output": {"path": f"{name}.zarr"}, "cluster": {"n_workers": 1, "threads_per_worker": 1},
        }))  # fmt: skip
        proc = run_pipeline("run", str(tmp_path / f"{name}.yaml"), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    short = zarr.open_group(str(tmp_path / "short.zarr"), mode="r")["0"][:]
    full = zarr.open_group(str(tmp_path / "full.zarr"), mode="r")["0"][:]
    assert np.array_equal(short, full) and len(np.unique(short)) > 1


def test_the_training_line_names_a_few_images_and_counts_many(tmp_path) -> None:
    from pipeline.io.checkpoints import describe_training

    weights = _checkpoint(tmp_path)
    assert describe_training(weights) == "tiny.safetensors: trained by pipeline train on ?"  # data not a listing
    path = tmp_path / "models" / "tiny.json"
    description = json.loads(path.read_text())
    description["training"] = {
        "data": {"images": [f"Tile {t}/part {p}" for t in (1, 2, 3) for p in (1, 2)], "validation": ["a", "b"]},
        "figures": {"mean_iou": 0.6114, "best_epoch": 35},
    }
    path.write_text(json.dumps(description))
    assert describe_training(weights) == (
        "tiny.safetensors: trained by pipeline train on 6 images (Tile 1/part 1, ..., Tile 3/part 2); "
        "held-out a, b: mIoU 61.1% (epoch 35)"
    )
