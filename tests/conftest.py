"""Shared fixtures."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.io.cache import CACHE_DIR
from pipeline.io.ownership import KEY_ENV


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session", autouse=True)
def signing_key(tmp_path_factory) -> str:
    """A signing key of the test session's own (inherited by `pipeline` subprocesses)."""
    path = str(tmp_path_factory.mktemp("key") / "signing.key")
    previous = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = path
    yield path
    if previous is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = previous


@pytest.fixture(scope="session", autouse=True)
def measurement_cache(tmp_path_factory) -> str:
    """Runtime measurements cached in the session's own folder, not the user's cache."""
    path = str(tmp_path_factory.mktemp("cache"))
    previous = os.environ.get(CACHE_DIR)
    os.environ[CACHE_DIR] = path
    yield path
    if previous is None:
        os.environ.pop(CACHE_DIR, None)
    else:
        os.environ[CACHE_DIR] = previous


def pytest_collection_modifyitems(config, items) -> None:
    """GPU tests run where a CUDA device is present and are skipped (with a reason) elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
