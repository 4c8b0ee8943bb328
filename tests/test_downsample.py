import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.downsample import downsample, level_offset, level_scale, level_shapes


def reference_mode(labels: np.ndarray) -> np.ndarray:
    """Window by window with np.unique: the most frequent id of the pixels each 2 x 2
    window holds (fewer at odd ends), ties to the smallest id."""
    *lead, h, w = labels.shape
    out = np.zeros((*lead, -(-h // 2), -(-w // 2)), dtype=labels.dtype)
    for index in np.ndindex(*lead):
        for i in range(out.shape[-2]):
            for j in range(out.shape[-1]):
                window = labels[index][2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                values, counts = np.unique(window, return_counts=True)
                out[index][i, j] = values[counts == counts.max()].min()
    return out


labels_2d_3d = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.uint32]),
    shape=hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9),
    elements=st.integers(0, 4),
)


@given(labels=labels_2d_3d)
def test_mode_equals_a_window_by_window_reference(labels) -> None:
    got = downsample(labels, "mode")
    np.testing.assert_array_equal(got, reference_mode(labels))
    assert got.dtype == labels.dtype


@given(labels=labels_2d_3d)
def test_nearest_keeps_every_second_pixel_from_the_first(labels) -> None:
    np.testing.assert_array_equal(downsample(labels, "nearest"), labels[..., ::2, ::2])


def test_mode_breaks_ties_to_the_smallest_id_and_keeps_a_majority() -> None:
    labels = np.array([[3, 1, 2, 2], [1, 3, 2, 5]], dtype=np.uint8)
    np.testing.assert_array_equal(downsample(labels, "mode"), [[1, 2]])


def test_a_leading_z_axis_is_not_downsampled() -> None:
    labels = np.arange(3 * 5 * 4).reshape(3, 5, 4) % 3
    assert downsample(labels, "mode").shape == (3, 3, 2)


def test_levels_halve_y_and_x_until_one_chunk_holds_the_level() -> None:
    assert level_shapes((1000, 300), (256, 256)) == [(1000, 300), (500, 150), (250, 75)]
    assert level_shapes((7, 1000, 300), (1, 256, 256))[-1] == (7, 250, 75)
    assert level_shapes((100, 100), (256, 256)) == [(100, 100)]


@given(level=st.integers(0, 8))
def test_a_level_pixel_spans_its_window_and_mode_sits_at_its_centre(level) -> None:
    assert level_scale(level) == 2**level
    assert level_offset(level, "nearest") == 0
    # the centre of full-resolution pixels 0 .. 2^level - 1
    assert level_offset(level, "mode") == pytest.approx(np.mean(np.arange(2**level)))
