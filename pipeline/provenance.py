"""What a run records about itself: resume fingerprints and the ``run.json`` document.

Fingerprints are recorded when a volume is created and compared by ``--resume``: a run
resumes only with the same input, model (weights hash), label-deciding workflow fields,
plan and pipeline version. ``run.json`` (beside the output, and summarised in the volume's
attributes) says what ran where, how fast, and what happened to every block. Neither holds
secrets: storage options and environment variables that name credentials are redacted,
URLs lose embedded credentials, and only the cluster's shape and job ids are recorded.
"""

from __future__ import annotations

import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .config import Workflow
from .io import fs
from .tiling import TilePlan

# Workflow fields that never change a label: where it goes, how it is scheduled, how the
# result is scored, and how many tiles share a forward pass.
# How fast, not what: the batch, the threads and the memory share (the plan, which they
# may change with tile: auto, is a fingerprint of its own; channels_last is resolved once per
# volume and kept for its resume).
NOT_LABEL_FIELDS = {
    "output": None,
    "evaluation": None,
    "cluster": None,
    "inference": {"batch_size", "torch_threads"},
    "tiling": {"memory_share"},
}
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|AUTH|PRIVATE|(^|_)KEY($|_)|ACCESS_KEY", re.IGNORECASE)
REDACTED = "<redacted>"
PACKAGES = ("torch", "numpy", "dask", "distributed", "zarr", "tifffile", "dask-jobqueue", "dask-kubernetes")


def label_fields(wf: Workflow) -> dict[str, Any]:
    """The resolved workflow fields that decide the labels."""
    dumped = wf.model_dump(mode="json")
    fields = {}
    for section, value in dumped.items():
        if section in NOT_LABEL_FIELDS and NOT_LABEL_FIELDS[section] is None:
            continue
        dropped = NOT_LABEL_FIELDS.get(section) or set()
        fields[section] = {k: v for k, v in value.items() if k not in dropped} if isinstance(value, dict) else value
    return _without_storage(_redacted_urls(fields))


def _without_storage(value: Any) -> Any:
    """Storage options say how to reach a file, never what is in it: not a label field."""
    if isinstance(value, dict):
        return {k: _without_storage(v) for k, v in value.items() if k != "storage_options"}
    return value


def _redacted_urls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redacted_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted_urls(v) for v in value]
    return fs.redact(value) if isinstance(value, str) else value


def _redacted_storage(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: fs.redact_options(v) if k == "storage_options" and isinstance(v, dict) else _redacted_storage(v)
            for k, v in value.items()
        }
    return value


def public_workflow(wf: Workflow) -> dict[str, Any]:
    """The resolved workflow as recorded (run.json, the volume's attributes), minus secrets.

    ``cluster.environment`` values and ``cluster.prologue`` assignments whose names look like
    credentials (``*_SECRET*``, ``*TOKEN*``, ``*PASSWORD*``, ``*_KEY``, ...) are redacted, and
    so are credential storage options and credentials embedded in URLs.
    """
    dumped = _redacted_storage(_redacted_urls(wf.model_dump(mode="json")))
    cluster = dumped.get("cluster", {})
    env = cluster.get("environment")
    if isinstance(env, dict):
        cluster["environment"] = {k: REDACTED if SECRET_NAME.search(k) else v for k, v in env.items()}
    if isinstance(cluster.get("prologue"), list):
        cluster["prologue"] = [_redact_line(line) for line in cluster["prologue"]]
    return dumped


def _redact_line(line: str) -> str:
    def hide(match: re.Match[str]) -> str:
        return f"{match.group(1)}={REDACTED}" if SECRET_NAME.search(match.group(1)) else match.group(0)

    return re.sub(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", hide, line)


def run_fingerprints(wf: Workflow, model_identity: dict[str, Any], plan: TilePlan) -> dict[str, Any]:
    skip = wf.tiling.skip
    if skip is not None and skip.mask is not None:  # the mask decides labels as the input does
        return {**_fingerprints(wf, model_identity, plan), "tiling.skip.mask": fs.fingerprint(skip.mask)}
    return _fingerprints(wf, model_identity, plan)


def _fingerprints(wf: Workflow, model_identity: dict[str, Any], plan: TilePlan) -> dict[str, Any]:
    return {
        "pipeline_version": __version__,
        "input": fs.fingerprint(wf.input.image_path),
        "model_weights": model_identity.get("weights", {}).get("sha256", "built in"),
        "workflow": label_fields(wf),
        "plan": {
            "image_shape": list(plan.image_shape),
            "block_shape": list(plan.block_shape),
            "tile": list(plan.tile),
            "mirror": plan.mirror,
        },
    }


def versions() -> dict[str, str]:
    found = {"pipeline": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def run_document(
    wf: Workflow,
    model_identity: dict[str, Any],
    run: dict[str, Any],
) -> dict[str, Any]:
    """The ``run.json`` document: ``run`` holds status, cluster, timings and block counts."""
    return {
        **run,
        "output": fs.redact(wf.output.path),
        "workflow_file": wf.source,
        "workflow_sha256": fs.file_sha256(wf.source) if fs.is_file(wf.source) else None,  # None: in memory
        "workflow": public_workflow(wf),
        "model": model_identity,
        "versions": versions(),
        "host": platform.node(),
        "command": fs.redact(" ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])),
    }
