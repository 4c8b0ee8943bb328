"""Device, precision, memory format and test-time augmentation: fast, and still seamless."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import InferenceConfig, NormalizeConfig
from pipeline.inference import normalise, predict_image
from pipeline.models.unet import UNet, unet_geometry
from pipeline.runtime import (
    TTA_TRANSFORMS,
    Runtime,
    _apply,
    _undo,
    forward,
    prepare_module,
    resolve_device,
)
from pipeline.tiling import plan_tiles

NORM = NormalizeConfig(mean=128.0, std=64.0)


def _image(shape=(203, 331), seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    smooth = 128 + 80 * np.sin(yy / 13.0) * np.cos(xx / 17.0)
    return np.clip(smooth + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)[None]


def _unet(depth=3, width=8):
    torch.manual_seed(0)
    return UNet(1, 3, depth=depth, width=width).eval()


@pytest.mark.parametrize("tta", ["flips", "d4"])
def test_tta_is_seamless_against_whole_image_tta(tta) -> None:
    image, net = _image(), _unet()
    plan = plan_tiles(image.shape[1:], unet_geometry(3, "same"), tile=64, mirror="reflect", batch_size=2)
    runtime = Runtime(tta=tta)
    tiled = predict_image(image, net, plan, NORM, output="logits", runtime=runtime)
    c, m = plan.context, plan.geometry.tile_multiple
    extra = [(-n) % m for n in plan.image_shape]
    padded = np.pad(image, ((0, 0),) + tuple((c, c + e) for e in extra), mode="reflect")
    whole = forward(net, normalise(padded, NORM)[None], runtime)[0].numpy()
    whole = whole[:, c : c + image.shape[1], c : c + image.shape[2]]
    np.testing.assert_allclose(tiled, whole, atol=1e-4, rtol=0)
    plain = predict_image(image, net, plan, NORM, output="logits")
    assert np.abs(plain - tiled).max() > 1e-3  # the augmentation does change the logits


def test_tta_transforms_are_undone_exactly() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    for name, transforms in TTA_TRANSFORMS.items():
        outs = {tuple(_apply(x, k, f).flatten().tolist()) for k, f in transforms}
        assert len(outs) == len(transforms), f"{name} transforms are distinct"
        for k, f in transforms:
            assert torch.equal(_undo(_apply(x, k, f), k, f), x)


@pytest.mark.parametrize("precision", ["bf16"])  # fp16 on CPUs runs slow reference kernels: GPU test
def test_autocast_labels_agree_with_fp32(precision) -> None:
    image, net = _image((256, 256)), _unet(depth=4, width=16)
    plan = plan_tiles(image.shape[1:], unet_geometry(4, "same"), tile=128, mirror="reflect")
    fp32 = predict_image(image, net, plan, NORM, runtime=Runtime())
    amp = predict_image(image, net, plan, NORM, runtime=Runtime(precision=precision))
    assert (fp32 == amp).mean() >= 0.999
    logits = predict_image(image, net, plan, NORM, output="logits", runtime=Runtime(precision=precision))
    assert logits.dtype == np.float32  # cast back before the argmax


def test_channels_last_gives_the_same_logits() -> None:
    net = _unet()
    batch = normalise(_image((64, 96)), NORM)[None]
    plain = forward(net, batch, Runtime())
    nhwc = forward(prepare_module(_unet(), Runtime(channels_last=True)), batch, Runtime(channels_last=True))
    torch.testing.assert_close(nhwc, plain, atol=1e-5, rtol=1e-5)


def test_device_resolution(monkeypatch) -> None:
    assert resolve_device("cpu", 3) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [resolve_device("auto", i) for i in range(6)] == [f"cuda:{i % 4}" for i in range(6)]
    assert resolve_device("cuda:2", 0) == "cuda:2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # a batch job given one GPU
    assert resolve_device("auto", 5) == "cuda:0"
    assert Runtime.from_config(InferenceConfig(device="auto"), 1).channels_last is True
    assert Runtime.from_config(InferenceConfig(device="cpu", channels_last=False)).channels_last is False


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_amp_labels_agree_with_cpu_fp32(precision) -> None:
    image, net = _image((512, 512)), _unet(depth=4, width=16)
    plan = plan_tiles(image.shape[1:], unet_geometry(4, "same"), tile=256, mirror="reflect", batch_size=4)
    cpu = predict_image(image, net, plan, NORM)
    gpu_rt = Runtime.from_config(InferenceConfig(device="cuda", precision=precision))
    gpu = predict_image(image, prepare_module(_unet(depth=4, width=16), gpu_rt), plan, NORM, runtime=gpu_rt)
    assert (cpu == gpu).mean() >= 0.999


@pytest.mark.gpu
def test_gpu_batch_size_from_free_memory() -> None:
    from pipeline.runtime import choose_batch_size

    rt = Runtime.from_config(InferenceConfig(device="cuda"))
    assert choose_batch_size(prepare_module(_unet(4, 16), rt), rt, (512, 512), 1) > 1
