"""bioimage.io model descriptions (rdf.yaml / bioimageio.yaml, format 0.4 and 0.5), read directly.

What the pipeline takes from the description:

* input axes (``bcyx`` in any order; 0.4 strings or 0.5 axis lists), channel count, and the
  spatial size rule ``min + n * step`` (0.4 ``shape: {min, step}``, 0.5 ``size: {min, step}``);
* the output halo (0.4 ``outputs[].halo``, 0.5 per-axis ``halo``): pixels the authors say
  to crop from each side, so the tile's context is at least that;
* preprocessing, turned into one image-wide normalisation: ``scale_range`` -> percentiles,
  ``zero_mean_unit_variance`` -> mean/std, ``scale_linear`` and the fixed variants as is.
  Statistics the description computes per sample are computed over the whole image
  here, never per tile (per-tile statistics make seams);
* weights: ``torchscript`` or ``pytorch_state_dict`` (architecture from a source file or an
  importable callable, loaded with ``weights_only``); sha256 checked when given.

Output post-processing that keeps the argmax (sigmoid, softmax) is dropped; a model with
one output channel is a binary model whose class 1 is ``output > threshold`` (the
description's ``binarize`` threshold when it has one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from torch import nn

from ..config import BioimageioConfig, NormalizeConfig
from ..errors import ModelError
from ..io import fs
from .factories import check_factory, resolve_factory
from .weights import apply_state_dict, load_state_dict_file

ARGMAX_PRESERVING = {"sigmoid", "softmax", "ensure_dtype"}


@dataclass(frozen=True)
class Description:
    """What the pipeline needs of a model description."""

    version: str
    input_axes: str  # e.g. "bcyx"
    output_axes: str
    in_channels: int
    out_channels: int | None
    size_min: int
    size_step: int  # 0: the input size is fixed at size_min
    halo: int
    normalize: NormalizeConfig | None
    threshold: float | None
    weights: dict[str, Any]
    folder: str  # a path or URL
    name: str


def read_description(path: str) -> Description:
    """The description at ``path``; ModelError for anything malformed, never a traceback."""
    try:
        return _read_description(path)
    except ModelError:
        raise
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise ModelError(
            f"model.path: {path}: preprocessing value {problem.get('input')!r}: expected "
            f"{problem['msg'].removeprefix('Value error, ')}"
        ) from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        raise ModelError(f"model.path: {path}: malformed model description ({type(exc).__name__}: {exc})") from None


def _read_description(path: str) -> Description:
    with fs.storage_errors("model.path", path):
        if not fs.is_file(path):
            raise ModelError(f"model.path: file not found: {fs.redact(path)}")
        text = fs.read_bytes(path)
    try:
        rdf = yaml.safe_load(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"model.path: {path} is not UTF-8 text; expected a bioimage.io rdf.yaml") from None
    except yaml.YAMLError as exc:
        raise ModelError(f"model.path: {path} is not valid YAML: {exc}") from None
    if not isinstance(rdf, dict) or rdf.get("type") != "model":
        raise ModelError(f"model.path: {path}: expected a bioimage.io model description (type: model)")
    version = str(rdf.get("format_version", ""))
    if not version.startswith(("0.4", "0.5")):
        raise ModelError(f"model.path: {path}: format_version {version!r} is not supported; expected 0.4.x or 0.5.x")
    inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"model.path: {path}: expected one input and one output tensor, got {len(inputs)} and {len(outputs)}"
        )
    reader = _read_v04 if version.startswith("0.4") else _read_v05
    fields = reader(inputs[0], outputs[0], path)
    pre = inputs[0].get("preprocessing") or []
    post = outputs[0].get("postprocessing") or []
    return Description(
        version=version,
        normalize=_normalization(pre, path),
        threshold=_threshold(post, path),
        weights=rdf.get("weights") or {},
        folder=fs.parent(path),
        name=str(rdf.get("name", fs.name(fs.parent(path)))),
        **fields,
    )


def _read_v04(inp: dict, out: dict, path: str) -> dict[str, Any]:
    in_axes, out_axes = str(inp.get("axes", "")), str(out.get("axes", ""))
    _check_axes(in_axes, out_axes, path)
    shape: Any = inp.get("shape")  # YAML; malformed values raise, read_description reports them
    if isinstance(shape, dict):
        mins, steps = list(shape["min"]), list(shape["step"])
    else:
        mins, steps = list(shape), [0] * len(shape)
    y, x = in_axes.index("y"), in_axes.index("x")
    size_min, size_step = _spatial_rule((mins[y], steps[y]), (mins[x], steps[x]), path)
    halo_list = out.get("halo") or [0] * len(out_axes)
    halo = max(int(halo_list[out_axes.index("y")]), int(halo_list[out_axes.index("x")]))
    out_channels = None
    out_shape = out.get("shape")
    if "c" in out_axes and isinstance(out_shape, list):
        out_channels = int(out_shape[out_axes.index("c")])
    elif "c" in out_axes and isinstance(out_shape, dict) and out_shape.get("scale") is not None:
        c = out_axes.index("c")
        if float(out_shape["scale"][c]) == 0.0:
            out_channels = int(round(2 * float(out_shape["offset"][c])))
    in_channels = int(mins[in_axes.index("c")]) if "c" in in_axes else 1
    return dict(
        input_axes=in_axes, output_axes=out_axes, in_channels=in_channels,
        out_channels=out_channels, size_min=size_min, size_step=size_step, halo=halo,
    )  # fmt: skip


def _read_v05(inp: dict, out: dict, path: str) -> dict[str, Any]:
    in_axes, in_sizes, in_channels = _axes_v05(inp.get("axes") or [], path)
    out_axes, _, out_channels = _axes_v05(out.get("axes") or [], path)
    _check_axes(in_axes, out_axes, path)
    size_min, size_step = _spatial_rule(in_sizes["y"], in_sizes["x"], path)
    halo = 0
    for axis in out.get("axes") or []:
        if axis.get("type") == "space" and axis.get("id", "x") in ("y", "x"):
            halo = max(halo, int(axis.get("halo", 0) or 0))
    return dict(
        input_axes=in_axes, output_axes=out_axes, in_channels=in_channels or 1,
        out_channels=out_channels, size_min=size_min, size_step=size_step, halo=halo,
    )  # fmt: skip


def _axes_v05(axes: list[dict], path: str) -> tuple[str, dict[str, tuple[int, int]], int | None]:
    letters, sizes, channels = "", {}, None
    for axis in axes:
        kind = axis.get("type")
        if kind == "batch":
            letters += "b"
        elif kind == "channel":
            letters += "c"
            channels = len(axis.get("channel_names") or []) or None
        elif kind == "space":
            axis_id = str(axis.get("id", "x"))
            letters += axis_id
            size = axis.get("size")
            if isinstance(size, int):
                sizes[axis_id] = (size, 0)
            elif isinstance(size, dict) and "min" in size:
                sizes[axis_id] = (int(size["min"]), int(size.get("step", 0)))
            else:
                sizes[axis_id] = (1, 1)  # a size referencing another tensor: the output side
        else:
            raise ModelError(f"model.path: {path}: axis type {kind!r} is not supported (2D images only)")
    return letters, sizes, channels


def _check_axes(in_axes: str, out_axes: str, path: str) -> None:
    for name, axes in (("input", in_axes), ("output", out_axes)):
        if "z" in axes or "t" in axes or not {"y", "x"} <= set(axes) or set(axes) - set("bcyx"):
            raise ModelError(
                f"model.path: {path}: {name} axes {axes!r} are not supported; expected 2D images "
                f"with axes among b, c, y, x"
            )


def _spatial_rule(y: tuple[int, int], x: tuple[int, int], path: str) -> tuple[int, int]:
    if y != x:
        raise ModelError(f"model.path: {path}: y and x accept different sizes ({y} vs {x}); expected the same rule")
    return int(y[0]), int(y[1])  # step 0: a fixed size


def _normalization(ops: list[dict], path: str) -> NormalizeConfig | None:
    kept = [op for op in ops if _op_name(op) != "ensure_dtype"]
    if not kept:
        return None
    if len(kept) > 1:
        names = ", ".join(_op_name(op) for op in kept)
        raise ModelError(f"model.path: {path}: preprocessing {names}: only one normalisation step is supported")
    op = kept[0]
    name, kwargs = _op_name(op), op.get("kwargs") or {}
    if name == "scale_range":
        low = float(kwargs.get("min_percentile", 0.0))
        high = float(kwargs.get("max_percentile", 100.0))
        return NormalizeConfig(percentiles=(low, high))
    if name == "zero_mean_unit_variance" and kwargs.get("mode", "per_sample") != "fixed":
        return NormalizeConfig(zscore=True)
    if name in ("zero_mean_unit_variance", "fixed_zero_mean_unit_variance"):
        return NormalizeConfig(mean=_floats(kwargs["mean"]), std=_floats(kwargs["std"]))
    if name == "scale_linear":
        gain, offset = kwargs.get("gain", 1.0), kwargs.get("offset", 0.0)
        gains = _floats(gain)
        offsets = _floats(offset)
        if isinstance(gains, tuple) or isinstance(offsets, tuple):
            n = max(len(v) for v in (gains, offsets) if isinstance(v, tuple))
            gains_t = gains if isinstance(gains, tuple) else (gains,) * n
            offsets_t = offsets if isinstance(offsets, tuple) else (offsets,) * n
            return NormalizeConfig(
                mean=tuple(-o / g for o, g in zip(offsets_t, gains_t)), std=tuple(1 / g for g in gains_t)
            )
        return NormalizeConfig(mean=-offsets / gains, std=1 / gains)
    raise ModelError(f"model.path: {path}: preprocessing {name!r} is not supported")


def _threshold(ops: list[dict], path: str) -> float | None:
    threshold = None
    for op in ops:
        name = _op_name(op)
        if name == "binarize":
            value: Any = (op.get("kwargs") or {}).get("threshold")
            threshold = float(value) if not isinstance(value, list) else None
            if threshold is None:
                raise ModelError(f"model.path: {path}: per-channel binarize thresholds are not supported")
        elif name not in ARGMAX_PRESERVING:
            raise ModelError(f"model.path: {path}: postprocessing {name!r} is not supported")
    return threshold


def _op_name(op: dict) -> str:
    return str(op.get("id") or op.get("name") or "")


def _floats(value: Any) -> float | tuple[float, ...]:
    if isinstance(value, list):
        return tuple(float(v) for v in value)
    return float(value)


def load_bioimageio(cfg: BioimageioConfig, device: str) -> tuple[nn.Module, Description]:
    """The model in eval mode, adapted to (N, C, H, W) in and (N, classes, H, W) out."""
    desc = read_description(cfg.path)
    kind = _choose_weights(cfg, desc)
    entry = desc.weights[kind]
    source = _local(desc, entry.get("source"), "weights source")
    _check_sha256(source, entry.get("sha256"), cfg.path)
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is deprecated", category=DeprecationWarning)
            try:
                module = torch.jit.load(io.BytesIO(fs.read_bytes(source)), map_location=device)
            except Exception as exc:
                raise ModelError(f"model.path: {source} is not a TorchScript file: {exc}") from None
    else:
        module = _build_architecture(desc, entry, cfg)
        apply_state_dict(module, load_state_dict_file(source), fs.redact(source), "the described architecture")
    module = AxesAdapter(module.eval(), desc.input_axes, desc.output_axes)
    module = BinaryFromOneChannel(module, desc.threshold if desc.threshold is not None else cfg.threshold)
    return module.to(device).eval(), desc


def _choose_weights(cfg: BioimageioConfig, desc: Description) -> str:
    available = [k for k in ("torchscript", "pytorch_state_dict") if k in desc.weights]
    if cfg.weights != "auto":
        if cfg.weights not in desc.weights:
            raise ModelError(
                f"model.weights: {cfg.path} has no {cfg.weights} weights; it has {sorted(desc.weights)}"
            )
        return cfg.weights
    if not available:
        raise ModelError(
            f"model.path: {cfg.path}: none of its weights ({sorted(desc.weights)}) can be run; "
            f"expected torchscript or pytorch_state_dict"
        )
    return available[0]


def _build_architecture(desc: Description, entry: dict, cfg: BioimageioConfig) -> nn.Module:
    """The described architecture, built only from a checked factory (see factories.py).

    An architecture given as a Python file shipped with the description runs that file's
    code, so it is refused unless the workflow says ``trust_code: true``.
    """
    path = cfg.path
    arch = entry.get("architecture")
    kwargs = entry.get("kwargs") or {}
    if isinstance(arch, dict):  # 0.5
        kwargs = arch.get("kwargs") or {}
        callable_name = str(arch.get("callable"))
        if arch.get("source"):
            factory = _from_file(desc, arch["source"], callable_name, cfg)
        else:
            factory = resolve_factory(f"{arch.get('import_from')}.{callable_name}", "model.path", path)
    elif isinstance(arch, str) and ":" in arch:  # 0.4 "file.py:Callable"
        file_name, callable_name = arch.split(":", 1)
        factory = _from_file(desc, file_name, callable_name, cfg)
    elif isinstance(arch, str):  # 0.4 "package.module.Callable"
        factory = resolve_factory(arch, "model.path", path)
    else:
        raise ModelError(f"model.path: {path}: pytorch_state_dict weights without an architecture")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ModelError(f"model.path: {path}: architecture kwargs must be a mapping of names to values")
    try:
        module = factory(**kwargs)
    except Exception as exc:
        raise ModelError(f"model.path: {path}: building the architecture failed: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.path: {path}: the architecture returned {type(module).__name__}, not an nn.Module")
    return module


def _from_file(desc: Description, source_name: Any, callable_name: str, cfg: BioimageioConfig) -> Any:
    source = _local(desc, source_name, "architecture source")
    if not cfg.trust_code:
        raise ModelError(
            f"model.path: {cfg.path}: its architecture is Python code shipped with the model "
            f"({fs.name(source)}); loading it runs that code. Read it, then set model.trust_code: "
            f"true to allow it, or use the description's torchscript weights (model.weights)"
        )
    if not fs.is_local(source):
        raise ModelError(
            f"model.path: {fs.redact(cfg.path)}: its architecture source {fs.name(source)} is in a "
            f"store; Python code is imported only from local files: copy the model folder, or "
            f"use its torchscript weights (model.weights: torchscript)"
        )
    name = f"bioimageio_arch_{hashlib.sha256(str(source).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, source)
    if spec is None or spec.loader is None:
        raise ModelError(f"model.path: {cfg.path}: cannot load the architecture source {source}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, callable_name):
        raise ModelError(f"model.path: {cfg.path}: {source} defines no {callable_name!r}")
    target = getattr(module, callable_name)
    check_factory(target, f"{fs.name(source)}:{callable_name}", "model.path", cfg.path, home=name)
    return target


def _local(desc: Description, source: Any, what: str) -> str:
    if isinstance(source, dict):
        source = source.get("source")
    if not isinstance(source, str) or "://" in source:
        raise ModelError(
            f"model.path: {desc.folder}: {what} {source!r} must be a file beside the description "
            f"(nothing is downloaded at run time)"
        )
    p = fs.join(desc.folder, *source.split("/"))
    if not fs.is_file(p):
        raise ModelError(f"model.path: {what} not found: {fs.redact(p)}")
    return p


def _check_sha256(source: str, expected: str | None, path: str) -> None:
    if not expected:
        return
    digest = fs.file_sha256(source)
    if digest != expected.lower():
        raise ModelError(f"model.path: {path}: {fs.name(source)} has sha256 {digest}, but the description says {expected}")


class AxesAdapter(nn.Module):
    """Feeds a model whose axes are in another order (or lack b/c) from (N, C, H, W)."""

    def __init__(self, module: nn.Module, input_axes: str, output_axes: str) -> None:
        super().__init__()
        self.module = module
        self.input_axes, self.output_axes = input_axes, output_axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_axes == "bcyx" and self.output_axes == "bcyx":
            return self.module(x)
        if "b" in self.input_axes:
            return _from_axes(self.module(_to_axes(x, self.input_axes)), self.output_axes)
        return torch.cat(  # no batch axis: one sample at a time
            [_from_axes(self.module(_to_axes(s[None], self.input_axes)), self.output_axes) for s in x]
        )


def _to_axes(x: torch.Tensor, axes: str) -> torch.Tensor:
    """(N, C, H, W) -> the model's axis order, dropping b (N = 1) or c (C = 1) it has none of."""
    source = "bcyx"
    if "c" not in axes:
        x, source = x[:, 0], "byx"
    if "b" not in axes:
        x, source = x[0], source.replace("b", "")
    return x.permute(*[source.index(a) for a in axes])


def _from_axes(y: torch.Tensor, axes: str) -> torch.Tensor:
    target = "bcyx"
    present = "".join(a for a in target if a in axes)
    y = y.permute(*[axes.index(a) for a in present])
    if "b" not in axes:
        y = y[None]
    if "c" not in axes:
        y = y[:, None]
    return y


class BinaryFromOneChannel(nn.Module):
    """One output channel ``p`` -> two logits whose argmax is ``p > threshold``; more pass."""

    def __init__(self, module: nn.Module, threshold: float) -> None:
        super().__init__()
        self.module, self.threshold = module, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x)
        if y.shape[1] != 1:
            return y
        return torch.cat([self.threshold - y, y - self.threshold], dim=1)
