"""Tiling is invisible: tiled inference equals whole-image inference on the mirrored image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import NormalizeConfig
from pipeline.inference import normalise, predict_image
from pipeline.models.dilated import DilatedContextNet, dilated_geometry
from pipeline.models.unet import UNet, unet_geometry
from pipeline.tiling import NetworkGeometry, plan_tiles
from tests.helpers import BoxFilterNet, box_filter_reference


@st.composite
def box_filter_cases(draw):
    channels = draw(st.integers(1, 3))
    classes = draw(st.integers(2, 4))
    radius = draw(st.integers(0, 9))
    h, w = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    tile = draw(st.integers(1, 48))
    batch = draw(st.integers(1, 5))
    mode = draw(st.sampled_from(["reflect", "symmetric"]))
    padding = draw(st.sampled_from(["same", "valid"]))
    seed = draw(st.integers(0, 2**16))
    return channels, classes, radius, (h, w), tile, batch, mode, padding, seed


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(box_filter_cases())
def test_box_filter_seams_are_exact(case) -> None:
    """Bit for bit, for drawn shapes, tiles that do not divide them, tiny images, channels."""
    channels, classes, radius, shape, tile, batch, mode, padding, seed = case
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (channels,) + shape).astype(np.uint8)
    weight = rng.integers(-3, 4, (classes, channels))
    net = BoxFilterNet(radius, weight, padding)
    plan = plan_tiles(shape, net.geometry(), tile=tile, mirror=mode, batch_size=batch)
    logits = predict_image(image, net, plan, output="logits")
    expected = box_filter_reference(image, radius, weight, mode)
    np.testing.assert_array_equal(logits, expected.astype(np.float32))
    labels = predict_image(image, net, plan, output="labels")
    np.testing.assert_array_equal(labels, expected.argmax(axis=0))


def whole_image_logits(image: np.ndarray, net: torch.nn.Module, plan, normalize) -> np.ndarray:
    """Reference: one forward pass over the whole mirror-padded image, then a crop.

    Padded by the plan's context on every side, plus mirrored rows/columns at the end
    so that the padded size is a legal input of the network.
    """
    geo, c = plan.geometry, plan.context
    m = geo.tile_multiple
    extra = [(-n) % m for n in plan.image_shape]
    padded = np.pad(image, ((0, 0),) + tuple((c, c + e) for e in extra), mode=plan.mirror)
    x = torch.from_numpy(normalise(padded, normalize))[None]
    with torch.inference_mode():
        out = net(x)[0].numpy()
    start = c - geo.trim
    return out[(slice(None),) + tuple(slice(start, start + n) for n in plan.image_shape)]


REAL_SHAPE = (1531, 2049)


def _real_image() -> np.ndarray:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[: REAL_SHAPE[0], : REAL_SHAPE[1]]
    smooth = 120 + 60 * np.sin(yy / 37.0) * np.cos(xx / 53.0)
    return np.clip(smooth + rng.normal(0, 25, REAL_SHAPE), 0, 255).astype(np.uint8)[None]


def _assert_tiled_equals_whole(net, geometry, tile, mode="reflect", batch=2) -> None:
    image = _real_image()
    normalize = NormalizeConfig(mean=128.0, std=64.0)
    plan = plan_tiles(image.shape[1:], geometry, tile=tile, mirror=mode, batch_size=batch)
    tiled = predict_image(image, net, plan, normalize, output="logits")
    whole = whole_image_logits(image, net, plan, normalize)
    assert tiled.shape == whole.shape == (net_classes(net),) + REAL_SHAPE
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)
    top2 = np.sort(whole, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 1e-3
    assert decided.mean() > 0.99
    labels = predict_image(image, net, plan, normalize, output="labels")
    np.testing.assert_array_equal(labels[decided], whole.argmax(axis=0)[decided])


def net_classes(net) -> int:
    return [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1].out_channels


def _seeded(factory):
    torch.manual_seed(0)
    return factory().eval()


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_unet_seams_on_a_non_square_image(padding) -> None:
    net = _seeded(lambda: UNet(1, 3, depth=4, width=8, padding=padding))
    _assert_tiled_equals_whole(net, unet_geometry(4, padding), tile=512)


def test_dilated_net_seams_on_a_non_square_image() -> None:
    net = _seeded(lambda: DilatedContextNet(1, 3, front_width=8, front_depth=2, identity_init=False))
    _assert_tiled_equals_whole(net, dilated_geometry(2, "same"), tile=700, mode="symmetric")


def test_normalise_is_per_channel() -> None:
    x = np.stack([np.full((2, 2), 10.0), np.full((2, 2), 20.0)])
    out = normalise(x, NormalizeConfig(mean=[10.0, 0.0], std=[1.0, 4.0]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1], 5.0)


def test_parameter_free_network_runs_on_the_cpu() -> None:
    net = BoxFilterNet(1, np.array([[1], [-1]]))
    plan = plan_tiles((5, 5), NetworkGeometry(halo=1), tile=4, mirror="reflect")
    assert predict_image(np.ones((1, 5, 5)), net, plan).shape == (5, 5)
