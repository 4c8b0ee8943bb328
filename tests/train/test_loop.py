"""Training: the loss falls on a tiny problem, a resumed run continues exactly, and a
checkpoint from `pipeline train` reproduces its recorded validation figures in `pipeline run`."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
import zarr
from scipy import ndimage

from pipeline.config import TrainConfig, UNetConfig
from pipeline.models.loading import load_model
from pipeline.train import loop
from pipeline.train.loop import Sample, train
from tests.helpers import run_pipeline

MODEL = {"arch": "unet", "depth": 1, "width": 4, "num_classes": 2, "normalize": {"mean": 128.0, "std": 64.0}}


def blobs(seed: int, shape: tuple[int, int] = (96, 96)) -> Sample:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), 3)
    labels = (field > np.median(field)).astype(np.int64)
    image = (labels * 120 + 60 + rng.normal(0, 20, shape)).astype(np.float32)[None]
    return Sample(f"s{seed}", image, labels)


def config(tmp_path, **changes) -> TrainConfig:
    base = {"data": {"images": "x", "labels": "y"}, "patch": 32, "batch_size": 2, "epochs": 3, "steps_per_epoch": 6,
            "learning_rate": 0.01, "output": str(tmp_path / "m.safetensors"), "augment": {"elastic": {"sigma": 3}}}  # fmt: skip
    return TrainConfig.model_validate({**base, **changes})


def fresh_model():
    loaded = load_model(UNetConfig.model_validate(MODEL), with_digest=False)
    return loaded.module, loaded.geometry


def run_checkpoint(tmp_path, weights: str, name: str, tile: int) -> dict:
    """`pipeline run` of val/images/<name> with `model: {path: weights}` alone, scored against
    val/labels/<name>: the evaluation report."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "input": {"path": f"val/images/{name}"},
        "model": {"path": weights},
        "tiling": {"tile": tile},
        "inference": {"torch_threads": 1, "channels_last": False},
        "output": {"path": "out/a.zarr"},
        "evaluation": {"ground_truth": f"val/labels/{name}"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }))  # fmt: skip
    ran = run_pipeline("run", str(tmp_path / "run.yaml"), cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    return json.loads((tmp_path / "out" / "a.evaluation.json").read_text())


@pytest.mark.parametrize(
    "changes", [{}, {"mixed_precision": True}, {"average": 0.9}], ids=["float32", "bfloat16", "averaged"]
)
def test_a_few_steps_reduce_the_loss(tmp_path, changes) -> None:
    module, geometry = fresh_model()
    cfg = config(tmp_path, **changes)
    saved = []
    history = train(module, geometry, 2, UNetConfig.model_validate(MODEL).normalize, cfg, [blobs(1), blobs(2)], [blobs(3)],
                    lambda m, f: saved.append(f), str(tmp_path / "state.pt"))  # fmt: skip
    losses = [e["loss"] for e in history.epochs]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert saved and saved[-1]["best_epoch"] == history.best_epoch and "mean_iou" in saved[-1]


def test_validation_every_nth_epoch_and_after_the_last(tmp_path) -> None:
    module, geometry = fresh_model()
    cfg = config(tmp_path, epochs=5, steps_per_epoch=2, validate_every=2)
    saved = []
    history = train(module, geometry, 2, UNetConfig.model_validate(MODEL).normalize, cfg, [blobs(1)], [blobs(3)],
                    lambda m, f: saved.append(f), str(tmp_path / "state.pt"))  # fmt: skip
    assert ["mean_iou" in e for e in history.epochs] == [False, True, False, True, True]
    assert history.best_epoch in (2, 4, 5) and all(f["best_epoch"] in (2, 4, 5) for f in saved)


@pytest.mark.parametrize("average", [None, 0.9], ids=["last-weights", "averaged-weights"])
def test_resuming_continues_exactly_as_the_uninterrupted_run(tmp_path, monkeypatch, average) -> None:
    normalize = UNetConfig.model_validate(MODEL).normalize
    cfg = config(tmp_path, epochs=2, steps_per_epoch=4, average=average)
    samples = [blobs(4), blobs(5)]
    kept = tmp_path / "after-epoch-1.pt"
    original = loop._save_state

    def keep_first(path, module, optimizer, schedule, rng, epoch, history, averaged=None):
        original(path, module, optimizer, schedule, rng, epoch, history, averaged)
        if epoch == 1:
            shutil.copy(path, kept)

    monkeypatch.setattr(loop, "_save_state", keep_first)
    whole, geometry = fresh_model()
    train(whole, geometry, 2, normalize, cfg, samples, [], lambda m, f: None, str(tmp_path / "a.pt"))
    monkeypatch.setattr(loop, "_save_state", original)
    resumed, _ = fresh_model()
    history = train(resumed, geometry, 2, normalize, cfg, samples, [], lambda m, f: None, str(kept), resume=True)
    assert [e["epoch"] for e in history.epochs] == [1, 2]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    ends = [torch.load(tmp_path / p, weights_only=True) for p in ("a.pt", "after-epoch-1.pt")]
    assert ("averaged" in ends[0]) == (average is not None)
    if average is not None:
        for (name, a), (_, b) in zip(ends[0]["averaged"].items(), ends[1]["averaged"].items()):
            assert torch.equal(a, b), name


def test_averaging_switched_on_at_a_resume_starts_from_the_restored_weights(tmp_path) -> None:
    """A state saved without ``average`` holds no average: the resumed run's average begins
    with its first step's weights, as a fresh run's does."""
    normalize = UNetConfig.model_validate(MODEL).normalize
    module, geometry = fresh_model()
    state = str(tmp_path / "state.pt")
    train(module, geometry, 2, normalize, config(tmp_path, epochs=1, steps_per_epoch=2), [blobs(4)], [],
          lambda m, f: None, state)  # fmt: skip
    resumed, _ = fresh_model()
    history = train(resumed, geometry, 2, normalize, config(tmp_path, epochs=2, steps_per_epoch=2, average=0.9),
                    [blobs(4)], [], lambda m, f: None, state, resume=True)  # fmt: skip
    assert [e["epoch"] for e in history.epochs] == [1, 2]
    averaged = torch.load(state, weights_only=True)["averaged"]
    assert int(averaged["n_averaged"]) == 2


def test_the_averaged_weights_are_the_exponential_moving_average_of_every_step(tmp_path) -> None:
    """The checkpoint of a run with ``average: d`` holds w_1 after the first step, then
    d * previous + (1 - d) * w_k after step k (float16, as checkpoints store weights),
    computed here from snapshots of the weights after every optimiser step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    module, geometry = fresh_model()
    d = 0.7
    cfg = config(tmp_path, epochs=1, steps_per_epoch=5, average=d)
    snapshots = []
    hook = register_optimizer_step_post_hook(lambda *_: snapshots.append(copy.deepcopy(module.state_dict())))
    saved = []
    try:
        train(module, geometry, 2, UNetConfig.model_validate(MODEL).normalize, cfg, [blobs(6)], [],
              lambda m, f: saved.append(m), str(tmp_path / "state.pt"))  # fmt: skip
    finally:
        hook.remove()
    assert len(snapshots) == 5 and len(saved) == 1
    checkpoint = saved[0].state_dict()
    for name, value in checkpoint.items():
        if not value.is_floating_point():
            continue
        expected = snapshots[0][name].double()
        for later in snapshots[1:]:
            expected = d * expected + (1 - d) * later[name].double()
        assert torch.allclose(value.double(), expected.half().double(), rtol=2e-3, atol=1e-6), name
    last = snapshots[-1]
    assert any(not torch.equal(checkpoint[n], last[n].half().float()) for n in checkpoint if last[n].is_floating_point())


def test_a_trained_checkpoint_reproduces_its_validation_figures_in_pipeline_run(tmp_path) -> None:
    import tifffile

    for folder, seed in (("train", 7), ("val", 8)):
        for kind in ("images", "labels"):
            (tmp_path / folder / kind).mkdir(parents=True)
        s = blobs(seed, (120, 136))
        tifffile.imwrite(tmp_path / folder / "images" / "a.tif", s.image[0].clip(0, 255).astype(np.uint8))
        tifffile.imwrite(tmp_path / folder / "labels" / "a.tif", s.labels.astype(np.uint8))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "model": MODEL,
        "train": {"data": {"images": "train/images", "labels": "train/labels"},
                  "validation": {"images": "val/images", "labels": "val/labels"},
                  "classes": [{"name": "background"}, {"name": "blob"}],
                  "patch": 32, "batch_size": 2, "epochs": 2, "steps_per_epoch": 5, "learning_rate": 0.01,
                  "output": "models/blobs.safetensors", "threads": 1},
    }))  # fmt: skip
    trained = run_pipeline("train", str(tmp_path / "train.yaml"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "val mIoU" in trained.stderr and "checkpoint" in trained.stdout
    recorded = json.loads((tmp_path / "models" / "blobs.json").read_text())
    figures = recorded["training"]["figures"]
    assert recorded["classes"][1]["name"] == "blob" and recorded["training"]["data"]["validation"] == ["a"]
    report = run_checkpoint(tmp_path, "models/blobs.safetensors", "a.tif", tile=48)
    assert report["pooled"]["mean_iou"] == pytest.approx(figures["mean_iou"], abs=1e-9)
    assert report["pooled"]["pixel_accuracy"] == pytest.approx(figures["pixel_accuracy"], abs=1e-9)


@pytest.mark.parametrize(
    "model, train_changes, shape, suffix",
    [
        pytest.param(
            {**MODEL, "dims": 3, "normalize": {"percentiles": [1, 99]}},
            {"optimizer": "sgd", "momentum": 0.9, "schedule": "constant", "patch": 8,
             "border_weight": {"classes": [1], "w0": 10, "sigma": 2}, "average": 0.9},
            (10, 40, 44), ".tif", id="3d-unet-percentiles-sgd-border-weights-averaged-tiff",
        ),
        pytest.param(
            {"arch": "dilated", "front_width": 4, "front_depth": 1, "num_classes": 2, "normalize": {"zscore": True}},
            {"loss": "dice", "class_balance": False, "mixed_precision": True}, (72, 80), ".zarr",
            id="dilated-dice-bfloat16-zscore-zarr",
        ),
    ],
)  # fmt: skip
def test_every_trainable_network_trains_and_its_checkpoint_runs(tmp_path, model, train_changes, shape, suffix) -> None:
    """`pipeline train` then `pipeline run` from the checkpoint alone, for the networks and
    options the 2D U-Net test above does not take: the run reproduces the recorded figures."""
    import tifffile

    rng = np.random.default_rng(11)
    for folder in ("train", "val"):
        labels = (ndimage.gaussian_filter(rng.random(shape), 2) > 0.5).astype(np.uint8)
        image = (labels * 120 + 60 + rng.normal(0, 20, shape)).clip(0, 255).astype(np.uint8)
        for kind, data in (("images", image), ("labels", labels)):
            (tmp_path / folder / kind).mkdir(parents=True)
            if suffix == ".zarr":
                zarr.create_array(str(tmp_path / folder / kind / "a.zarr"), data=data, chunks=(32, 32))
            else:
                tifffile.imwrite(tmp_path / folder / kind / "a.tif", data, metadata={"axes": "ZYX"[-len(shape):]})
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "model": model,
        "train": {"data": {"images": "train/images", "labels": "train/labels"},
                  "validation": {"images": "val/images", "labels": "val/labels"},
                  "patch": 32, "batch_size": 2, "epochs": 2, "steps_per_epoch": 3, "learning_rate": 0.01,
                  "output": "m.safetensors", "threads": 1, **train_changes},
    }))  # fmt: skip
    trained = run_pipeline("train", str(tmp_path / "train.yaml"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "val mIoU" in trained.stderr
    figures = json.loads((tmp_path / "m.json").read_text())["training"]["figures"]
    report = run_checkpoint(tmp_path, "m.safetensors", f"a{suffix}", tile=16 if len(shape) == 3 else 48)
    assert report["pooled"]["mean_iou"] == pytest.approx(figures["mean_iou"], abs=1e-9)


def test_time_left_counts_the_validations_still_to_come(tmp_path) -> None:
    import io
    import time

    cfg = config(tmp_path, epochs=4, steps_per_epoch=10, validate_every=2)
    history = loop.History([{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 1.0, "mean_iou": 0.5, "validation_seconds": 30.0}])
    out = io.StringIO()
    # 50 s so far: 30 s validating, 20 s for 20 steps; 20 steps (20 s) and one validation (30 s) to come
    loop._progress(out, 1, 9, cfg, 1.0, history, time.perf_counter() - 50.0, 0, end=True)
    assert "val mIoU 50.0%" in out.getvalue() and "left 0:50" in out.getvalue()
