"""Model files in a store, in every format that reads a file, through `pipeline run`.

A TorchScript file, a safetensors state dict of the built-in U-Net, and a bioimage.io
``rdf.yaml`` with its TorchScript weights beside it (sha256 checked) are put into S3 (moto);
each run's labels equal those of the same workflow with the local files.
"""

from __future__ import annotations

import hashlib
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
from safetensors.torch import save_file

from pipeline.config import UNetConfig
from pipeline.models.loading import load_model
from pipeline.models.unet import UNet
from tests.helpers import REPO
from tests.stores.conftest import S3Server, new_bucket, remove_bucket

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def _rdf(folder: Path) -> None:
    torch.jit.save(torch.jit.script(UNet(1, 2, depth=2, width=2).eval()), folder / "weights.pt")
    sha = hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest()
    rdf = {
        "type": "model", "format_version": "0.4.10", "name": "store model", "description": "test",
        "authors": [{"name": "T"}], "license": "MIT", "documentation": "README.md",
        "timestamp": "2026-01-01T00:00:00Z",
        "inputs": [{"name": "raw", "axes": "bcyx", "data_type": "float32",
                    "shape": {"min": [1, 1, 64, 64], "step": [0, 0, 4, 4]}}],
        "outputs": [{"name": "out", "axes": "bcyx", "data_type": "float32",
                     "shape": {"reference_tensor": "raw", "scale": [1, 0, 1, 1], "offset": [0, 1, 0, 0]},
                     "halo": [0, 0, 23, 23]}],
        "test_inputs": ["in.npy"], "test_outputs": ["out.npy"],
        "weights": {"torchscript": {"source": "weights.pt", "sha256": sha}},
    }  # fmt: skip
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))


def _model(kind: str, folder: Path) -> tuple[dict, list[str]]:
    """The workflow's model section (path relative to the model folder) and the files to upload."""
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(UNet(1, 2, depth=2, width=2).eval()), folder / "net.ts")
        return {"arch": "torchscript", "path": "net.ts", "num_classes": 2, "halo": 23, "shift_period": 4}, ["net.ts"]
    if kind == "safetensors":
        cfg = {"arch": "unet", "depth": 2, "width": 4, "num_classes": 2}
        save_file(load_model(UNetConfig.model_validate({**cfg, "seed": 3})).module.state_dict(), folder / "w.safetensors")
        return {**cfg, "path": "w.safetensors"}, ["w.safetensors"]
    _rdf(folder)
    return {"arch": "bioimageio", "path": "rdf.yaml", "num_classes": 2}, ["rdf.yaml", "weights.pt"]


@pytest.mark.parametrize("kind", ["torchscript", "safetensors", "bioimageio"])
def test_a_model_file_in_a_store_runs_like_the_local_file(kind: str, tmp_path, moto_s3: S3Server) -> None:
    models = tmp_path / "models"
    models.mkdir()
    model, files = _model(kind, models)
    tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(0).integers(0, 255, (96, 80), dtype=np.uint8))
    bucket = new_bucket(moto_s3)
    try:
        for name in files:
            moto_s3.filesystem().put_file(str(models / name), f"{bucket}/models/{name}")
        runs = {}
        for where, model_path in (("local", str(models / model["path"])), ("s3", f"s3://{bucket}/models/{model['path']}")):
            doc = {
                "input": {"path": "img.tif"},
                "model": {**model, "path": model_path, "normalize": {"mean": 120, "std": 40}},
                "tiling": {"tile": 64},
                "output": {"path": f"{where}.zarr"},
                "cluster": {"n_workers": 1, "threads_per_worker": 1},
                "storage_options": {"endpoint_url": moto_s3.endpoint_url, "key": moto_s3.key, "secret": moto_s3.secret},
            }
            if kind == "bioimageio":
                del doc["model"]["normalize"]
            (tmp_path / f"{where}.yaml").write_text(yaml.safe_dump(doc))
            proc = subprocess.run(
                [PIPELINE, "run", str(tmp_path / f"{where}.yaml")], capture_output=True, text=True, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            runs[where] = zarr.open_group(str(tmp_path / f"{where}.zarr"), mode="r")["0"][:]
        np.testing.assert_array_equal(runs["s3"], runs["local"])
    finally:
        remove_bucket(moto_s3, bucket)
