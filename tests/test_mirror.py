import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.geometry import Box
from pipeline.mirror import mirror_indices, read_mirrored


@given(
    size=st.integers(1, 30),
    before=st.integers(0, 90),
    after=st.integers(0, 90),
    mode=st.sampled_from(["reflect", "symmetric"]),
)
def test_indices_equal_numpy_pad_even_past_a_whole_width(size, before, after, mode) -> None:
    line = np.arange(size)
    expected = np.pad(line, (before, after), mode=mode)
    got = line[mirror_indices(-before, size + after, size, mode)]
    np.testing.assert_array_equal(got, expected)


def test_symmetric_repeats_the_edge_and_reflect_does_not() -> None:
    assert list(mirror_indices(-2, 0, 4, "reflect")) == [2, 1]
    assert list(mirror_indices(-2, 0, 4, "symmetric")) == [1, 0]
    assert list(mirror_indices(4, 6, 4, "reflect")) == [2, 1]
    assert list(mirror_indices(4, 6, 4, "symmetric")) == [3, 2]


@given(
    h=st.integers(1, 25),
    w=st.integers(1, 25),
    oy=st.integers(-40, 40),
    ox=st.integers(-40, 40),
    bh=st.integers(1, 50),
    bw=st.integers(1, 50),
    mode=st.sampled_from(["reflect", "symmetric"]),
)
def test_read_box_equals_a_crop_of_the_padded_whole_image(h, w, oy, ox, bh, bw, mode) -> None:
    image = np.arange(2 * h * w).reshape(2, h, w)
    pad = 100
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode=mode)
    reads: list[tuple[slice, ...]] = []

    def read(s: tuple[slice, ...]) -> np.ndarray:
        reads.append(s)
        return image[(slice(None),) + s]

    got = read_mirrored(read, Box((oy, ox), (bh, bw)), (h, w), mode)
    expected = padded[:, oy + pad : oy + pad + bh, ox + pad : ox + pad + bw]
    np.testing.assert_array_equal(got, expected)
    assert len(reads) == 1  # one read of the bounding source region


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown mirror mode"):
        mirror_indices(0, 3, 3, "wrap")  # type: ignore[arg-type]
