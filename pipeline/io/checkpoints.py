"""Trained checkpoints: safetensors weights plus a small JSON file saying what they are.

``models/isbi_unet.safetensors`` holds the weights (no code runs when loading them) and
``models/isbi_unet.json`` beside it the ``model`` section that rebuilds the network
(architecture and its parameters, classes, channels, normalisation), the class names and
colours, and how it was trained (data, figures). A workflow then needs only
``model: {path: models/isbi_unet.safetensors}``: the section is filled in from the file
(:func:`expand_model_section`); keys the workflow gives must agree with it, except
``normalize``, ``halo`` and ``storage_options``, which a workflow may set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import ModelError
from . import fs

FORMAT = "gigaseg-checkpoint"
VERSION = 1
OVERRIDABLE = {"normalize", "halo", "storage_options", "path"}


def metadata_path(weights: str) -> str:
    """``x.safetensors`` -> ``x.json`` beside it."""
    return fs.sibling(weights, f"{fs.stem(weights)}.json")


def write_metadata(weights: str, model: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """The description beside ``weights`` (``model``: the workflow's model section without
    its path; ``extra``: classes, training data and figures)."""
    document = {"format": FORMAT, "version": VERSION, "model": {k: v for k, v in model.items() if k != "path"}, **extra}
    fs.put_bytes(metadata_path(weights), (json.dumps(document, indent=2) + "\n").encode())


def read_metadata(weights: str) -> dict[str, Any] | None:
    """The checkpoint's description, or None when ``weights`` has none beside it."""
    path = metadata_path(weights)
    if fs.suffix(weights).lower() != ".safetensors" or not fs.is_file(path):
        return None
    try:
        document = json.loads(fs.read_bytes(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: {fs.redact(path)}: not a readable checkpoint description: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("model"), dict):
        raise ModelError(f"model.path: {fs.redact(path)}: expected a {FORMAT} description with a model section")
    return document


def expand_model_section(section: Mapping[str, Any], weights: str) -> dict[str, Any]:
    """The workflow's model section completed from the checkpoint beside ``weights``
    (resolved path); unchanged when there is no checkpoint description."""
    document = read_metadata(weights)
    if document is None:
        return dict(section)
    stored: dict[str, Any] = document["model"]
    merged = dict(stored)
    for key, value in section.items():
        if key in OVERRIDABLE or key not in stored:
            merged[key] = value
        elif stored[key] != value:
            raise ModelError(
                f"model.{key}: {value!r}, but the checkpoint {fs.redact(weights)} was trained with {stored[key]!r}; "
                f"leave model.{key} out (the checkpoint says it)"
            )
    return merged


def _names(names: list[Any], shown: int = 4) -> str:
    """``a, b, c`` or, for a long list, ``63 images (a, ..., z)``: one line on the console."""
    if not names:
        return "?"
    if len(names) <= shown:
        return ", ".join(map(str, names))
    return f"{len(names)} images ({names[0]}, ..., {names[-1]})"


def describe_training(weights: str | None) -> str | None:
    """One line on what a checkpoint was trained on and what its validation scored, or None."""
    if not weights:
        return None
    try:
        document = read_metadata(weights)
    except ModelError:
        return None
    training = (document or {}).get("training")
    if not isinstance(training, dict):
        return None
    data, figures = (v if isinstance(v := training.get(key), dict) else {} for key in ("data", "figures"))
    text = f"{fs.name(weights)}: trained by pipeline train on {_names(data.get('images') or [])}"
    if data.get("validation") and isinstance(figures.get("mean_iou"), (int, float)):
        text += (
            f"; held-out {_names(data['validation'])}: mIoU {100 * figures['mean_iou']:.1f}% "
            f"(epoch {figures.get('best_epoch', '?')})"
        )
    return text
