"""Measure what an output pixel depends on: the gradient probe.

The support of d(logits at one output pixel)/d(input) is the set of input pixels that
pixel depends on, for that input. United over a few random inputs and over every phase of
the network's shift period it is a lower bound of the receptive field (a ReLU that is off
or a max-pool element that is not the maximum hides a dependency for that input): so a
measured reach beyond the declared halo proves the halo too small.
"""

from __future__ import annotations

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


def probe_reach(
    module: nn.Module, geometry: NetworkGeometry, in_channels: int, trials: int = 2, margin: int = 32
) -> ProbeResult:
    """Largest reach of the module's dependency over all phases of its shift period."""
    period = geometry.shift_period
    size = geometry.size_min
    target = 2 * (geometry.halo + margin + period) + 1
    while size < target and (geometry.size_max is None or size + geometry.size_step <= geometry.size_max):
        size += geometry.size_step
    out_size = size - 2 * geometry.trim
    start = (out_size // 2 // period) * period
    device = next(iter(list(module.parameters()) + list(module.buffers()) + [torch.empty(0)])).device
    best = ProbeResult(0, size, 0, False)
    gen = torch.Generator().manual_seed(0)
    for phase in range(period):
        o = start + phase
        if o >= out_size:
            break
        centre = o + geometry.trim
        lo, hi = size, -1
        for _ in range(trials):
            x = torch.randn(1, in_channels, size, size, generator=gen).to(device).requires_grad_(True)
            with torch.enable_grad():
                y = module(x)
                y[0, :, o, o].sum().backward()
            rows = (x.grad[0].abs().sum(dim=(0, 2)) > 0).nonzero().flatten()
            cols = (x.grad[0].abs().sum(dim=(0, 1)) > 0).nonzero().flatten()
            if rows.numel():
                lo = min(lo, int(rows.min()), int(cols.min()))
                hi = max(hi, int(rows.max()), int(cols.max()))
        if hi < 0:
            continue
        reach = max(centre - lo, hi - centre)
        if reach > best.reach:
            best = ProbeResult(reach, size, phase, lo == 0 or hi == size - 1)
    return best
