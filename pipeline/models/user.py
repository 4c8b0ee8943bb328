"""Models the pipeline cannot see into: TorchScript, torch.export programs, user callables.

Their halo and shift period are declared in the workflow. One probe forward pass checks
the class count and measures the border trim; a torch.export program's dynamic shapes
give its legal input sizes when the workflow does not declare them.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import nn

from ..config import CustomConfig, ExportConfig, TorchScriptConfig
from ..errors import ModelError, first_line
from ..io import fs
from ..tiling import NetworkGeometry
from .factories import resolve_factory
from .pt2 import load_program
from .weights import apply_state_dict, load_state_dict_file

SizeRule = tuple[int, int, int | None]  # min, step, max


def load_torchscript(cfg: TorchScriptConfig, device: str) -> nn.Module:
    path = _existing(cfg.path)
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream, but it is what the user chose to give us.
            warnings.filterwarnings("ignore", message=".*is deprecated", category=DeprecationWarning)
            return torch.jit.load(io.BytesIO(fs.read_bytes(path)), map_location=device).eval()
    except Exception as exc:
        raise ModelError(f"model.path: {path} is not a TorchScript file: {first_line(exc)}") from None


def load_export(cfg: ExportConfig, device: str) -> tuple[nn.Module, SizeRule | None, int | None]:
    """The program's module, its spatial size rule and its fixed batch size (if static)."""
    path = _existing(cfg.path)
    program = load_program(path)  # never torch.export.load: it runs code from the file
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in _user_inputs(program)]
    if len(inputs) != 1:
        raise ModelError(f"model.path: {path}: expected a program with one input, got {len(inputs)}")
    shape = inputs[0].meta["val"].shape
    if len(shape) != 4:
        raise ModelError(f"model.path: {path}: expected an (N, C, H, W) input, got {len(shape)} axes")
    rules = [_size_rule(program, dim) for dim in shape[2:]]
    if rules[0] != rules[1]:
        raise ModelError(
            f"model.path: {path}: height and width accept different sizes ({rules[0]} vs "
            f"{rules[1]}); export with the same dynamic rule for both"
        )
    height, width = shape[2:]
    if not isinstance(height, int) and str(height) == str(width) and rules[0][2] != rules[0][0]:
        raise ModelError(
            f"model.path: {path}: height and width share one dynamic dimension ({height}), so the "
            f"program only takes square inputs, but border tiles are not square; export with a "
            f"Dim of its own for each, e.g. dynamic_shapes={{'x': {{2: Dim('h'), 3: Dim('w')}}}}"
        )
    batch = shape[0] if isinstance(shape[0], int) else None
    return ExportedModule(program.module()).to(device), rules[0], batch


class ExportedModule(nn.Module):
    """An exported program's module: already frozen for inference, so eval() leaves it be.

    ``torch.export`` modules refuse ``train()``/``eval()`` ("Calling train() is not supported
    yet"), which every runtime path calls on the models it is given.
    """

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def build_custom(cfg: CustomConfig) -> nn.Module:
    """``package.module:callable(**kwargs)``, with the state dict at ``path`` if given."""
    factory = resolve_factory(cfg.factory, "model.factory", "the workflow")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            module = factory(**cfg.kwargs)
        except Exception as exc:
            raise ModelError(
                f"model.kwargs: {cfg.factory}(**{cfg.kwargs}) failed: {first_line(exc)}"
            ) from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.factory: {cfg.factory} returned {type(module).__name__}, not an nn.Module")
    if cfg.path is not None:
        apply_state_dict(module, load_state_dict_file(cfg.path), cfg.path, cfg.factory)
    return module.eval()


def declared_geometry(
    cfg: TorchScriptConfig | ExportConfig | CustomConfig,
    module: nn.Module,
    device: str,
    file_rule: SizeRule | None = None,
) -> NetworkGeometry:
    """Declared halo and period; size rule declared, else from the file, else any size."""
    # A declared step without a minimum means multiples of the step (not 1 + n x step).
    size_min, size_step, size_max = file_rule or (cfg.size_step or 1, 1, None)
    rule = (cfg.size_min or size_min, cfg.size_step or size_step, cfg.size_max or size_max)
    label = cfg.path or (cfg.factory if isinstance(cfg, CustomConfig) else cfg.arch)
    trim = probe_trim(module, cfg.in_channels, cfg.num_classes, rule, 2 * cfg.halo + 2 * cfg.shift_period + 1, label, device)
    if trim > cfg.halo:
        raise ModelError(
            f"model.halo: {cfg.halo} px is smaller than the {trim} px the model itself crops "
            f"from each border (input - output) / 2; the halo must be at least {trim}"
        )
    name = fs.name(cfg.path) if cfg.path else getattr(cfg, "factory", "model")
    return NetworkGeometry(
        halo=cfg.halo,
        trim=trim,
        shift_period=cfg.shift_period,
        size_min=rule[0],
        size_step=rule[1],
        size_max=rule[2],
        name=f"{cfg.arch} model {name}",
    )


def probe_trim(
    module: nn.Module,
    in_channels: int,
    num_classes: int,
    rule: SizeRule,
    at_least: int,
    label: str,
    device: str,
) -> int:
    """One forward pass on a small legal input: output channels and the border trim."""
    size_min, size_step, size_max = rule
    size = size_min
    while size < max(64, at_least) and (size_max is None or size + size_step <= size_max):
        size += size_step
    try:
        y = _forward(module, in_channels, size, device)
    except Exception as exc:
        raise ModelError(
            f"model.path: {label} fails on a 1 x {in_channels} x {size} x {size} input "
            f"(model.in_channels, input size rule): {first_line(exc)}"
            f"{size_rule_hint(module, in_channels, size, device, rule)}"
        ) from None
    if not isinstance(y, torch.Tensor) or y.ndim != 4:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelError(f"model.path: {label}: expected a 4-D logits tensor (N, classes, H, W), got {got}")
    if y.shape[1] != num_classes:
        raise ModelError(f"model.num_classes: {num_classes}, but {label} outputs {y.shape[1]} channels")
    trim = _trim_of(y, size)
    if trim is None:
        raise ModelError(
            f"model.path: {label}: a {size} x {size} input gave a {y.shape[2]} x {y.shape[3]} "
            f"output; expected the same size or one smaller by an even border on both axes"
            f"{size_rule_hint(module, in_channels, size, device, rule)}"
        )
    return trim


def _trim_of(y: torch.Tensor, size: int) -> int | None:
    """The border a ``size`` input loses on each side, None if uneven or not square."""
    dh, dw = size - y.shape[2], size - y.shape[3]
    return None if dh != dw or dh < 0 or dh % 2 else dh // 2


def _forward(module: nn.Module, in_channels: int, size: int, device: str) -> Any:
    with torch.inference_mode():
        return module(torch.zeros(1, in_channels, size, size, device=device))


def size_rule_hint(module: nn.Module, in_channels: int, size: int, device: str, rule: SizeRule) -> str:
    """Which input sizes the model does take, found by trying, and the rule to declare.

    A network that pools (or strides) ``k`` times by 2 takes only multiples of ``2^k`` (others
    fail, or come out cropped), and shifts its output in steps of ``2^k``: the smallest power
    of two whose next two multiples both work, with the same border, is what ``size_step``,
    ``size_min`` and ``shift_period`` should say.
    """
    trims: dict[int, int | None] = {size: None}

    def trim(s: int) -> int | None:
        if s not in trims:
            try:
                y = _forward(module, in_channels, s, device)
                trims[s] = _trim_of(y, s) if isinstance(y, torch.Tensor) and y.ndim == 4 else None
            except Exception:
                trims[s] = None
        return trims[s]

    found = None
    for step in (2, 4, 8, 16, 32, 64, 128):
        first = -(-size // step) * step
        if trim(first) is not None and trim(first) == trim(first + step):
            found = step
            break
    listed = ", ".join(f"{s} {'works' if t is not None else 'fails'}" for s, t in sorted(trims.items()))
    if found is None:
        return f"; sizes tried: {listed}; none ran: check model.in_channels and what the model expects"
    declared = f"size_min {rule[0]}, size_step {rule[1]}" + (f", size_max {rule[2]}" if rule[2] else "")
    return (
        f"; sizes tried: {listed}: it takes multiples of {found} (declared now: {declared}); "
        f"declare size_min: {found}, size_step: {found} and shift_period: {found} (a network that "
        f"pools or strides by 2 n times needs multiples of 2^n in both)"
    )


class FixedBatch(nn.Module):
    """Runs a module exported for a fixed batch size on any number of tiles."""

    def __init__(self, module: nn.Module, batch: int) -> None:
        super().__init__()
        self.module, self.batch = module, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, x.shape[0], self.batch):
            part = x[start : start + self.batch]
            short = self.batch - part.shape[0]
            if short:
                part = torch.cat([part, part.new_zeros((short,) + part.shape[1:])])
            outputs.append(self.module(part)[: self.batch - short])
        return torch.cat(outputs)


def _size_rule(program: Any, dim: Any) -> SizeRule:
    if isinstance(dim, int):
        return (dim, 1, dim)
    expr = dim.node.expr
    symbols = list(expr.free_symbols)
    bounds = program.range_constraints.get(symbols[0]) if len(symbols) == 1 else None
    if bounds is None:
        raise ModelError(f"cannot read the legal input sizes ({expr}) of the exported program")
    step = int(expr.coeff(symbols[0]))
    lower = int(expr.subs(symbols[0], bounds.lower))
    upper = expr.subs(symbols[0], bounds.upper)
    size_max = int(upper) if upper.is_finite and int(upper) < 2**31 else None
    return (lower, max(1, step), size_max)


def _user_inputs(program: Any) -> set[str]:
    return set(program.graph_signature.user_inputs)


def _existing(path: str | None) -> str:
    if path is None:
        raise ModelError("model.path: file not found: None")
    with fs.storage_errors("model.path", path):
        if not fs.is_file(path):
            raise ModelError(f"model.path: file not found: {fs.redact(path)}")
    return path
