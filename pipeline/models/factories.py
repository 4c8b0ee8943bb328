"""Resolve a model factory named in a workflow or a model description, safely.

``custom``'s ``factory: "package.module:callable"`` and a bioimage.io description's
``architecture`` name Python callables that the pipeline then calls with keyword arguments
from the same file. A shared workflow or a downloaded description could name
``os.system`` with ``kwargs: {command: ...}``, or ``torch.load`` with a pickle. So a name is
resolved without calling anything, and accepted only when it is

* a subclass of ``torch.nn.Module`` (from any package), or
* a plain Python function defined by the user's own code: never the standard library,
  builtins, or a package this pipeline itself depends on (torch, numpy, dask, ...), whose
  functions load files and run commands.

A standard-library module is refused before it is imported (importing some runs code).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as metadata
import inspect
import re
import sys
from typing import Any

from torch import nn

from ..errors import ModelError

DISTRIBUTION = "gigaseg-pipeline"
# Used when the installed metadata cannot be read (e.g. running from a source tree).
FALLBACK_DEPENDENCIES = frozenset(
    "torch numpy scipy dask distributed zarr tifffile imagecodecs pydantic pydantic_core yaml "
    "safetensors PIL cloudpickle fsspec toolz partd msgpack psutil tornado zict tblib click "
    "packaging numcodecs sympy networkx jinja2 filelock pipeline setuptools pip".split()
)


def resolve_factory(dotted: str, field: str, origin: str) -> Any:
    """The class or function ``package.module.attr`` (or ``package.module:attr``), checked.

    ``field`` names the workflow field in messages; ``origin`` says who named it.
    """
    module_name, attr = _split(dotted)
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in ("builtins", "__main__"):
        raise ModelError(
            f"{field}: {origin} names {dotted!r} from the Python standard library; expected an "
            f"nn.Module subclass or a function of your own package"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ModelError(
            f"{field}: cannot import {dotted!r} ({exc}); it must be importable on every worker "
            f"(installed, or on PYTHONPATH)"
        ) from None
    check_factory(target, dotted, field, origin)
    return target


def check_factory(target: Any, dotted: str, field: str, origin: str, home: str | None = None) -> None:
    """Accept an nn.Module subclass, or a Python function defined outside stdlib and our dependencies.

    ``home``: the module the function must come from (an architecture file's own module).
    """
    if inspect.isclass(target):
        if issubclass(target, nn.Module):
            return
        raise ModelError(
            f"{field}: {origin} names {dotted!r}, a class that is not a torch.nn.Module subclass"
        )
    if not inspect.isfunction(target):
        raise ModelError(
            f"{field}: {origin} names {dotted!r}, a {type(target).__name__}; expected an "
            f"nn.Module subclass or a plain Python function"
        )
    defined_in = str(getattr(target, "__module__", "") or "")
    top = defined_in.split(".")[0]
    if home is not None and defined_in != home:
        raise ModelError(
            f"{field}: {origin} names {dotted!r}, which is {defined_in}.{target.__qualname__}, "
            f"not a function the architecture file defines"
        )
    if top in sys.stdlib_module_names or top in ("builtins", "") or top in dependency_modules():
        raise ModelError(
            f"{field}: {origin} names {dotted!r}, which is {defined_in}.{target.__qualname__} "
            f"from {'the standard library' if top in sys.stdlib_module_names else 'a library this pipeline uses'}; "
            f"expected an nn.Module subclass or a function of your own package"
        )


@functools.cache
def dependency_modules() -> frozenset[str]:
    """Top-level module names of this pipeline's installed dependency closure (and itself)."""
    try:
        names = _closure(DISTRIBUTION)
        by_module = metadata.packages_distributions()
    except Exception:
        return FALLBACK_DEPENDENCIES
    found = {module for module, dists in by_module.items() if any(_norm(d) in names for d in dists)}
    return frozenset(found | {"pipeline"}) if found else FALLBACK_DEPENDENCIES


def _closure(root: str) -> set[str]:
    seen: set[str] = set()
    todo = [_norm(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
            if match:
                todo.append(_norm(match.group(1)))
    return seen


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(dotted: str) -> tuple[str, str]:
    if ":" in dotted:
        module_name, _, attr = dotted.partition(":")
    else:
        module_name, _, attr = dotted.rpartition(".")
    if not module_name or not attr or not re.fullmatch(r"[A-Za-z_][\w.]*", f"{module_name}.{attr}"):
        raise ModelError(f"expected 'package.module:callable', got {dotted!r}")
    return module_name, attr
