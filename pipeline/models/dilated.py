"""Dilated-convolution context network (Yu & Koltun 2016) in plain torch.

A plain front end (3x3 convolutions + ReLU at full resolution, then a 1x1 convolution to
``C`` maps: ``num_classes`` score maps as in the paper, or ``context_width`` feature maps)
feeds the paper's context module (its table 1), then a 1x1 convolution to the classes:

    layer        1    2    3    4    5    6    7    8
    dilation     1    1    2    4    8    16   1    1 (1x1)
    basic        C    C    C    C    C    C    C    C
    large        2C   2C   4C   8C   16C  32C  32C  C
    receptive    3    5    9    17   33   65   67   67

Layers 1-7 are 3x3 + ReLU, layer 8 is a 1x1 without truncation. The context module starts
as the identity (the paper's initialisation), so it refines the front end's scores.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..tiling import NetworkGeometry

Padding = Literal["same", "valid"]
ContextSize = Literal["basic", "large"]

CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
LARGE_MULTIPLIERS = (2, 2, 4, 8, 16, 32, 32)


def context_channels(width: int, context: ContextSize) -> list[int]:
    """Channels of the context module's 3x3 layers for ``C = width``."""
    if context == "basic":
        return [width] * len(CONTEXT_DILATIONS)
    return [m * width for m in LARGE_MULTIPLIERS]


class DilatedContextNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        front_width: int = 64,
        front_depth: int = 2,
        context: ContextSize = "basic",
        padding: Padding = "same",
        identity_init: bool = True,
        context_width: int | None = None,
    ) -> None:
        super().__init__()
        same = padding == "same"
        width = context_width or num_classes
        front: list[nn.Module] = []
        c = in_channels
        for _ in range(front_depth):
            front += [nn.Conv2d(c, front_width, 3, padding=1 if same else 0), nn.ReLU(inplace=True)]
            c = front_width
        front.append(nn.Conv2d(c, width, 1))
        self.front = nn.Sequential(*front)

        layers: list[nn.Module] = []
        c = width
        for d, c_out in zip(CONTEXT_DILATIONS, context_channels(width, context)):
            layers += [
                nn.Conv2d(c, c_out, 3, dilation=d, padding=d if same else 0),
                nn.ReLU(inplace=True),
            ]
            c = c_out
        layers.append(nn.Conv2d(c, num_classes, 1))
        self.context = nn.Sequential(*layers)
        if identity_init:
            self.reset_context_to_identity()

    def reset_context_to_identity(self, noise: float = 1e-3) -> None:
        """The paper's identity initialisation (section 3), for basic and large modules.

        ``k(t, a -> b) = C / c_out`` at the centre tap ``t = 0`` when input channel ``a`` and
        output channel ``b`` fall in the same class group, small noise elsewhere.
        """
        convs = [m for m in self.context if isinstance(m, nn.Conv2d)]
        n = convs[-1].out_channels
        with torch.no_grad():
            for conv in convs:
                c_out, c_in, kh, kw = conv.weight.shape
                a = torch.arange(c_in) * n // c_in
                b = torch.arange(c_out) * n // c_out
                same_group = (b[:, None] == a[None, :]).to(conv.weight.dtype)
                scale = n / c_out
                conv.weight.normal_(0.0, noise * scale if c_in != c_out else 0.0)
                conv.weight[:, :, kh // 2, kw // 2] += scale * same_group
                assert conv.bias is not None  # every context conv is built with bias=True
                conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(self.front(x))


def dilated_geometry(front_depth: int, padding: Padding) -> NetworkGeometry:
    """Every layer is a stride-1 convolution: the halo is the sum of their reaches."""
    halo = front_depth + sum(CONTEXT_DILATIONS)
    trim = halo if padding == "valid" else 0
    return NetworkGeometry(
        halo=halo,
        trim=trim,
        shift_period=1,
        size_min=2 * trim + 1,
        size_step=1,
        name=f"dilated context network ({front_depth}-layer front end, {padding} padding)",
    )
