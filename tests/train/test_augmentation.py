"""Elastic deformation moves image and labels identically; labels stay valid class ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.train.augmentation import (
    deform,
    deform_pair,
    jitter_intensity,
    random_deformation,
    random_orientation,
)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.tuples(st.integers(8, 40), st.integers(8, 40)), sigma=st.floats(0, 12))
def test_labels_deformed_alone_equal_the_label_channel_of_the_deformed_pair(seed, shape, sigma) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, shape).astype(np.uint8)
    labels[rng.random(shape) > 0.9] = 255  # an ignore value
    image = rng.random((2,) + shape).astype(np.float32)
    field = random_deformation(shape, rng, grid=3, sigma=sigma)
    warped_image, warped_labels = deform_pair(image, labels, field)
    # the labels as one more channel of the image, deformed by nearest neighbour: the same field
    stacked = deform(np.concatenate([image, labels[None].astype(np.float32)]), field, order=0)
    assert np.array_equal(warped_labels, stacked[-1].astype(np.uint8))
    assert np.array_equal(warped_labels, deform(labels, field, order=0))
    assert warped_labels.dtype == np.uint8 and set(np.unique(warped_labels)) <= set(np.unique(labels))
    assert warped_image.shape == image.shape and warped_image.dtype == np.float32


def test_the_same_field_moves_an_image_and_its_labels_together() -> None:
    """A bright square and its label: after deformation the label covers the bright pixels."""
    rng = np.random.default_rng(3)
    image = np.zeros((1, 64, 64), np.float64)
    image[0, 20:40, 24:44] = 1.0
    labels = (image[0] > 0).astype(np.uint8)
    field = random_deformation((64, 64), rng, grid=3, sigma=6)
    warped_image, warped_labels = deform_pair(image, labels, field, image_order=0)
    assert np.array_equal(warped_image[0] > 0.5, warped_labels == 1)
    assert not np.array_equal(warped_labels, labels)  # it did move


def test_zero_displacement_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (17, 23))
    field = random_deformation(labels.shape, rng, sigma=0.0)
    assert np.array_equal(deform(labels, field, 0), labels)
    image = rng.random((1, 17, 23))
    assert np.allclose(deform(image, field, 1), image)


def test_displacements_are_smooth_and_of_the_asked_size() -> None:
    rng = np.random.default_rng(1)
    field = random_deformation((200, 200), rng, grid=3, sigma=10.0)
    steps = np.abs(np.diff(field.offsets, axis=-1)).max()
    assert steps < 1.0  # neighbouring pixels move almost together: no tearing
    assert 2.0 < field.offsets.std() < 25.0


def test_orientations_and_jitter_are_seeded() -> None:
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    image = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    assert np.array_equal(random_orientation(a).apply(image), random_orientation(b).apply(image))
    assert np.array_equal(jitter_intensity(image, a), jitter_intensity(image, b))
    turned = random_orientation(np.random.default_rng(2)).apply(image)
    assert sorted(turned.ravel()) == sorted(image.ravel())


def test_bad_orders_and_shapes_are_refused() -> None:
    field = random_deformation((5, 5), np.random.default_rng(0))
    with pytest.raises(ValueError, match="interpolation order 2"):
        deform(np.zeros((5, 5)), field, 2)
    with pytest.raises(ValueError, match="for a deformation of shape"):
        deform(np.zeros((4, 5)), field, 0)
