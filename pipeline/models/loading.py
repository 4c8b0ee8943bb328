"""Build or load the network a workflow names, with its geometry and identity.

* ``unet`` / ``dilated``: the built-in architectures; ``path`` is a state dict loaded with
  ``weights_only=True`` (arbitrary pickles are refused), or null for fixed-seed untrained
  weights, which every report then calls untrained.
* ``torchscript``: a user's TorchScript file; its halo and size rules are declared in the
  workflow, and one probe forward pass checks classes and measures the border trim.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DilatedConfig, ModelConfig, TorchScriptConfig, UNetConfig
from ..errors import ModelError
from ..tiling import NetworkGeometry
from .dilated import DilatedContextNet, dilated_activation_bytes_per_pixel, dilated_geometry
from .unet import UNet, unet_activation_bytes_per_pixel, unet_geometry


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    geometry: NetworkGeometry
    num_classes: int
    in_channels: int
    identity: dict[str, Any] = field(compare=False)
    activation_bytes_per_pixel: float | None = None

    @property
    def untrained(self) -> bool:
        return bool(self.identity.get("untrained"))


def load_model(cfg: ModelConfig, device: str = "cpu", *, with_digest: bool = True) -> LoadedModel:
    """Model in eval mode on ``device``; ``with_digest`` hashes the weights file for the record."""
    if isinstance(cfg, TorchScriptConfig):
        loaded = _load_torchscript(cfg, device)
    else:
        loaded = _build_builtin(cfg, device)
    if with_digest and cfg.path is not None:
        loaded.identity["weights"]["sha256"] = file_sha256(cfg.path)
    return loaded


def architecture_params(cfg: ModelConfig) -> dict[str, Any]:
    skip = {"path", "halo", "normalize", "seed"}
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}


def build_module(cfg: UNetConfig | DilatedConfig) -> nn.Module:
    if isinstance(cfg, UNetConfig):
        return UNet(cfg.in_channels, cfg.num_classes, cfg.depth, cfg.width, cfg.padding, cfg.batch_norm)
    return DilatedContextNet(
        cfg.in_channels, cfg.num_classes, cfg.front_width, cfg.front_depth, cfg.context, cfg.padding
    )


def _build_builtin(cfg: UNetConfig | DilatedConfig, device: str) -> LoadedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = build_module(cfg)
    identity: dict[str, Any] = {"arch": cfg.arch, "params": architecture_params(cfg)}
    if cfg.path is None:
        identity["untrained"] = True
        identity["weights"] = {"untrained": True, "seed": cfg.seed}
    else:
        _load_state_dict(module, cfg)
        identity["weights"] = {"path": cfg.path}
    if isinstance(cfg, UNetConfig):
        geometry = unet_geometry(cfg.depth, cfg.padding)
        act = unet_activation_bytes_per_pixel(cfg.width, cfg.in_channels, cfg.num_classes)
    else:
        geometry = dilated_geometry(cfg.front_depth, cfg.padding)
        act = dilated_activation_bytes_per_pixel(
            cfg.front_width, cfg.in_channels, cfg.num_classes, cfg.context
        )
    module.eval().to(device)
    return LoadedModel(module, geometry, cfg.num_classes, cfg.in_channels, identity, act)


def _load_state_dict(module: nn.Module, cfg: UNetConfig | DilatedConfig) -> None:
    path = _existing(cfg.path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"model.path: {path} is not a plain state dict: it holds Python objects that "
            f"weights_only loading refuses to unpickle ({str(exc).splitlines()[0]}); save it "
            f"with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/... for non-checkpoints
        raise ModelError(f"model.path: {path} is not a torch weights file: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"model.path: {path}: expected a state dict, got {type(state).__name__}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise ModelError(
            f"model.path: {path} does not fit arch {cfg.arch} with "
            f"{architecture_params(cfg)}: {detail}"
        ) from None


def _load_torchscript(cfg: TorchScriptConfig, device: str) -> LoadedModel:
    path = _existing(cfg.path)
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream, but it is what the user chose to give us.
            warnings.filterwarnings("ignore", message=".*is deprecated", category=DeprecationWarning)
            module = torch.jit.load(path, map_location=device)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.path: {path} is not a TorchScript file: {first}") from None
    module.eval()
    trim = _probe_trim(module, cfg, device)
    if trim > cfg.halo:
        raise ModelError(
            f"model.halo: {cfg.halo} px is smaller than the {trim} px the model itself crops "
            f"from each border (input - output) / 2 of {path}; the halo must be at least {trim}"
        )
    geometry = NetworkGeometry(
        halo=cfg.halo,
        trim=trim,
        shift_period=cfg.shift_period,
        size_min=cfg.size_min,
        size_step=cfg.size_step,
        name=f"TorchScript model {Path(path).name}",
    )
    identity = {"arch": "torchscript", "params": architecture_params(cfg), "weights": {"path": path}}
    return LoadedModel(module, geometry, cfg.num_classes, cfg.in_channels, identity, None)


def _probe_trim(module: nn.Module, cfg: TorchScriptConfig, device: str) -> int:
    """One forward pass on a small legal input: output channels and the border trim."""
    size = cfg.size_min
    while size < max(64, 2 * cfg.halo + 2 * cfg.shift_period + 1):
        size += cfg.size_step
    x = torch.zeros(1, cfg.in_channels, size, size, device=device)
    try:
        with torch.inference_mode():
            y = module(x)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model.path: {cfg.path} fails on a 1 x {cfg.in_channels} x {size} x {size} input "
            f"(model.in_channels, size_min/size_step): {first}"
        ) from None
    if not isinstance(y, torch.Tensor) or y.ndim != 4:
        raise ModelError(
            f"model.path: {cfg.path}: expected a 4-D logits tensor (N, classes, H, W), got "
            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
        )
    if y.shape[1] != cfg.num_classes:
        raise ModelError(
            f"model.num_classes: {cfg.num_classes}, but {cfg.path} outputs {y.shape[1]} channels"
        )
    dh, dw = size - y.shape[2], size - y.shape[3]
    if dh != dw or dh < 0 or dh % 2:
        raise ModelError(
            f"model.path: {cfg.path}: a {size} x {size} input gave a {y.shape[2]} x {y.shape[3]} "
            f"output; expected the same size or one smaller by an even border on both axes"
        )
    return dh // 2


def _existing(path: str | None) -> str:
    if path is None or not Path(path).is_file():
        raise ModelError(f"model.path: file not found: {path}")
    return path


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
