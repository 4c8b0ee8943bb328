"""``tiling.skip`` in a run: which blocks the mask skips (driver), and the task writing them.

The mask is read in the driver at plan time, so ``pipeline plan`` can count what it skips:
a small mask (a pyramid level, usually) whole, a large one block by block through the
reader's regions. A block the mask skips becomes :func:`write_skipped_block`, a task that
writes the constant chunk and marks the block in the ledger, with neither model nor image.
The rules (uniform, below, above) need the block's pixels: ``run_block`` checks them on the
read box it reads anyway (:meth:`pipeline.skipping.SkipRule.skips`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np

from .config import Workflow
from .errors import InputImageError, WorkflowError
from .geometry import Box
from .inference import BlockResult, InferenceSpec
from .io import fs
from .io.images import ImageReader, ImageSpec, open_image
from .io.labels import mark_block_done, write_block
from .skipping import SkipPlan, SkipRule, constant_labels, mask_shape_problem, masked_blocks
from .tiling import TilePlan

MASK_FIELD = "tiling.skip.mask"
WHOLE_MASK_BYTES = 256 << 20  # a mask up to this size is read once, whole


def plan_skips(wf: Workflow, image: ImageReader, plan: TilePlan) -> SkipPlan | None:
    """The skipping of ``wf`` on ``plan`` (None without ``tiling.skip``); errors name the field."""
    cfg = wf.tiling.skip
    if cfg is None:
        return None
    k = wf.model.num_classes
    if cfg.label >= k:
        raise WorkflowError(
            f"tiling.skip.label: expected a class of the model, 0 <= label < model.num_classes "
            f"({k}), got {cfg.label}"
        )
    rule = SkipRule(cfg.label, cfg.uniform, cfg.below, cfg.above)
    if cfg.mask is None:
        return SkipPlan(rule)
    shown = fs.redact(cfg.mask)
    with fs.storage_errors(MASK_FIELD, cfg.mask):
        mask = open_mask(cfg.mask)
        problem = mask_shape_problem(mask.shape, image.shape)
        if problem is not None:
            raise InputImageError(
                f"{MASK_FIELD}: {shown} has shape {mask.shape}, but the image "
                f"{fs.redact(wf.input.image_path)} has spatial shape {image.shape}; {problem}"
            )
        masked = masked_blocks(plan.blocks(), image.shape, mask.shape, _any_nonzero(mask))
    return SkipPlan(rule, masked, shown, mask.shape)


def open_mask(path: str) -> ImageReader:
    """The mask as one 2D channel: ``(h, w)``, or ``(1, h, w)`` and ``(h, w, 1)`` squeezed."""
    spec = ImageSpec(path, None, MASK_FIELD)
    try:
        return open_image(spec)
    except InputImageError as exc:
        first = exc
    shape: tuple[int, ...] | None = None
    for axis in (0, -1):  # a squeezable third axis
        try:
            reader = open_image(dataclasses.replace(spec, channel_axis=axis))
        except InputImageError:
            continue
        if reader.channels == 1:
            return reader
        shape = (*reader.shape, reader.channels) if axis == -1 else shape
    if shape is None:
        raise first
    raise InputImageError(
        f"{MASK_FIELD}: {fs.redact(path)}: expected a single-channel 2D mask (nonzero: compute "
        f"the block), got an array of shape {shape}; save it with one channel (e.g. an 8-bit "
        f"grayscale PNG: bilevel and palette PNGs are read as RGB)"
    )


def _any_nonzero(mask: ImageReader) -> Callable[[Box], bool]:
    """Whether a box of the mask holds a nonzero pixel (NaN counts: compute rather than skip)."""
    if math.prod(mask.shape) * mask.dtype.itemsize <= WHOLE_MASK_BYTES:
        whole = mask.read(tuple(slice(0, n) for n in mask.shape))[0] != 0
        return lambda box: bool(whole[box.slices()].any())
    return lambda box: bool(np.any(mask.read(box.slices()) != 0))


def write_skipped_block(index: tuple[int, ...], spec: InferenceSpec) -> BlockResult:
    """The Dask task of a block the mask skips: the constant chunk, then the ledger.

    No model is loaded and no image read. Idempotent: a rerun writes the same bytes.
    """
    start = time.perf_counter()
    if spec.skip is None:
        raise ValueError(f"block {index} is skipped, but the run has no tiling.skip")
    fs.use_rules(spec.image.storage)  # the driver's storage options, for the output
    block = spec.plan.block(index)
    labels = constant_labels(block.write.shape, spec.skip.label, spec.label_dtype)
    write_block(spec.output_path, spec.run_id, block.write, labels)
    mark_block_done(spec.output_path, spec.run_id, block.index)  # only after the chunk is written
    seconds = time.perf_counter() - start
    return BlockResult(block.index, block.write.size, len(block.tiles), seconds, skipped=True)
