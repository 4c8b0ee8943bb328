"""Instance labels across block seams: the NumPy kernels and their Dask wrapper against
``scipy.ndimage.label`` on the whole array (equal up to a permutation of ids)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from pipeline.instance_labels import InstanceSpec, instance_ids, resolve_objects
from pipeline.instances import (
    ID_DTYPE,
    Relabelling,
    block_stats,
    connectivity_rank,
    grow,
    neighbour_offsets,
    reduce_stats,
)
from tests.helpers import reference_instances, same_up_to_relabelling

RANKS = {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}


reference = reference_instances


def blocked(class_ids: np.ndarray, chunks: tuple[int, ...], spec: InstanceSpec) -> tuple[np.ndarray, Relabelling]:
    array = da.from_array(class_ids, chunks=chunks)
    objects = resolve_objects(array, spec)
    return instance_ids(array, spec, objects).compute(scheduler="synchronous"), objects


def blobs(rng: np.random.Generator, shape: tuple[int, ...], classes: int, sigma: float = 1.5) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    edges = np.quantile(field, np.linspace(0, 1, classes + 1)[1:-1])
    return np.digitize(field, edges).astype(np.uint8)


def test_same_up_to_relabelling_is_a_bijection_check() -> None:
    a = np.array([[0, 1, 1], [2, 0, 3]])
    assert same_up_to_relabelling(a, np.array([[0, 7, 7], [5, 0, 2**40]]))
    assert not same_up_to_relabelling(a, np.array([[0, 7, 7], [7, 0, 2]]))  # two objects merged
    assert not same_up_to_relabelling(a, np.array([[0, 7, 8], [5, 0, 2]]))  # one object split
    assert not same_up_to_relabelling(a, np.array([[4, 7, 7], [5, 0, 2]]))  # background labelled
    assert not same_up_to_relabelling(a, a[:, :2])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(5, 60), st.integers(5, 60)),
    chunks=st.tuples(st.integers(3, 17), st.integers(3, 17)),
    neighbours=st.sampled_from([4, 8]),
    classes=st.sampled_from([(1,), (1, 2), (0, 2)]),
)
def test_2d_equals_whole_array_label(seed, shape, chunks, neighbours, classes) -> None:
    class_ids = blobs(np.random.default_rng(seed), shape, 3, sigma=1.0)
    ids, objects = blocked(class_ids, chunks, InstanceSpec(classes, neighbours))
    expected = reference(class_ids, classes, neighbours)
    assert ids.dtype == ID_DTYPE
    assert same_up_to_relabelling(ids, expected)
    assert sorted(np.unique(ids[ids > 0])) == list(range(1, objects.count + 1))  # sequential
    assert np.array_equal(objects.classes[ids[ids > 0].astype(np.int64)], class_ids[ids > 0])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    chunks=st.tuples(st.integers(3, 9), st.integers(4, 9), st.integers(4, 9)),
    neighbours=st.sampled_from([6, 18, 26]),
)
def test_3d_equals_whole_array_label(seed, chunks, neighbours) -> None:
    class_ids = blobs(np.random.default_rng(seed), (13, 17, 19), 2, sigma=0.8)
    ids, _ = blocked(class_ids, chunks, InstanceSpec((1,), neighbours))
    assert same_up_to_relabelling(ids, reference(class_ids, (1,), neighbours))


@pytest.mark.parametrize("neighbours,expected", [(4, 20), (8, 1)])
def test_a_diagonal_crossing_only_block_corners(neighbours, expected) -> None:
    """A one-pixel diagonal meets each 5 x 5 block's neighbour only at a corner."""
    class_ids = np.eye(20, dtype=np.uint8)
    ids, objects = blocked(class_ids, (5, 5), InstanceSpec((1,), neighbours))
    assert objects.count == expected
    assert same_up_to_relabelling(ids, reference(class_ids, (1,), neighbours))


@pytest.mark.parametrize("neighbours,expected", [(6, 12), (18, 12), (26, 1)])
def test_a_3d_diagonal_through_block_corners(neighbours, expected) -> None:
    class_ids = np.zeros((12, 12, 12), np.uint8)
    class_ids[np.arange(12), np.arange(12), np.arange(12)] = 1
    ids, objects = blocked(class_ids, (3, 3, 3), InstanceSpec((1,), neighbours))
    assert objects.count == expected
    assert same_up_to_relabelling(ids, reference(class_ids, (1,), neighbours))


def test_objects_of_two_classes_touching_stay_apart() -> None:
    class_ids = np.zeros((10, 10), np.uint8)
    class_ids[:, :5], class_ids[:, 5:] = 1, 2
    ids, objects = blocked(class_ids, (4, 4), InstanceSpec((1, 2), 8))
    assert objects.count == 2 and list(objects.classes) == [-1, 1, 2]
    assert len(np.unique(ids)) == 2


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), min_size=st.integers(1, 30), chunks=st.integers(3, 15))
def test_min_size_counts_whole_objects_across_blocks(seed, min_size, chunks) -> None:
    class_ids = blobs(np.random.default_rng(seed), (40, 45), 2, sigma=1.0)
    ids, objects = blocked(class_ids, (chunks, chunks), InstanceSpec((1,), 8, min_size=min_size))
    assert same_up_to_relabelling(ids, reference(class_ids, (1,), 8, min_size))
    assert np.array_equal(objects.areas[1:], np.bincount(ids.ravel().astype(np.int64))[1:])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 4),
    chunks=st.tuples(st.integers(4, 12), st.integers(4, 12)),
    neighbours=st.sampled_from([4, 8]),
)
def test_growth_tiled_equals_growth_of_the_whole_array(seed, steps, chunks, neighbours) -> None:
    """Objects (class 2) grow into a border class (1) the same with a halo as on the whole array."""
    class_ids = blobs(np.random.default_rng(seed), (37, 41), 3, sigma=1.2)
    ungrown, _ = blocked(class_ids, chunks, InstanceSpec((2,), neighbours))
    grown, _ = blocked(class_ids, chunks, InstanceSpec((2,), neighbours, grow_into=(1,), grow_by=steps))
    whole = grow(ungrown, class_ids, (1,), steps, RANKS[neighbours])
    assert np.array_equal(grown, whole)
    assert np.array_equal(grown[class_ids == 2], ungrown[class_ids == 2])  # objects keep their pixels
    assert not np.any(grown[(class_ids == 0)])  # never into other classes
    assert np.any(grown != ungrown) or not np.any((class_ids == 1) & (ungrown == 0))


def test_growth_is_geodesic_and_breaks_ties_by_the_smaller_id() -> None:
    class_ids = np.array([[2, 1, 1, 1, 2], [0, 0, 0, 0, 0], [2, 1, 0, 1, 1]])
    ids = np.array([[5, 0, 0, 0, 3], [0, 0, 0, 0, 0], [7, 0, 0, 0, 0]], np.uint64)
    grown = grow(ids, class_ids, (1,), 5, rank=1)
    assert grown.tolist() == [[5, 5, 3, 3, 3], [0, 0, 0, 0, 0], [7, 7, 0, 0, 0]]


def test_ids_beyond_32_bits_are_kept() -> None:
    """A block's labels map to uint64 ids; ids past 2^32 (a volume of many blocks) survive."""
    class_ids = np.zeros((8, 8), np.uint8)
    class_ids[1:3, 1:3] = 1
    class_ids[5:7, 5:7] = 1
    spec = InstanceSpec((1,), 4)
    high = np.array([0, 2**32 + 5, 2**40 + 1], ID_DTYPE)
    objects = Relabelling([high], np.array([-1, 1, 1]), np.array([0, 4, 4]))
    ids = instance_ids(da.from_array(class_ids, chunks=8), spec, objects).compute()
    assert ids.dtype == np.uint64 and set(np.unique(ids)) == {0, 2**32 + 5, 2**40 + 1}


def test_neighbour_offsets_count_each_pair_once() -> None:
    assert len(neighbour_offsets(2, 1)) == 2 and len(neighbour_offsets(2, 2)) == 4
    assert len(neighbour_offsets(3, 1)) == 3 and len(neighbour_offsets(3, 2)) == 9
    assert len(neighbour_offsets(3, 3)) == 13


def test_connectivity_is_checked_against_the_dimensions() -> None:
    assert connectivity_rank(2, 8) == 2 and connectivity_rank(3, 18) == 2
    with pytest.raises(ValueError, match="connectivity 6 is not a 2D neighbourhood; expected 4 or 8"):
        connectivity_rank(2, 6)


def test_object_stats_reduced_over_blocks_equal_regionprops(rng) -> None:
    from skimage.measure import regionprops_table

    class_ids = blobs(rng, (50, 60), 2)
    ids, _ = blocked(class_ids, (13, 17), InstanceSpec((1,), 8))
    image = rng.random((2, 50, 60))
    parts = []
    for y in range(0, 50, 13):
        for x in range(0, 60, 17):
            parts.append(block_stats(ids[y : y + 13, x : x + 17], (y, x), image[:, y : y + 13, x : x + 17]))
    stats = reduce_stats(parts)
    props = regionprops_table(
        ids.astype(np.int64), np.moveaxis(image, 0, -1), properties=("label", "area", "bbox", "centroid", "intensity_mean")
    )
    assert np.array_equal(stats.ids, props["label"])
    assert np.array_equal(stats.area, props["area"])
    for k in range(4):
        assert np.array_equal(np.concatenate([stats.lower, stats.upper], axis=1)[:, k], props[f"bbox-{k}"])
    assert np.allclose(stats.centroid(), np.stack([props["centroid-0"], props["centroid-1"]], 1), atol=1e-12)
    assert np.allclose(stats.mean_intensity(), np.stack([props["intensity_mean-0"], props["intensity_mean-1"]], 1))
