"""Predict one block: read box -> mirror -> normalise -> batch -> forward -> crop -> argmax.

:func:`predict_block` is the split/infer/merge core on in-memory arrays (used directly by
tests against whole-image inference); :func:`run_block` is the Dask task around it: it
opens the image and the model once per worker process, reads the block's own read box
from the source, and writes the block's labels as whole zarr chunks.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from .cluster.allocator import release_heap_above
from .config import InferenceConfig, ModelConfig, NormalizeConfig
from .errors import NonFiniteOutputError
from .geometry import Box
from .io import fs
from .io.images import ImageSpec, open_image
from .io.labels import mark_block_done, write_block, write_probabilities
from .mirror import read_mirrored
from .models.loading import load_model
from .nonfinite import apply_policy
from .probabilities import ProbabilityDtype, encode, one_hot, softmax
from .runtime import Runtime, choose_batch_size, forward, prepare_module
from .skipping import SkipRule, constant_labels
from .tiling import Block, TilePlan


@dataclass(frozen=True)
class InferenceSpec:
    """Everything a block task needs; small and picklable, shared by all tasks."""

    image: ImageSpec
    model: ModelConfig
    normalize: NormalizeConfig
    plan: TilePlan
    output_path: str
    run_id: str
    label_dtype: str
    inference: InferenceConfig = InferenceConfig()
    torch_threads: int | None = None
    fill_value: float | None = None  # None: NaN/infinite input pixels are an error
    skip: SkipRule | None = None  # tiling.skip: the rules checked on each read box, the skip class
    compute_slots: int | None = None  # forward passes a worker runs at once; None: one per thread
    release_above: int | None = None  # a worker's resident bytes beyond which its free heap is released
    probabilities: ProbabilityDtype | None = None  # also store per-class probabilities, so encoded


@dataclass(frozen=True)
class BlockResult:
    index: tuple[int, ...]
    pixels: int
    tiles: int
    seconds: float
    filled: int = 0  # non-finite input pixels of the write box that were filled
    skipped: bool = False  # written as tiling.skip.label without running the model


def share_spec(spec: InferenceSpec) -> InferenceSpec:
    """The task whose result every block task shares (recomputable, unlike scattered data)."""
    return spec


def run_block(index: tuple[int, ...], spec: InferenceSpec) -> BlockResult:
    """The Dask task for one output block. Idempotent: a rerun writes the same chunk."""
    start = time.perf_counter()
    fs.use_rules(spec.image.storage)  # the driver's storage options, for the image, model and output
    block = spec.plan.block(index)
    runtime = Runtime.from_config(spec.inference, worker_index())
    module = cached_module(spec.model, runtime, spec.torch_threads)
    use_torch_threads(spec.torch_threads)
    image = open_image(spec.image)
    raw = image.read_box(block.read, spec.plan.mirror)
    raw, filled = apply_policy(
        raw, block.read, spec.plan.image_shape, spec.fill_value, spec.image.path,
        counted=block.write, context=f", read for block {block.index}",
    )  # fmt: skip
    skipped = spec.skip is not None and spec.skip.skips(raw)  # tiling.skip: background, no model
    probabilities = None
    if spec.skip is not None and skipped:
        labels = constant_labels(block.write.shape, spec.skip.label, spec.label_dtype)
        if spec.probabilities:
            probabilities = one_hot(spec.skip.label, spec.model.num_classes, block.write.shape, spec.probabilities)
    else:
        x = normalise(raw, spec.normalize)
        try:
            with compute_slot(spec.compute_slots):  # the other threads read and write meanwhile
                if spec.probabilities:
                    logits = predict_block(x, block, spec.plan, module, runtime, output="logits")
                    labels = logits.argmax(axis=0)  # of the logits: first maximum, as torch's argmax
                    probabilities = encode(softmax(logits), spec.probabilities)
                else:
                    labels = predict_block(x, block, spec.plan, module, runtime, output="labels")
        except NonFiniteOutputError as exc:
            raise NonFiniteOutputError(f"model {model_label(spec.model)} {exc}") from None
    write_block(spec.output_path, spec.run_id, block.write, labels.astype(spec.label_dtype))
    if probabilities is not None:
        write_probabilities(spec.output_path, spec.run_id, block.write, probabilities)
    mark_block_done(spec.output_path, spec.run_id, block.index)  # only after the chunk is written
    release_heap_above(spec.release_above)  # holes that concurrent passes left in the heap
    seconds = time.perf_counter() - start
    return BlockResult(block.index, block.write.size, len(block.tiles), seconds, filled, skipped)


def model_label(cfg: ModelConfig) -> str:
    """How messages name a model: its file, its factory, or its built-in architecture."""
    return cfg.path or getattr(cfg, "factory", None) or f"{cfg.arch} (built in)"


def normalise(x: np.ndarray, cfg: NormalizeConfig) -> np.ndarray:
    """``(x - mean) / std`` in float32, per channel (axis 0) when lists are given.

    Statistics are fixed for the whole image: per-tile normalisation would make seams.
    """
    channels = x.shape[0]
    mean_value, std_value = cfg.scale()
    mean = _per_channel(mean_value, channels, x.ndim)
    std = _per_channel(std_value, channels, x.ndim)
    out = x.astype(np.float32, copy=True)
    out -= mean
    out /= std
    return out


def _per_channel(value: float | tuple[float, ...], channels: int, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 0:
        return arr
    if arr.shape[0] != channels:
        raise ValueError(f"{arr.shape[0]} normalisation values for {channels} channels")
    return arr.reshape((channels,) + (1,) * (ndim - 1))


def predict_block(
    x: np.ndarray,
    block: Block,
    plan: TilePlan,
    module: nn.Module,
    runtime: Runtime | None = None,
    output: Literal["labels", "logits"] = "labels",
) -> np.ndarray:
    """Predict ``block.write`` from ``x``, the normalised ``(C, *block.read.shape)`` input.

    Tiles of equal read shape go through the network together, one batch each. Each tile's
    output is cropped to its write box (clipped to the image): stitching is cropping.
    Returns labels ``(*block.write.shape)`` or fp32 logits ``(K, *block.write.shape)``.
    """
    runtime = runtime or Runtime()
    trims = plan.trims
    planes = plan.plane_axes
    result: np.ndarray | None = None
    groups: dict[tuple[int, ...], list] = defaultdict(list)
    for tile in block.tiles:
        groups[tile.read.shape].append(tile)
    for tiles in groups.values():
        batch = np.stack(
            [x[(slice(None),) + t.read.relative_to(block.read.offset).slices()] for t in tiles]
        )
        if planes:  # one plane per tile: the network sees (N, C, y, x), its planes batched
            batch = batch.reshape(batch.shape[:2] + batch.shape[2 + planes :])
        logits = forward(module, batch, runtime)
        if planes:
            logits = logits.reshape(logits.shape[:2] + (1,) * planes + logits.shape[2:])
        for tile, tile_logits in zip(tiles, logits):
            keep = tile.write.intersect(block.write)
            if keep.empty:
                continue
            out_origin = tuple(o + t for o, t in zip(tile.read.offset, trims))
            piece = tile_logits[(slice(None),) + keep.relative_to(out_origin).slices()]
            check_finite_logits(piece, keep, runtime)
            piece_np = (piece.argmax(dim=0) if output == "labels" else piece).cpu().numpy()
            if result is None:
                lead = piece_np.shape[: piece_np.ndim - block.write.ndim]
                result = np.zeros(lead + block.write.shape, dtype=piece_np.dtype)
            result[(Ellipsis,) + keep.relative_to(block.write.offset).slices()] = piece_np
    if result is None:
        raise ValueError(f"block {block.index} has no tiles inside the image")
    return result


def check_finite_logits(piece: torch.Tensor, keep: Box, runtime: Runtime) -> None:
    """NaN/infinite logits would make a quiet argmax of 0: they fail the block instead."""
    bad = ~torch.isfinite(piece).all(dim=0)
    if bool(bad.any()):
        where = ", ".join(f"{a}:{b}" for a, b in zip(keep.offset, keep.stop))
        hint = " (fp16 overflows above 65504: try precision bf16 or fp32)" if runtime.precision == "fp16" else ""
        raise NonFiniteOutputError(
            f"emitted {int(bad.sum())} NaN/infinite logits for pixels {where} from finite "
            f"inputs{hint}"
        )


def measure_batch_size(
    cfg: ModelConfig, inference: InferenceConfig, read_shape: tuple[int, ...], storage: fs.StorageRules | None = None
) -> int:
    """On a worker: tiles per forward pass that fit its device's free memory (1 on CPUs)."""
    if storage is not None:  # the run's storage options: a model file in a store
        fs.use_rules(storage)
    runtime = Runtime.from_config(inference, worker_index())
    module = cached_module(cfg, runtime, None)
    return choose_batch_size(module, runtime, read_shape, cfg.in_channels)


def worker_index() -> int | None:
    """This Dask worker's index (its name on a local cluster), or None outside a worker."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return None
    return name if isinstance(name, int) else None


_MODEL_LOCK = threading.Lock()
_MODULES: dict[tuple, nn.Module] = {}
_SLOTS: dict[int, threading.BoundedSemaphore] = {}


def compute_slot(slots: int | None) -> AbstractContextManager[object]:
    """Held while a block's tiles go through the network: at most ``slots`` forward passes
    run at once in this worker process, whatever its number of Dask threads, so a thread
    beyond them reads, decodes and normalises the next block or writes the last one while
    the others compute."""
    if slots is None:
        return nullcontext()
    with _MODEL_LOCK:
        return _SLOTS.setdefault(slots, threading.BoundedSemaphore(slots))


def use_torch_threads(threads: int | None) -> None:
    """The run's torch threads per forward pass (the worker's default until set)."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def cached_module(cfg: ModelConfig, runtime: Runtime, torch_threads: int | None) -> nn.Module:
    """Load the model once per worker process (threads share it; eval mode, no grad)."""
    version = fs.version_token(cfg.path) if cfg.path else None
    key = (cfg.model_dump_json(), runtime, version)
    with _MODEL_LOCK:
        if key not in _MODULES:
            if torch_threads:
                torch.set_num_threads(torch_threads)
            _MODULES.clear()  # one model per worker process at a time
            loaded = load_model(cfg, runtime.device, with_digest=False)
            _MODULES[key] = prepare_module(loaded.module, runtime)
        return _MODULES[key]


def predict_image(
    image: np.ndarray,
    module: nn.Module,
    plan: TilePlan,
    normalize: NormalizeConfig | None = None,
    output: Literal["labels", "logits"] = "labels",
    runtime: Runtime | None = None,
) -> np.ndarray:
    """Tiled prediction of an in-memory ``(C, *spatial)`` image, block by block.

    The same split/infer/merge as a run, without Dask or zarr: for small images, notebooks
    and as the reference that the distributed path is tested against.
    """
    if image.shape[1:] != plan.image_shape:
        raise ValueError(f"image of shape {image.shape} for a plan of {plan.image_shape}")
    result: np.ndarray | None = None
    for block in plan.blocks():
        raw = read_mirrored(
            lambda s: image[(slice(None),) + s], block.read, plan.image_shape, plan.mirror
        )
        x = normalise(raw, normalize or NormalizeConfig())
        piece = predict_block(x, block, plan, module, runtime, output)
        if result is None:
            lead = piece.shape[: piece.ndim - len(plan.image_shape)]
            result = np.zeros(lead + plan.image_shape, piece.dtype)
        result[(Ellipsis,) + block.write.slices()] = piece
    return result  # type: ignore[return-value]  # a plan has at least one block
