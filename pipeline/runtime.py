"""How a batch of tiles goes through the network: device, precision, layout, augmentation.

Nothing here changes which tile owns which pixel; it only decides how fast and how the
logits are computed:

* the device is pinned per worker process: with several GPUs on one machine, local worker
  ``i`` takes GPU ``i mod n`` (two workers never share a GPU by accident); a batch job
  that was given one GPU (``CUDA_VISIBLE_DEVICES``) uses it;
* host-to-device copies come from pinned memory and do not block, so the next batch's
  copy overlaps the current compute; a GPU worker runs two Dask threads so one thread
  reads and normalises the next block while the other's batch is on the GPU;
* ``precision`` autocasts the forward pass to bf16/fp16; logits are cast back to fp32
  before augmentations are averaged and before the argmax;
* ``tta`` averages the logits of flipped (and rotated) copies, each mapped back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import InferenceConfig

# (quarter turns, flip of the last axis) for each transform of a test-time augmentation
TTA_TRANSFORMS: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, False), (2, True)),  # identity, flip x, flip both, flip y
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    tta: str = "none"

    @classmethod
    def from_config(cls, cfg: InferenceConfig, worker_index: int | None = None) -> Runtime:
        device = resolve_device(cfg.device, worker_index)
        channels_last = True if cfg.channels_last == "auto" else bool(cfg.channels_last)
        return cls(device, cfg.precision, channels_last, cfg.tta)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def resolve_device(requested: str, worker_index: int | None = None) -> str:
    """``auto``/``cuda`` -> the GPU this worker owns; ``cpu``/``cuda:N`` as given."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if requested.startswith("cuda:"):
        return requested
    count = torch.cuda.device_count()
    if count == 0:
        return "cpu" if requested == "auto" else "cuda"  # "cuda" without one fails loudly later
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if worker_index is None or (visible and "," not in visible):
        return "cuda:0"
    return f"cuda:{worker_index % count}"


def prepare_module(module: nn.Module, runtime: Runtime) -> nn.Module:
    module = module.to(runtime.device)
    if runtime.channels_last:
        volumetric = any(p.dim() == 5 for p in module.parameters())
        # torch documents Module.to(memory_format=...); its overload stubs omit it.
        module = module.to(memory_format=channels_last_format(5 if volumetric else 4))  # type: ignore[call-overload]
    return module.eval()


def channels_last_format(ndim: int) -> torch.memory_format:
    """Channels-last for a tensor of ``ndim`` axes: NHWC for images, NDHWC for volumes."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def forward(module: nn.Module, batch: np.ndarray, runtime: Runtime) -> torch.Tensor:
    """fp32 logits ``(B, K, ...)`` on the runtime's device for a ``(B, C, ...)`` batch."""
    x = torch.from_numpy(np.ascontiguousarray(batch))
    if runtime.cuda:
        x = x.pin_memory().to(runtime.device, non_blocking=True)
    else:
        x = x.to(runtime.device)
    if runtime.channels_last:
        x = x.contiguous(memory_format=channels_last_format(x.dim()))
    dtype = PRECISIONS[runtime.precision]
    device_type = "cuda" if runtime.cuda else "cpu"
    transforms = TTA_TRANSFORMS[runtime.tta]
    total: torch.Tensor | None = None
    with torch.inference_mode(), torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for turns, flip in transforms:
            t = _apply(x, turns, flip)
            y = _undo(module(t), turns, flip).float()
            total = y if total is None else total + y
    assert total is not None
    return total / len(transforms) if len(transforms) > 1 else total


def _apply(x: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if turns:
        x = torch.rot90(x, turns, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _undo(y: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if flip:
        y = torch.flip(y, dims=(-1,))
    return torch.rot90(y, -turns, dims=(-2, -1)) if turns else y


def choose_batch_size(module: nn.Module, runtime: Runtime, tile_shape: tuple[int, ...], in_channels: int) -> int:
    """Tiles per forward pass that fit in 70% of the free GPU memory (1 on the CPU).

    Measured, not estimated: the peak memory of one tile's forward pass, so it holds for
    user models whose layers the pipeline cannot see.
    """
    if not runtime.cuda:
        return 1
    device = torch.device(runtime.device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    forward(module, np.zeros((1, in_channels) + tuple(tile_shape), np.float32), runtime)
    torch.cuda.synchronize(device)
    per_tile = max(1, torch.cuda.max_memory_allocated(device) - before)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(64, 0.7 * free // per_tile)))
