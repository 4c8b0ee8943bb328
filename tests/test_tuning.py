"""The runtime a worker measures: the splits tried, the choice, the cache, the limits."""

from __future__ import annotations

import pytest

from pipeline.config import InferenceConfig, UNetConfig
from pipeline.models.loading import load_model
from pipeline.tuning import (
    Limits,
    RuntimeChoice,
    calibration_size,
    choose_runtime,
    max_slots_for_memory,
    splits,
)

MODEL = UNetConfig(arch="unet", depth=2, width=4, num_classes=2)
GEOMETRY = load_model(MODEL).geometry


@pytest.mark.parametrize(
    ("cores", "most", "expected"),
    [
        (2, 2, [(2, 1), (1, 2)]),
        (4, 4, [(4, 1), (2, 2), (1, 4)]),
        (6, 6, [(6, 1), (3, 2), (1, 4), (1, 6)]),
        (4, 1, [(1, 1), (1, 2), (1, 4)]),  # memory for one pass: more threads for it
        (1, 1, [(1, 1)]),
    ],
)
def test_the_splits_tried_fill_the_cores_and_respect_the_slots(cores, most, expected) -> None:
    found = splits(cores, most)
    assert found == expected
    assert all(s * t <= cores and s <= most for s, t in found)


def test_memory_bounds_the_passes_at_once() -> None:
    assert max_slots_for_memory(Limits(max_slots=8, cores=8, task_bytes=3 << 30, memory_bytes=10 << 30)) == 3
    assert max_slots_for_memory(Limits(max_slots=8, cores=8, task_bytes=20 << 30, memory_bytes=10 << 30)) == 1
    assert max_slots_for_memory(Limits(max_slots=8, cores=8, task_bytes=1 << 30, memory_bytes=None)) == 8


def test_configured_settings_measure_nothing() -> None:
    inference = InferenceConfig(channels_last=False, torch_threads=1)
    choice = choose_runtime(MODEL, inference, GEOMETRY, Limits(max_slots=2, cores=2, task_bytes=1, memory_bytes=None))
    assert choice == RuntimeChoice(slots=2, torch_threads=1, channels_last=False)
    assert "(as configured)" in choice.describe()


def test_auto_measures_every_candidate_once_then_the_cache_answers() -> None:
    limits = Limits(max_slots=2, cores=2, task_bytes=1, memory_bytes=None)
    first = choose_runtime(MODEL, InferenceConfig(), GEOMETRY, limits)
    assert first.source == "measured"
    names = [name for name, _ in first.measured]
    assert names == ["2x1 NHWC", "2x1 NCHW", f"1x2 {'NHWC' if first.channels_last else 'NCHW'}"]
    assert all(rate > 0 for _, rate in first.measured)
    chosen = f"{first.slots}x{first.torch_threads} {'NHWC' if first.channels_last else 'NCHW'}"
    assert dict(first.measured)[chosen] == max(rate for _, rate in first.measured)  # the fastest wins
    again = choose_runtime(MODEL, InferenceConfig(), GEOMETRY, limits)
    assert again.source == "cached"
    assert (again.slots, again.torch_threads, again.channels_last) == (first.slots, first.torch_threads, first.channels_last)
    assert "cached" in again.describe()


def test_the_calibration_input_is_a_legal_size_near_a_megapixel() -> None:
    size = calibration_size(GEOMETRY)
    assert GEOMETRY.is_legal_input(size) and 1000 <= size <= 1024
