"""Measure a model's memory at a given input size: what ``tiling.tile: auto`` sizes tiles by.

Counted, not estimated from the architecture, so it holds for every model the pipeline
runs, TorchScript and torch.export programs included: a forward pass under a dispatch mode
that sees every tensor the operators create and when it is freed. Two numbers: the peak of
bytes alive at once, and the largest single tensor (a CPU convolution whose activation
reaches 2 GiB falls to a slow kernel, DESIGN.md). The pass runs on a copy of the model on
PyTorch's ``meta`` device, which computes shapes only: exact at any tile size (a valid-
convolution U-Net needs more per pixel on large tiles than on small ones) in milliseconds.
A model that cannot run on ``meta`` (data-dependent code) is counted on the CPU at a small
size and scaled per pixel. Workspaces inside kernels and the allocator's slack are not
tensors: :data:`SLACK` covers them (measured here: a worker's resident memory at the peak of
a U-Net pass was 1.2-1.3x the live tensors of the eager module).
"""

from __future__ import annotations

import copy
import io
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SLACK = 1.3
SMALL_EDGE = 256  # about the CPU fallback's input edge


@dataclass(frozen=True)
class Usage:
    """Bytes of one forward pass on a batch of inputs."""

    peak: float  # live tensors at the peak, times SLACK
    largest: float  # the largest single tensor

    @property
    def live(self) -> float:
        """Live tensors at the peak, as counted."""
        return self.peak / SLACK


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of tensor storages that operators create, while they are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = self.largest = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage._cdata, storage.nbytes()
            if size == 0 or key in self.live:  # a view of a storage already counted
                continue
            self.live[key] = size
            self.current += size
            self.largest = max(self.largest, size)
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._freed, key)
        return out


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device; the module itself is left as it is."""
    if isinstance(module, torch.jit.ScriptModule):  # cannot be deep-copied and moved
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="meta")
    with warnings.catch_warnings():  # .to() reads .grad of non-leaf parameters
        warnings.simplefilter("ignore")
        return copy.deepcopy(module).to("meta")


def _count(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    counter = _LiveTensors()
    with torch.inference_mode(), counter:
        out = module(x)
    del out
    size = x.numel() * x.element_size()
    return counter.peak + size, max(counter.largest, size)


@dataclass
class FootprintProbe:
    """``probe(batch, edge)`` -> :class:`Usage` of one pass on ``batch`` square tiles.

    ``small_edge``: a legal input edge for the CPU fallback (near :data:`SMALL_EDGE`).
    """

    module: nn.Module
    in_channels: int
    small_edge: int
    channels_last: bool = True
    dims: int = 2  # spatial axes of the network's input: tiles are squares, or cubes
    _meta: nn.Module | None = field(default=None, init=False, repr=False)
    _meta_failed: bool = field(default=False, init=False, repr=False)
    _per_pixel: tuple[float, float] | None = field(default=None, init=False, repr=False)
    _cache: dict[tuple[int, int], Usage | None] = field(default_factory=dict, init=False, repr=False)

    def _input(self, batch: int, edge: int, device: str) -> torch.Tensor:
        x = torch.zeros((batch, self.in_channels) + (edge,) * self.dims, device=device)
        fmt = torch.channels_last_3d if self.dims == 3 else torch.channels_last
        return x.contiguous(memory_format=fmt) if self.channels_last else x

    def __call__(self, batch: int, edge: int) -> Usage | None:
        if (batch, edge) not in self._cache:
            self._cache[(batch, edge)] = self._measure(batch, edge)
        return self._cache[(batch, edge)]

    def _measure(self, batch: int, edge: int) -> Usage | None:
        if not self._meta_failed:
            try:
                if self._meta is None:
                    self._meta = meta_copy(self.module)
                peak, largest = _count(self._meta, self._input(batch, edge, "meta"))
                return Usage(SLACK * peak, largest)
            except Exception:  # data-dependent code, an op without a meta kernel: count on the CPU
                self._meta, self._meta_failed = None, True
        try:
            if self._per_pixel is None:
                peak, largest = _count(self.module, self._input(1, self.small_edge, "cpu"))
                voxels = self.small_edge**self.dims
                self._per_pixel = (peak / voxels, largest / voxels)
        except Exception:
            return None
        pixels = batch * edge**self.dims
        return Usage(SLACK * self._per_pixel[0] * pixels, self._per_pixel[1] * pixels)
