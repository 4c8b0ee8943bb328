import pytest
import torch

from pipeline.models.unet import UNet, unet_dependency, unet_geometry, unet_sizes
from tests.helpers import empirical_dependency, make_probe_ready


def test_paper_geometry_572_gives_388() -> None:
    net = UNet(1, 2, depth=4, width=4, padding="valid").eval()
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)
    assert unet_sizes(572, 4, "valid")["out"] == [388]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_legal_valid_input_sizes_follow_min_plus_n_step(depth) -> None:
    geo = unet_geometry(depth, "valid")
    assert geo.size_step == 2**depth == geo.shift_period
    legal = [s for s in range(1, 40 * 2**depth) if unet_sizes(s, depth, "valid")]
    assert legal == list(range(geo.size_min, 40 * 2**depth, geo.size_step))
    # the built network runs on the two smallest legal sizes and fails just below
    net = UNet(1, 2, depth=depth, width=2, padding="valid").eval()
    for s in legal[:2]:
        out = net(torch.zeros(1, 1, s, s))
        assert out.shape[-1] == s - 2 * geo.trim
    with pytest.raises(RuntimeError):
        net(torch.zeros(1, 1, geo.size_min - 1, geo.size_min - 1))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_same_padding_keeps_size_for_multiples_of_the_stride(depth) -> None:
    geo = unet_geometry(depth, "same")
    assert (geo.size_min, geo.size_step, geo.trim) == (2**depth, 2**depth, 0)
    net = UNet(2, 3, depth=depth, width=2, padding="same").eval()
    s = 3 * 2**depth
    assert net(torch.zeros(1, 2, s, 2 * s)).shape == (1, 3, s, 2 * s)


@pytest.mark.parametrize(("depth", "padding", "size"), [(2, "same", 96), (3, "same", 160), (2, "valid", 76), (3, "valid", 124)])
def test_dependency_walk_equals_the_gradient_probe_for_every_phase(depth, padding, size) -> None:
    net = make_probe_ready(UNet(1, 2, depth=depth, width=2, padding=padding))
    out_size = unet_sizes(size, depth, padding)["out"][0]
    start = out_size // 2 - 2**depth if padding == "same" else 0
    for phase in range(2**depth):
        o = start + phase
        lo, hi = unet_dependency(o, o, size, depth, padding)
        assert 0 <= lo and hi < size, "probe input too small for this phase"
        assert empirical_dependency(net, size, o) == (lo, hi, lo, hi), f"phase {phase}"


def test_halo_of_the_same_unet_is_the_largest_reach_over_phases() -> None:
    geo = unet_geometry(3, "same")
    reach = 0
    for phase in range(8):
        o = 80 + phase
        lo, hi = unet_dependency(o, o, 160, 3, "same")
        reach = max(reach, o - lo, hi - o)
    assert geo.halo == reach == 51
