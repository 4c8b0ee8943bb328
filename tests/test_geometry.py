from hypothesis import given
from hypothesis import strategies as st

from pipeline.geometry import Box

coords = st.integers(-50, 50)
sizes = st.integers(0, 40)
boxes = st.builds(lambda o, s: Box(o, s), st.tuples(coords, coords), st.tuples(sizes, sizes))


@given(boxes, boxes)
def test_intersection_is_contained_in_both(a: Box, b: Box) -> None:
    c = a.intersect(b)
    if not c.empty:
        assert a.contains(c) and b.contains(c)
    # every pixel of both boxes is in the intersection
    for y in range(c.offset[0], c.stop[0]):
        assert a.offset[0] <= y < a.stop[0] and b.offset[0] <= y < b.stop[0]


@given(boxes, st.integers(0, 20), st.integers(0, 20))
def test_grow_adds_margins_on_each_side(box: Box, lo: int, hi: int) -> None:
    g = box.grow(lo, hi)
    assert g.offset == tuple(o - lo for o in box.offset)
    assert g.stop == tuple(s + hi for s in box.stop)
    assert g.contains(box)


@given(boxes, st.tuples(st.integers(1, 60), st.integers(1, 60)))
def test_clip_stays_inside_the_image(box: Box, shape: tuple[int, int]) -> None:
    c = box.clip(shape)
    assert all(o >= 0 for o in c.offset)
    assert all(s <= n for s, n in zip(c.stop, shape)) or c.empty


def test_relative_to_and_slices() -> None:
    b = Box((10, 20), (3, 4))
    assert b.relative_to((8, 20)) == Box((2, 0), (3, 4))
    assert b.slices() == (slice(10, 13), slice(20, 24))
    assert b.size == 12 and b.stop == (13, 24)
