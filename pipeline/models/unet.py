"""U-Net (Ronneberger, Fischer & Brox 2015) in plain torch, and its tiling geometry.

Each level: two 3x3 convolutions + ReLU (optionally BatchNorm), 2x2 max-pooling down,
2x2 up-convolution (transposed, stride 2) up, concatenation with the encoder features of
the same level (centre-cropped for unpadded convolutions), and a final 1x1 convolution.
``padding="valid"`` is the paper's network (572 -> 388 at depth 4); ``"same"`` keeps sizes.
``dims=3`` is the same network in 3D (3x3x3 convolutions, 2x2x2 pooling: Cicek et al. 2016).

The geometry (halo, trim, legal input sizes) is derived from the same structure by
:func:`unet_geometry`, which walks the network backwards from an output pixel.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..tiling import NetworkGeometry

Padding = Literal["same", "valid"]


Dims = Literal[2, 3]
_LAYERS = {  # convolution, batch norm, max-pooling, transposed convolution
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d),
}


class DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, padding: Padding, batch_norm: bool, dims: Dims = 2) -> None:
        conv, norm, _, _ = _LAYERS[dims]
        pad = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers.append(conv(c, c_out, 3, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(norm(c_out))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UpBlock(nn.Module):
    """Up-convolve, centre-crop the skip to the same size, concatenate, two convolutions."""

    def __init__(self, c_in: int, c_out: int, padding: Padding, batch_norm: bool, dims: Dims = 2) -> None:
        super().__init__()
        self.dims = dims
        self.up = _LAYERS[dims][3](c_in, c_out, 2, stride=2)
        self.convs = DoubleConv(2 * c_out, c_out, padding, batch_norm, dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        for axis in range(-self.dims, 0):  # centre crop, axis by axis
            d = (skip.shape[axis] - x.shape[axis]) // 2
            skip = skip.narrow(axis, d, x.shape[axis])
        return self.convs(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int = 4,
        width: int = 64,
        padding: Padding = "same",
        batch_norm: bool = False,
        dims: Dims = 2,
    ) -> None:
        super().__init__()
        self.depth, self.padding, self.dims = depth, padding, dims
        conv, _, pool, _ = _LAYERS[dims]
        chans = [width * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            DoubleConv(in_channels if lv == 0 else chans[lv - 1], chans[lv], padding, batch_norm, dims)
            for lv in range(depth)
        )
        self.pool = pool(2)
        self.bottleneck = DoubleConv(chans[depth - 1], chans[depth], padding, batch_norm, dims)
        self.decoders = nn.ModuleList(
            UpBlock(chans[lv + 1], chans[lv], padding, batch_norm, dims) for lv in reversed(range(depth))
        )
        self.head = conv(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for i, decoder in enumerate(self.decoders):
            x = decoder(x, skips[len(skips) - 1 - i])
        return self.head(x)


def unet_sizes(size: int, depth: int, padding: Padding) -> dict[str, list[int]] | None:
    """Tensor sizes along one axis for an input of ``size``, or None if it is illegal.

    ``enc[l]``: encoder features at level l; ``up[l]``: up-convolved decoder input at level
    l; ``dec[l]``: decoder output at level l; ``out``: network output.
    """
    shrink = 4 if padding == "valid" else 0
    enc, s = [], size
    for _ in range(depth):
        a = s - shrink
        if a < 2 or a % 2:
            return None
        enc.append(a)
        s = a // 2
    x = s - shrink
    if x < 1:
        return None
    up, dec = [0] * depth, [0] * depth
    for level in reversed(range(depth)):
        up[level] = 2 * x
        if up[level] > enc[level] or (enc[level] - up[level]) % 2:
            return None
        x = up[level] - shrink
        if x < 1:
            return None
        dec[level] = x
    return {"enc": enc, "up": up, "dec": dec, "out": [x]}


def unet_dependency(
    out_lo: int, out_hi: int, size: int, depth: int, padding: Padding
) -> tuple[int, int]:
    """Input index range that output indices ``[out_lo, out_hi]`` depend on (inclusive).

    Indices of a padded net may leave ``[0, size)``: they stand for the pixels an infinite
    image would have there, which is what a tile's halo must supply.
    """
    sizes = unet_sizes(size, depth, padding)
    if sizes is None:
        raise ValueError(f"{size} is not a legal U-Net input size")
    grow = (0, 4) if padding == "valid" else (2, 2)

    def double_conv(lo: int, hi: int) -> tuple[int, int]:
        return lo - grow[0], hi + grow[1]

    def encoder(level: int, lo: int, hi: int) -> tuple[int, int]:
        lo, hi = double_conv(lo, hi)  # into this level's input
        if level == 0:
            return lo, hi
        return encoder(level - 1, 2 * lo, 2 * hi + 1)  # max-pool 2x2 reads [2i, 2i + 1]

    def bottleneck(lo: int, hi: int) -> tuple[int, int]:
        lo, hi = double_conv(lo, hi)
        return encoder(depth - 1, 2 * lo, 2 * hi + 1)

    def decoder(level: int, lo: int, hi: int) -> tuple[int, int]:
        lo, hi = double_conv(lo, hi)  # into the concatenation at this level
        below = bottleneck if level == depth - 1 else (lambda a, b: decoder(level + 1, a, b))
        up_lo, up_hi = below(lo // 2, hi // 2)  # transposed conv 2x2/2: out i <- in i // 2
        crop = (sizes["enc"][level] - sizes["up"][level]) // 2
        skip_lo, skip_hi = encoder(level, lo + crop, hi + crop)
        return min(up_lo, skip_lo), max(up_hi, skip_hi)

    return decoder(0, out_lo, out_hi)


def unet_geometry(depth: int, padding: Padding, dims: Dims = 2) -> NetworkGeometry:
    """Halo, trim, shift period and legal input sizes of a U-Net, from its structure (the
    same along every axis: a 3D U-Net's halo is this one along z, y and x)."""
    period = 2**depth
    outs = {
        s: sizes["out"][0]
        for s in range(1, 64 * period)
        if (sizes := unet_sizes(s, depth, padding)) is not None
    }
    legal = list(outs)
    size_min, size_step = legal[0], legal[1] - legal[0]
    # Enough output pixels to see every phase of the pooling grid.
    size = next(s for s in legal if outs[s] >= period)
    trim = (size - outs[size]) // 2
    if padding == "valid":
        # Every output pixel of an unpadded net depends only on pixels of its own input,
        # so a tile is exact once its output covers the write box: context = trim.
        halo = trim
    else:
        halo = 0
        for phase in range(period):
            lo, hi = unet_dependency(phase, phase, size, depth, padding)
            halo = max(halo, phase - lo, hi - phase)
    return NetworkGeometry(
        halo=halo,
        trim=trim,
        shift_period=period,
        size_min=size_min,
        size_step=size_step,
        name=f"{'3D ' if dims == 3 else ''}U-Net (depth {depth}, {padding} padding)",
        dims=dims,
    )
