"""Build or load the network a workflow names, with its geometry and identity.

* ``unet`` / ``dilated``: the built-in architectures; ``path`` is a state dict (``.pt`` or
  ``.safetensors``), or null for fixed-seed untrained weights, which every report then
  calls untrained. Their geometry comes from their layers.
* ``torchscript`` / ``export`` / ``custom``: models the pipeline cannot see into; their halo
  is declared (and checked by :func:`check_declared_halo`), the trim measured.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import (
    BioimageioConfig,
    CustomConfig,
    DeclaredGeometry,
    DilatedConfig,
    ExportConfig,
    ModelConfig,
    NormalizeConfig,
    TorchScriptConfig,
    UNetConfig,
)
from ..errors import ModelError
from ..io import cache, fs
from ..tiling import NetworkGeometry
from .bioimageio import load_bioimageio
from .dilated import DilatedContextNet, dilated_geometry
from .probe import ProbeResult, probe_reach
from .unet import UNet, unet_geometry
from .user import (
    FixedBatch,
    build_custom,
    declared_geometry,
    load_export,
    load_torchscript,
    probe_trim,
)
from .weights import apply_state_dict, load_state_dict_file

PROBE_CACHE = "halo-probes"
MAX_PARAMETER_BYTES = 8 << 30  # fp32 weights; the largest segmentation networks use well under 1 GiB


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    geometry: NetworkGeometry
    num_classes: int
    in_channels: int
    identity: dict[str, Any] = field(compare=False)
    normalize: NormalizeConfig | None = None  # preprocessing the model file declares

    @property
    def untrained(self) -> bool:
        return bool(self.identity["weights"].get("untrained"))


def load_model(cfg: ModelConfig, device: str = "cpu", *, with_digest: bool = True) -> LoadedModel:
    """Model in eval mode on ``device``; ``with_digest`` hashes the weights file for the record."""
    if isinstance(cfg, (UNetConfig, DilatedConfig)):
        loaded = _build_builtin(cfg, device)
    elif isinstance(cfg, BioimageioConfig):
        loaded = _load_bioimageio(cfg, device)
    else:
        loaded = _load_declared(cfg, device)
    if with_digest and cfg.path is not None:
        loaded.identity["weights"]["sha256"] = file_sha256(cfg.path)
    return loaded


def architecture_params(cfg: ModelConfig) -> dict[str, Any]:
    skip = {"path", "halo", "normalize", "seed", "storage_options"}
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}


def build_module(cfg: UNetConfig | DilatedConfig) -> nn.Module:
    if isinstance(cfg, UNetConfig):
        return UNet(cfg.in_channels, cfg.num_classes, cfg.depth, cfg.width, cfg.padding, cfg.batch_norm, cfg.dims)
    return DilatedContextNet(
        cfg.in_channels, cfg.num_classes, cfg.front_width, cfg.front_depth, cfg.context, cfg.padding,
        context_width=cfg.context_width,
    )  # fmt: skip


def check_declared_halo(
    loaded: LoadedModel, cfg: ModelConfig, samples: Sequence[tuple[str, torch.Tensor]] = ()
) -> None:
    """Gradient-probe a model whose halo is declared; a reach beyond it is an error.

    ``samples`` are crops of the real image (normalised as the run will), probed besides
    random inputs.
    """
    if not needs_halo_probe(cfg):
        return
    result = _cached_probe(loaded, cfg, samples)
    if result.reach > loaded.geometry.halo:
        at_least = "at least " if result.hit_border else ""
        raise ModelError(
            f"model.halo: {loaded.geometry.halo} px is declared, but the gradient probe finds "
            f"output pixels depending on inputs {at_least}{result.reach} px away (on "
            f"{result.source}, phase {result.phase} of shift period "
            f"{loaded.geometry.shift_period}, {result.size} px probe input): tiles would show "
            f"seams; declare halo: {result.reach} or more"
        )


def _cached_probe(
    loaded: LoadedModel, cfg: ModelConfig, samples: Sequence[tuple[str, torch.Tensor]]
) -> ProbeResult:
    """The gradient probe (a forward and backward pass per phase and input: a minute for a
    TorchScript U-Net on 2 cores), remembered for the same file, geometry and samples where
    the file holds all the model's code (TorchScript, torch.export)."""
    if not isinstance(cfg, (TorchScriptConfig, ExportConfig)):  # their code may change under the same weights
        return probe_reach(loaded.module, loaded.geometry, cfg.in_channels, samples=samples)
    weights = loaded.identity["weights"].get("sha256")
    if weights is None and cfg.path is not None:
        weights = file_sha256(cfg.path)
    digest = hashlib.sha256()
    for name, sample in samples:
        digest.update(name.encode() + sample.float().numpy().tobytes())
    key = json.dumps(
        {
            "model": cfg.model_dump(mode="json", exclude={"storage_options", "path"}),
            "weights": weights,
            "geometry": repr(loaded.geometry),
            "samples": digest.hexdigest(),
            "torch": torch.__version__,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key.encode()).hexdigest()[:32]
    found = cache.lookup(PROBE_CACHE, key)
    if isinstance(found, dict):
        try:
            return ProbeResult(**found)
        except TypeError:
            pass
    result = probe_reach(loaded.module, loaded.geometry, cfg.in_channels, samples=samples)
    cache.store(PROBE_CACHE, key, asdict(result))
    return result


def needs_halo_probe(cfg: ModelConfig) -> bool:
    return isinstance(cfg, (DeclaredGeometry, BioimageioConfig))


def check_buildable(cfg: UNetConfig | DilatedConfig, limit_bytes: int = MAX_PARAMETER_BYTES) -> int:
    """Parameter count of a built-in network, counted without allocating it (meta device).

    A width or depth whose weights alone cannot be allocated is an error naming the field,
    not a MemoryError (or a machine swapping) halfway through building it.
    """
    with torch.device("meta"):
        count = sum(p.numel() for p in build_module(cfg).parameters())
    if count * 4 > limit_bytes:
        sizes = ", ".join(
            f"{k} {getattr(cfg, k)}"
            for k in ("width", "depth", "front_width", "front_depth", "num_classes")
            if hasattr(cfg, k)
        )
        raise ModelError(
            f"model: a {cfg.arch} with {sizes} has {count:,} parameters "
            f"({count * 4 / 2**30:.1f} GiB in fp32); expected at most "
            f"{limit_bytes / 2**30:.0f} GiB of weights"
        )
    return count


def _build_builtin(cfg: UNetConfig | DilatedConfig, device: str) -> LoadedModel:
    check_buildable(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = build_module(cfg)
    identity: dict[str, Any] = {"arch": cfg.arch, "params": architecture_params(cfg)}
    if cfg.path is None:
        identity["weights"] = {"untrained": True, "seed": cfg.seed}
    else:
        what = f"arch {cfg.arch} with {architecture_params(cfg)}"
        apply_state_dict(module, load_state_dict_file(cfg.path), cfg.path, what)
        identity["weights"] = {"path": fs.redact(cfg.path) if cfg.path else None}
    if isinstance(cfg, UNetConfig):
        geometry = unet_geometry(cfg.depth, cfg.padding, cfg.dims)
    else:
        geometry = dilated_geometry(cfg.front_depth, cfg.padding)
    module.eval().to(device)
    return LoadedModel(module, geometry, cfg.num_classes, cfg.in_channels, identity)


def _load_declared(cfg: TorchScriptConfig | ExportConfig | CustomConfig, device: str) -> LoadedModel:
    rule = None
    if isinstance(cfg, TorchScriptConfig):
        module = load_torchscript(cfg, device)
    elif isinstance(cfg, ExportConfig):
        module, rule, batch = load_export(cfg, device)
        if batch is not None:
            module = FixedBatch(module, batch)
    else:
        module = build_custom(cfg).to(device)
    geometry = declared_geometry(cfg, module, device, rule)
    if cfg.path is None:
        weights: dict[str, Any] = {"untrained": True, "seed": getattr(cfg, "seed", 0)}
    else:
        weights = {"path": fs.redact(cfg.path) if cfg.path else None}
    identity = {"arch": cfg.arch, "params": architecture_params(cfg), "weights": weights}
    return LoadedModel(module, geometry, cfg.num_classes, cfg.in_channels, identity)


def _load_bioimageio(cfg: BioimageioConfig, device: str) -> LoadedModel:
    module, desc = load_bioimageio(cfg, device)
    step = max(1, desc.size_step)
    rule = (desc.size_min, step, desc.size_min if desc.size_step == 0 else None)
    if cfg.in_channels != desc.in_channels:
        raise ModelError(f"model.in_channels: {cfg.in_channels}, but {cfg.path} expects {desc.in_channels}")
    label = f"{cfg.path} ({desc.name})"
    trim = probe_trim(module, cfg.in_channels, cfg.num_classes, rule, 2 * desc.halo + 1, label, device)
    halo = trim + desc.halo  # the description's halo is cropped from the output
    if cfg.halo != "auto":
        halo = max(halo, int(cfg.halo))
    geometry = NetworkGeometry(
        halo=halo,
        trim=trim,
        shift_period=cfg.shift_period or step,
        size_min=desc.size_min,
        size_step=step,
        size_max=rule[2],
        name=f"bioimage.io model {desc.name!r} (format {desc.version})",
    )
    identity = {
        "arch": "bioimageio",
        "params": architecture_params(cfg),
        "weights": {"path": fs.redact(cfg.path) if cfg.path else None, "description": desc.name, "format_version": desc.version},
    }
    return LoadedModel(module, geometry, cfg.num_classes, cfg.in_channels, identity, desc.normalize)


def file_sha256(path: str) -> str:
    return fs.file_sha256(path)
