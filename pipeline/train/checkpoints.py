"""Writing trained checkpoints: safetensors weights and their description
(:mod:`pipeline.io.checkpoints`), which ``pipeline run`` loads from ``model.path`` alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from safetensors.torch import save as save_safetensors
from torch import nn

from ..io import fs
from ..io.checkpoints import FORMAT, write_metadata


def save_checkpoint(weights: str, module: nn.Module, model: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """Weights first (floating point as float16: half the size; loading widens them back),
    then the description: a description never names missing weights."""
    state = {
        k: (v.detach().to("cpu").half() if v.is_floating_point() else v.detach().to("cpu")).contiguous()
        for k, v in module.state_dict().items()
    }
    fs.put_bytes(weights, save_safetensors(state, metadata={"format": FORMAT}))
    write_metadata(weights, model, extra)
