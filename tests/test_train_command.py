"""`pipeline train` refuses bad training workflows and data with one clear line (file or
field, what was expected), exit status 2, and no checkpoint written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from pipeline.cli import main
from pipeline.train_command import in_reading_order

MODEL = {"arch": "unet", "depth": 1, "width": 4, "num_classes": 2, "normalize": {"mean": 128.0, "std": 64.0}}


@pytest.fixture
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    for kind in ("images", "labels"):
        (tmp_path / kind).mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "labels" / "a.tif", rng.integers(0, 2, (40, 48), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "images" / "b.tif", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "labels" / "b.tif", rng.integers(0, 2, (40, 48), dtype=np.uint8))
    return tmp_path


def workflow(folder: Path, model: dict | None = None, **train) -> str:
    doc = {
        "model": model or MODEL,
        "train": {"data": {"images": "images", "labels": "labels"}, "patch": 16, "epochs": 1, "steps_per_epoch": 1,
                  "output": "m.safetensors", "threads": 1, **train},
    }  # fmt: skip
    (folder / "train.yaml").write_text(yaml.safe_dump(doc))
    return str(folder / "train.yaml")


def refused(capsys, folder: Path, path: str, *expected: str) -> str:
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    for text in expected:
        assert text in err, err
    assert not (folder / "m.safetensors").exists() and not (folder / "m.json").exists()
    return err


def test_a_network_that_cannot_be_trained(folder, capsys) -> None:
    (folder / "net.pt").write_bytes(b"not a model")
    path = workflow(folder, {"arch": "torchscript", "path": "net.pt", "num_classes": 2, "halo": 4})
    refused(capsys, folder, path, "model.arch: torchscript cannot be trained", "unet, dilated")


def test_a_constant_image_cannot_be_zscored(folder, capsys) -> None:
    tifffile.imwrite(folder / "images" / "b.tif", np.full((40, 48), 7, np.uint8))
    path = workflow(folder, {**MODEL, "normalize": {"zscore": True}})
    refused(capsys, folder, path, "model.normalize.zscore: channel 0 of", "b.tif", "is constant")


def test_an_existing_checkpoint_is_kept_unless_asked(folder, capsys) -> None:
    (folder / "m.safetensors").write_bytes(b"kept")
    assert main(["train", workflow(folder)]) == 2
    err = capsys.readouterr().err
    assert "train.output" in err and "train.overwrite: true" in err and "--resume" in err
    assert (folder / "m.safetensors").read_bytes() == b"kept"


def test_an_image_without_labels(folder, capsys) -> None:
    (folder / "labels" / "b.tif").unlink()
    refused(capsys, folder, workflow(folder), "train.data.labels: no label image for 'b'")


def test_images_matching_nothing(folder, capsys) -> None:
    path = workflow(folder, data={"images": "nowhere/*.tif", "labels": "labels"})
    refused(capsys, folder, path, "train.data.images", "nowhere")


def test_labels_of_another_shape(folder, capsys) -> None:
    tifffile.imwrite(folder / "labels" / "b.tif", np.zeros((40, 40), np.uint8))
    refused(capsys, folder, workflow(folder), "train.data.labels", "b.tif", "shape (40, 40)", "(40, 48)")


def test_class_ids_beyond_the_model(folder, capsys) -> None:
    tifffile.imwrite(folder / "labels" / "a.tif", np.full((40, 48), 3, np.uint8))
    refused(capsys, folder, workflow(folder), "train.data.labels", "a.tif", "class ids 3", "expected 0..1")


def test_images_with_other_channels_than_the_model(folder, capsys) -> None:
    path = workflow(folder, {**MODEL, "in_channels": 3, "normalize": {"mean": 128.0, "std": 64.0}})
    refused(capsys, folder, path, "train.data.images", "a.tif", "1 channel(s); model.in_channels is 3")


def test_patches_larger_than_an_image(folder, capsys) -> None:
    err = refused(capsys, folder, workflow(folder, patch=64), "train.patch: 64", "'a' (40 x 48 px)", "lower train.patch")
    assert "train      unet" not in err, "refused before the run is announced"


def test_training_names_are_listed_in_reading_order() -> None:
    names = ["10", "2", "slice_b10", "1", "slice_b2", "slice_a"]
    assert in_reading_order(names) == ["1", "2", "10", "slice_a", "slice_b2", "slice_b10"]
