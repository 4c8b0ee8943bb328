"""A small JSON cache of measurements in the user's cache folder.

What a worker measured once on a machine (how fast a model's forward passes run in each
runtime setting) need not be measured at every run. Entries are keyed by what decides the
measurement; a cache that cannot be read or written is no error, only a new measurement.
Folder: ``$PIPELINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/gigaseg-pipeline``, else
``~/.cache/gigaseg-pipeline``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from . import fs

CACHE_DIR = "PIPELINE_CACHE_DIR"
MAX_ENTRIES = 256


def cache_folder() -> str:
    if os.environ.get(CACHE_DIR):
        return os.environ[CACHE_DIR]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "gigaseg-pipeline")


def lookup(name: str, key: str) -> Any | None:
    """The value stored under ``key`` in the cache file ``name``, or None."""
    return _read(name).get(key)


def store(name: str, key: str, value: Any) -> None:
    """Store ``value`` (JSON) under ``key``; the oldest entries go beyond MAX_ENTRIES."""
    entries = _read(name)
    entries.pop(key, None)
    entries[key] = value
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    try:
        fs.put_bytes(str(Path(cache_folder()) / f"{name}.json"), json.dumps(kept, indent=1).encode())
    except OSError:
        pass  # a read-only home: measured again next time


def _read(name: str) -> dict[str, Any]:
    try:
        data = json.loads(fs.read_bytes(str(Path(cache_folder()) / f"{name}.json")))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), for cache keys."""
    try:
        text = fs.read_bytes("/proc/cpuinfo").decode(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
