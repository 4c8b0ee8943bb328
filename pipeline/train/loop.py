"""The training loop: patches, augmentation, loss, optimiser, validation, checkpoints.

Every random draw comes from one NumPy generator and torch's generator, both seeded by
``train.seed`` and saved with the last state after each epoch: a run resumed from there
continues exactly as the uninterrupted run would have. Validation predicts each held-out
image whole, tiled exactly as ``pipeline run`` tiles it (:func:`inference.predict_image`),
and scores it with the evaluation's confusion matrices; the best epoch's weights are the
checkpoint. With ``train.average`` those weights are an exponential moving average of every
step's (torch's ``AveragedModel``, batch-norm statistics included), saved with the state.
"""

from __future__ import annotations

import copy
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import torch
from scipy import ndimage
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import NormalizeConfig, TrainConfig
from ..errors import PipelineError
from ..inference import normalise, predict_image
from ..io import fs
from ..metrics import confusion_matrix, scores_from_confusion
from ..progress import format_seconds
from ..tiling import NetworkGeometry, plan_tiles
from .augmentation import deform, jitter_intensity, random_deformation, random_orientation
from .losses import loss as loss_of
from .patches import PatchGeometry, legal_patch, random_patch, read_patch
from .weight_map import class_balance, separation_weights

IGNORE = -100  # the loss's ignore value for pixels not counted


@dataclass
class Sample:
    """One image in memory: ``image`` (C, *shape) float32 raw, ``labels`` int64 with IGNORE;
    ``normalize``: the image's own (zscore or percentiles resolved) normalisation, None: the model's."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    separation: np.ndarray | None = None
    normalize: NormalizeConfig | None = None


@dataclass
class History:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best: float = -math.inf
    best_epoch: int = 0


def train(
    module: torch.nn.Module,
    geometry: NetworkGeometry,
    num_classes: int,
    normalize: NormalizeConfig,
    cfg: TrainConfig,
    samples: list[Sample],
    validation: list[Sample],
    save: Callable[[torch.nn.Module, dict[str, Any]], None],
    state_path: str,
    resume: bool = False,
    out: TextIO = sys.stderr,
) -> History:
    """Fit ``module``; ``save(module, figures)`` writes the checkpoint of a new best epoch."""
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    module.to(device)
    patch = training_patch(geometry, cfg.patch, samples)
    counted = np.concatenate([s.labels[s.labels != IGNORE].ravel() for s in samples])
    class_weights = class_balance(counted, num_classes) if cfg.class_balance else np.ones(num_classes)
    if cfg.border_weight is not None:
        for s in samples:
            if s.separation is None:
                objects, _ = ndimage.label(np.isin(s.labels, cfg.border_weight.classes))
                s.separation = separation_weights(objects, cfg.border_weight.w0, cfg.border_weight.sigma)
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(module.parameters(), lr=cfg.learning_rate)
    else:
        optimizer = torch.optim.SGD(module.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum)
    total = cfg.epochs * cfg.steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 0.5 * (1 + math.cos(math.pi * step / total))) if cfg.schedule == "cosine" else (lambda step: 1.0)
    )
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    averaged = (
        AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(cfg.average), use_buffers=True)
        if cfg.average is not None
        else None
    )
    scored = module if averaged is None else averaged.module  # what is validated and saved
    history, first_epoch = History(), 0
    if resume and fs.is_file(state_path):
        first_epoch, history = _restore(state_path, module, optimizer, schedule, rng, averaged)
        print(f"resume     from epoch {first_epoch} of {cfg.epochs} ({fs.redact(state_path)})", file=out, flush=True)
    areas = np.array([s.labels.size for s in samples], np.float64)
    start, limit = time.perf_counter(), _seconds(cfg.time_limit)
    for epoch in range(first_epoch, cfg.epochs):
        module.train()
        losses = []
        for step in range(cfg.steps_per_epoch):
            batch = [_sample(samples, areas, patch, normalize, class_weights, cfg, rng) for _ in range(cfg.batch_size)]
            x = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
            y = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
            w = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision):
                logits = module(x)
            value = loss_of(cfg.loss, logits.float(), y, w, IGNORE)
            value.backward()
            optimizer.step()
            schedule.step()
            if averaged is not None:
                averaged.update_parameters(module)
            losses.append(float(value.detach()))
            if step % 10 == 9 or step == cfg.steps_per_epoch - 1:
                _progress(out, epoch, step, cfg, float(np.mean(losses)), history, start, first_epoch)
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - start, 1)}
        out_of_time = limit is not None and time.perf_counter() - start > limit
        validated = bool(validation) and (
            (epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs or out_of_time
        )
        kept = None
        if validated:
            kept = stored_weights(scored)  # what a checkpoint holds (float16) is what is scored
            began = time.perf_counter()
            record.update(validate(kept, geometry, num_classes, normalize, validation, device))
            record["validation_seconds"] = round(time.perf_counter() - began, 1)
        history.epochs.append(record)
        score = record.get("mean_iou", -float(record["loss"]))
        if (validated or not validation) and score > history.best:
            history.best, history.best_epoch = score, epoch + 1
            save((stored_weights(scored) if kept is None else kept).to("cpu"), {"best_epoch": epoch + 1, **record})
        _save_state(state_path, module, optimizer, schedule, rng, epoch + 1, history, averaged)
        _progress(out, epoch, cfg.steps_per_epoch - 1, cfg, record["loss"], history, start, first_epoch, end=True)
        if out_of_time:
            print(f"stopped    time limit {cfg.time_limit} reached after epoch {epoch + 1}", file=out, flush=True)
            break
    return history


def training_patch(geometry: NetworkGeometry, edge: int, samples: list[Sample]) -> PatchGeometry:
    """The legal patch for ``train.patch``; refused when its output exceeds a training image."""
    patch = PatchGeometry(legal_patch(geometry, edge), geometry.trim)
    small = [s for s in samples if any(n < patch.out for n in s.labels.shape)]
    if small:
        raise PipelineError(
            f"train.patch: {edge} gives {patch.read}-px patches with a {patch.out}-px output, larger than "
            f"training image {small[0].name!r} ({' x '.join(map(str, small[0].labels.shape))} px); expected every "
            f"training image at least {patch.out} px along each axis: lower train.patch"
        )
    return patch


def stored_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with its floating-point weights rounded to float16, as a
    checkpoint stores them (half the size; the figures recorded are those of this copy)."""
    kept = copy.deepcopy(module).to("cpu")
    with torch.no_grad():
        for tensor in list(kept.parameters()) + list(kept.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return kept


def validate(
    module: torch.nn.Module,
    geometry: NetworkGeometry,
    num_classes: int,
    normalize: NormalizeConfig,
    samples: list[Sample],
    device: torch.device,
) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of whole-image tiled predictions."""
    module.eval()
    cm = np.zeros((num_classes, num_classes), np.int64)
    with torch.no_grad():
        for s in samples:
            plan = plan_tiles(s.labels.shape, geometry, tile=_tile(geometry, s.labels.shape), mirror="reflect")
            pred = predict_image(s.image, module.to(device), plan, s.normalize or normalize)
            cm += confusion_matrix(s.labels, pred, num_classes, ignore_index=IGNORE)
    scores = scores_from_confusion(cm)
    return {
        "mean_iou": float(scores.mean_iou),
        "pixel_accuracy": float(scores.pixel_accuracy),
        "per_class_iou": [None if math.isnan(v) else float(v) for v in scores.iou],
    }


def _tile(geometry: NetworkGeometry, shape: tuple[int, ...]) -> int:
    edge = min(512, max(shape))
    return max(geometry.tile_multiple, edge - edge % geometry.tile_multiple)


def _sample(
    samples: list[Sample], areas: np.ndarray, patch: PatchGeometry, normalize: NormalizeConfig,
    class_weights: np.ndarray, cfg: TrainConfig, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    s = samples[int(rng.choice(len(samples), p=areas / areas.sum()))]
    out_box, read_box = random_patch(s.labels.shape, patch, rng)
    image = normalise(read_patch(s.image, read_box), s.normalize or normalize).astype(np.float32)
    labels = read_patch(s.labels, read_box)
    weights = np.where(labels == IGNORE, 0.0, class_weights[np.clip(labels, 0, None)])
    if s.separation is not None:
        weights = weights + np.where(labels == IGNORE, 0.0, read_patch(s.separation, read_box))
    aug = cfg.augment
    if aug.elastic is not None and aug.elastic.sigma > 0:
        field_ = random_deformation(labels.shape, rng, aug.elastic.grid, aug.elastic.sigma)
        image = deform(image, field_, 1)
        labels, weights = deform(labels, field_, 0), deform(weights, field_, 0)
    if aug.flips or aug.rotations:
        turn = random_orientation(rng, square=aug.rotations)
        if not aug.flips:
            turn = type(turn)(False, False, turn.turns)
        image, labels, weights = turn.apply(image), turn.apply(labels), turn.apply(weights)
    if aug.intensity:
        image = jitter_intensity(image, rng, aug.intensity, aug.intensity)
    t = patch.trim
    crop = (slice(t, t + patch.out),) * labels.ndim
    return image.astype(np.float32), labels[crop].astype(np.int64), weights[crop].astype(np.float32)


def _progress(
    out: TextIO, epoch: int, step: int, cfg: TrainConfig, loss: float, history: History, start: float,
    first_epoch: int, end: bool = False,
) -> None:  # fmt: skip
    done = (epoch - first_epoch) * cfg.steps_per_epoch + step + 1
    todo = (cfg.epochs - first_epoch) * cfg.steps_per_epoch
    elapsed = time.perf_counter() - start
    validations = [e["validation_seconds"] for e in history.epochs[first_epoch:] if "validation_seconds" in e]
    stepping = elapsed - sum(validations)
    coming = sum(1 for e in range(epoch + 1 + int(end), cfg.epochs + 1) if e % cfg.validate_every == 0 or e == cfg.epochs)
    left = stepping / done * (todo - done) + (float(np.mean(validations)) if validations else 0.0) * coming
    last = history.epochs[-1] if history.epochs and end else None
    val = f" | val mIoU {100 * last['mean_iou']:.1f}%" if last and "mean_iou" in last else ""
    print(
        f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{cfg.steps_per_epoch} | loss {loss:.4f}{val} | "
        f"elapsed {format_seconds(elapsed)} | left {format_seconds(left)}",
        file=out, flush=True,
    )  # fmt: skip


def _save_state(
    path: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, rng: np.random.Generator,
    epoch: int, history: History, averaged: AveragedModel | None = None,
) -> None:  # fmt: skip
    """Everything a resumed run needs to continue as this one would have (plain tensors and
    numbers: loaded with ``weights_only``, no code runs)."""
    state = {
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "epoch": epoch,
        "history": json.dumps({"epochs": history.epochs, "best": history.best, "best_epoch": history.best_epoch}),
    }
    if averaged is not None:
        state["averaged"] = averaged.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs.put_bytes(path, buffer.getvalue())


def _restore(
    path: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, rng: np.random.Generator,
    averaged: AveragedModel | None = None,
) -> tuple[int, History]:  # fmt: skip
    state = torch.load(io.BytesIO(fs.read_bytes(path)), map_location="cpu", weights_only=True)
    module.load_state_dict(state["model"])
    if averaged is not None and "averaged" in state:  # else averaging starts from the restored weights
        averaged.load_state_dict(state["averaged"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    saved = json.loads(state["history"])
    return int(state["epoch"]), History(saved["epochs"], float(saved["best"]), int(saved["best_epoch"]))


def _seconds(duration: str | None) -> float | None:
    if duration is None:
        return None
    from dask.utils import parse_timedelta

    return float(parse_timedelta(duration))


__all__ = ["IGNORE", "Sample", "History", "train", "validate"]
