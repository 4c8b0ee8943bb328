"""Measure what an output pixel depends on: the gradient probe.

The support of d(logits at one output pixel)/d(input) is the set of input pixels that
pixel depends on, for that input. United over a few random inputs and over every phase of
the network's shift period it is a lower bound of the receptive field (a ReLU that is off
or a max-pool element that is not the maximum hides a dependency for that input): so a
measured reach beyond the declared halo proves the halo too small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..tiling import NetworkGeometry


@dataclass(frozen=True)
class ProbeResult:
    reach: int  # largest distance from an output pixel's centre to an input it depends on
    size: int  # side of the probe input
    phase: int  # the phase where the largest reach was found
    hit_border: bool  # the dependency touched the probe input's border: reach is a lower bound
    source: str = "random inputs"  # what the input was where the largest reach was found


def probe_size(geometry: NetworkGeometry, margin: int = 32) -> int:
    """Side of the probe input: a legal size reaching past the declared halo by ``margin``."""
    size = geometry.size_min
    target = 2 * (geometry.halo + margin + geometry.shift_period) + 1
    while size < target and (geometry.size_max is None or size + geometry.size_step <= geometry.size_max):
        size += geometry.size_step
    return size


def probe_reach(
    module: nn.Module,
    geometry: NetworkGeometry,
    in_channels: int,
    trials: int = 2,
    margin: int = 32,
    samples: Sequence[tuple[str, torch.Tensor]] = (),
) -> ProbeResult:
    """Largest reach of the module's dependency over all phases of its shift period.

    The inputs are ``trials`` random ones plus ``samples``: ``(name, (C, size, size))``
    crops of real data (a network whose far reach only shows on realistic intensities, e.g.
    behind a ReLU that random inputs never open, is caught there).
    """
    period = geometry.shift_period
    size = probe_size(geometry, margin)
    out_size = size - 2 * geometry.trim
    start = (out_size // 2 // period) * period
    device = next(iter(list(module.parameters()) + list(module.buffers()) + [torch.empty(0)])).device
    gen = torch.Generator().manual_seed(0)
    inputs = [("random inputs", torch.randn(1, in_channels, size, size, generator=gen)) for _ in range(trials)]
    for name, sample in samples:
        if tuple(sample.shape) != (in_channels, size, size):
            raise ValueError(f"probe sample of shape {tuple(sample.shape)}, expected {(in_channels, size, size)}")
        inputs.append((name, sample.float()[None]))
    best = ProbeResult(0, size, 0, False)
    for phase in range(period):
        o = start + phase
        if o >= out_size:
            break
        centre = o + geometry.trim
        for name, value in inputs:
            x = value.to(device).clone().requires_grad_(True)  # a fresh leaf: no gradient carried over
            with torch.enable_grad():
                y = module(x)
                y[0, :, o, o].sum().backward()
            assert x.grad is not None
            rows = (x.grad[0].abs().sum(dim=(0, 2)) > 0).nonzero().flatten()
            cols = (x.grad[0].abs().sum(dim=(0, 1)) > 0).nonzero().flatten()
            if not rows.numel():
                continue
            lo, hi = min(int(rows.min()), int(cols.min())), max(int(rows.max()), int(cols.max()))
            reach = max(centre - lo, hi - centre)
            if reach > best.reach:
                best = ProbeResult(reach, size, phase, lo == 0 or hi == size - 1, name)
    return best
