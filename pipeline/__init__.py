"""Segment gigapixel images with mirrored overlap-tile inference on Dask.

The Python interface (:mod:`pipeline.api`): ``open_image``, ``open_labels``, ``open_probabilities`` and ``run``,
imported on first use so that ``import pipeline`` (and the command line) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["open_image", "open_labels", "open_probabilities", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        # By name, not an import statement: the modules below import ``pipeline`` for its
        # version, and must not (to the import contracts) depend on the API above them.
        return getattr(importlib.import_module("pipeline.api"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
