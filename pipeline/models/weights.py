"""State dicts from ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``.

Neither format runs code when loaded: arbitrary pickles are refused with a message that
says how to save plain weights instead.
"""

from __future__ import annotations

import io
import pickle

import torch
from torch import nn

from ..errors import ModelError
from ..io import fs


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    with fs.storage_errors("model.path", path):
        if not fs.is_file(path):
            raise ModelError(f"model.path: file not found: {fs.redact(path)}")
        data = fs.read_bytes(path)
    path = fs.redact(path)
    if fs.suffix(path).lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"model.path: {path} is not a safetensors file: {exc}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"model.path: {path} is not a plain state dict: it holds Python objects that "
            f"weights_only loading refuses to unpickle ({str(exc).splitlines()[0]}); save it "
            f"with torch.save(model.state_dict(), path) or as .safetensors"
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/... for non-checkpoints
        raise ModelError(f"model.path: {path} is not a torch weights file: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            f"model.path: {path}: expected a state dict (parameter name -> tensor), got "
            f"{type(state).__name__}"
        )
    return state


def apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], path: str, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise ModelError(f"model.path: {path} does not fit {what}: {detail}") from None
