import numpy as np
import pytest
import torch

from pipeline.config import TorchScriptConfig
from pipeline.errors import ModelError
from pipeline.models.loading import check_declared_halo, load_model
from pipeline.models.probe import probe_reach
from pipeline.models.unet import UNet, unet_geometry
from tests.helpers import BoxFilterNet


def test_probe_finds_the_box_filter_radius() -> None:
    net = BoxFilterNet(5, np.ones((2, 1)))
    from pipeline.tiling import NetworkGeometry

    result = probe_reach(net, NetworkGeometry(halo=2), in_channels=1)
    assert result.reach == 5 and not result.hit_border


def test_probe_reaches_the_unet_halo_over_all_phases() -> None:
    torch.manual_seed(0)
    net = UNet(1, 2, depth=2, width=4, padding="same").eval()
    geo = unet_geometry(2, "same")
    assert probe_reach(net, geo, in_channels=1, trials=4).reach == geo.halo


def _scripted(tmp_path, net) -> str:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(net), path)
    return str(path)


def test_declared_halo_too_small_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    path = _scripted(tmp_path, UNet(1, 2, depth=2, width=4, padding="same").eval())
    cfg = TorchScriptConfig(arch="torchscript", path=path, num_classes=2, halo=12, shift_period=4, size_step=4, size_min=4)
    with pytest.raises(ModelError, match=r"model.halo: 12 px is declared, but .* 23 px away .*declare halo: 23"):
        check_declared_halo(load_model(cfg), cfg)
    good = cfg.model_copy(update={"halo": 23})
    check_declared_halo(load_model(good), good)
