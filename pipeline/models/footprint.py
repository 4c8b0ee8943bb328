"""Measure a model's memory per input pixel: what ``tiling.tile: auto`` sizes tiles by.

Counted, not estimated from the architecture, so it holds for any model the pipeline
runs, TorchScript and torch.export programs included: one forward pass on a small legal
input under a dispatch mode that sees every tensor the operators create and when it is
freed. Two numbers per input pixel: the peak of bytes alive at once, and the largest single
tensor (a CPU convolution whose activation reaches 2 GiB falls to a slow kernel).
Workspaces inside a kernel and the allocator's slack are not tensors; :data:`SLACK` covers
them (measured here: a worker's resident memory at the peak of a U-Net forward pass was
1.2-1.4x the live tensors).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..tiling import NetworkGeometry

SLACK = 1.5
PROBE_EDGE = 256  # the probe input's edge, at least (then the next legal size)


@dataclass(frozen=True)
class Footprint:
    """Bytes per input pixel of one forward pass (batch of one, as measured)."""

    peak_bytes_per_pixel: float  # live tensors at the peak, times SLACK
    largest_bytes_per_pixel: float  # the largest single tensor
    probe_edge: int

    def describe(self) -> str:
        return (
            f"{self.peak_bytes_per_pixel:.0f} B per input pixel at the peak (largest tensor "
            f"{self.largest_bytes_per_pixel:.0f} B/px; measured on a {self.probe_edge} px input)"
        )


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
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live:  # a view of a storage already counted
                continue
            self.live[key] = size
            self.current += size
            self.largest = max(self.largest, size)
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._freed, key)
        return out


def probe_edge(geometry: NetworkGeometry) -> int:
    """The smallest legal input edge of at least PROBE_EDGE px and twice the halo."""
    target = max(PROBE_EDGE, 2 * geometry.halo + 2 * geometry.shift_period)
    size = geometry.size_min
    while size < target and (geometry.size_max is None or size + geometry.size_step <= geometry.size_max):
        size += geometry.size_step
    return size


def measure_footprint(
    module: nn.Module, in_channels: int, geometry: NetworkGeometry, channels_last: bool = True
) -> Footprint | None:
    """One counted forward pass on the CPU; None when the model cannot run under the count."""
    edge = probe_edge(geometry)
    x = torch.zeros(1, in_channels, edge, edge)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    counter = _LiveTensors()
    try:
        with torch.inference_mode(), counter:
            out = module(x)
    except Exception:
        return None
    del out
    pixels = edge * edge
    input_bytes = x.numel() * x.element_size()
    return Footprint(
        peak_bytes_per_pixel=SLACK * (counter.peak + input_bytes) / pixels,
        largest_bytes_per_pixel=max(counter.largest, input_bytes) / pixels,
        probe_edge=edge,
    )
