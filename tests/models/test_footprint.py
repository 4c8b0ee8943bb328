"""A model's memory, counted: exact for a known network, the same on meta as on the CPU,
growing with the tile where a valid-convolution network needs it, and a CPU count where a
model cannot run on meta."""

import pytest
import torch
from torch import nn

from pipeline.config import UNetConfig
from pipeline.models.footprint import SLACK, FootprintProbe, _count
from pipeline.models.loading import load_model


class TwoConvs(nn.Module):
    """conv 1->8, relu (not in place), conv 8->4: a count done by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class DataDependent(nn.Module):
    """Branches on a value: cannot run on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * 2 if float(y.mean()) > 0 else y


def test_the_count_of_a_known_network() -> None:
    edge = 64
    x = torch.zeros(1, 1, edge, edge)
    peak, largest = _count(TwoConvs().eval(), x)
    px = edge * edge
    # the input, conv a's output and relu's output at once; conv a's output is freed
    # before conv b's is made (1 + 8 + 4 < 1 + 8 + 8)
    assert peak == 4 * px * (1 + 8 + 8) and largest == 4 * px * 8
    usage = FootprintProbe(TwoConvs().eval(), 1, 64, channels_last=False)(2, 128)
    assert usage is not None
    assert usage.peak == pytest.approx(SLACK * 2 * 4 * 128 * 128 * (1 + 8 + 8))


def test_meta_counts_what_the_cpu_counts() -> None:
    module = load_model(UNetConfig(arch="unet", depth=3, width=4, num_classes=2)).module
    x = torch.zeros(1, 1, 96, 96)
    assert _count(module.to("meta"), x.to("meta")) == _count(load_model(
        UNetConfig(arch="unet", depth=3, width=4, num_classes=2)).module, x)  # fmt: skip


def test_valid_unets_need_more_per_pixel_on_larger_tiles_and_torchscript_is_counted() -> None:
    loaded = load_model(UNetConfig(arch="unet", depth=4, width=8, num_classes=2, padding="valid"))
    probe = FootprintProbe(torch.jit.script(loaded.module), 1, 188)
    small, large = probe(1, 188), probe(1, 1084)
    assert small is not None and large is not None
    assert large.peak / 1084**2 > 1.2 * small.peak / 188**2
    assert next(loaded.module.parameters()).device.type == "cpu"  # the probe counted a copy


def test_a_model_that_cannot_run_on_meta_is_counted_on_the_cpu_and_scaled() -> None:
    probe = FootprintProbe(DataDependent().eval(), 1, 64, channels_last=False)
    usage = probe(1, 256)
    assert usage is not None
    assert usage.largest == 4 * 8 * 256 * 256  # conv output, counted at 64 px and scaled
