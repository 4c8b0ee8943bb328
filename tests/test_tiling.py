import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import TilingError
from pipeline.geometry import Box
from pipeline.models.unet import unet_geometry
from pipeline.tiling import NetworkGeometry, plan_tiles

geometries = st.sampled_from(
    [
        NetworkGeometry(halo=3),
        NetworkGeometry(halo=5, trim=5, size_min=11),
        unet_geometry(2, "same"),
        unet_geometry(2, "valid"),
        NetworkGeometry(halo=7, shift_period=4, size_min=12, size_step=6),
    ]
)


@st.composite
def plans(draw):
    geo = draw(geometries)
    m = geo.tile_multiple
    tile = m * draw(st.integers(1, max(1, 64 // m)))
    shape = (draw(st.integers(1, 150)), draw(st.integers(1, 150)))
    batch = draw(st.integers(1, 6))
    return plan_tiles(shape, geo, tile=tile, mirror="reflect", batch_size=batch)


@settings(max_examples=150, deadline=None)
@given(plans())
def test_write_boxes_partition_the_image(plan) -> None:
    owners = np.zeros(plan.image_shape, dtype=np.int32)
    tile_owners = np.zeros(plan.image_shape, dtype=np.int32)
    for block in plan.blocks():
        owners[block.write.slices()] += 1
        for tile in block.tiles:
            keep = tile.write.clip(plan.image_shape)
            assert not keep.empty, "no tile lies entirely outside the image"
            tile_owners[keep.slices()] += 1
    assert (owners == 1).all()
    assert (tile_owners == 1).all()


@settings(max_examples=150, deadline=None)
@given(plans())
def test_read_boxes_add_the_context_and_are_legal_inputs(plan) -> None:
    geo = plan.geometry
    assert plan.context >= geo.halo
    for block in plan.blocks():
        for tile in block.tiles:
            assert tile.read == tile.write.grow(plan.context)
            assert block.read.contains(tile.read)
            assert all(geo.is_legal_input(s) for s in tile.read.shape)
            # origins keep the pooling phase of whole-image inference
            assert all(o % geo.tile_multiple == 0 for o in tile.write.offset)
            # the network output covers the write box
            out = tile.read.grow(-geo.trim)
            assert out.contains(tile.write)


@settings(max_examples=100, deadline=None)
@given(plans())
def test_block_write_boxes_are_chunk_aligned(plan) -> None:
    for block in plan.blocks():
        for o, s, b, n in zip(block.write.offset, block.write.shape, plan.block_shape, plan.image_shape):
            assert o % b == 0
            assert s == b or o + s == n


def test_last_tile_shrinks_to_the_smallest_legal_size() -> None:
    plan = plan_tiles((1531, 2049), unet_geometry(4, "same"), tile=512, mirror="reflect")
    rows, cols = plan.tile_extents
    assert rows == ((0, 512), (512, 512), (1024, 512))  # 507 rows left: 512 covers them
    assert cols[-1] == (2048, 16)  # one column left: the smallest legal tile


def test_image_smaller_than_a_tile_gets_one_small_tile() -> None:
    plan = plan_tiles((20, 37), unet_geometry(3, "same"), tile=1024, mirror="symmetric")
    assert plan.tile == (24, 40)
    assert plan.n_blocks == 1 and plan.n_tiles == 1


def test_illegal_tile_lists_the_nearest_legal_sizes() -> None:
    with pytest.raises(TilingError, match=r"tiling.tile: 1000 .* multiples of 16.*992, 1008"):
        plan_tiles((4096, 4096), unet_geometry(4, "same"), tile=1000, mirror="reflect")


def test_context_is_the_smallest_legal_one_above_the_halo() -> None:
    same = plan_tiles((4096, 4096), unet_geometry(4, "same"), tile=1024, mirror="reflect")
    assert (same.geometry.halo, same.context, same.read_shape) == (107, 112, (1248, 1248))
    valid = plan_tiles((4096, 4096), unet_geometry(4, "valid"), tile=384, mirror="reflect")
    # the paper's tile: a 572 x 572 input gives a 388 x 388 output around a 384 write box
    assert valid.read_shape == (572, 572) and valid.context == 94


def test_halo_smaller_than_the_receptive_field_is_an_error() -> None:
    with pytest.raises(TilingError, match=r"model.halo: 50 px is smaller .*\(107 px\)"):
        plan_tiles((512, 512), unet_geometry(4, "same"), tile=256, mirror="reflect", halo=50)


def test_halo_larger_than_the_tile_is_an_error() -> None:
    with pytest.raises(TilingError, match=r"model.halo: 300 px is larger than allowed"):
        plan_tiles((512, 512), unet_geometry(4, "same"), tile=256, mirror="reflect", halo=300)


def test_declared_halo_adds_context() -> None:
    plan = plan_tiles((512, 512), unet_geometry(4, "same"), tile=256, mirror="reflect", halo=130)
    assert plan.context == 136


def test_batch_size_groups_tiles_into_square_blocks() -> None:
    plan = plan_tiles((1000, 1000), NetworkGeometry(halo=4), tile=100, mirror="reflect", batch_size=6)
    assert plan.block_tiles == (2, 3)
    assert plan.block_shape == (200, 300)
    assert plan.grid == (5, 4)
    assert plan.block((4, 3)).write == Box((800, 900), (200, 100))
    assert len(plan.block((4, 3)).tiles) == 2


def test_fixed_size_model_gets_the_one_tile_that_fits() -> None:
    geo = NetworkGeometry(halo=10, shift_period=4, size_min=128, size_max=128)
    plan = plan_tiles((300, 200), geo, tile=108, mirror="reflect")
    assert plan.tile == (108, 108) and plan.read_shape == (128, 128)
    with pytest.raises(TilingError, match=r"legal input sizes: exactly 128.*largest tile that fits is 108"):
        plan_tiles((300, 200), geo, tile=112, mirror="reflect")


def test_size_max_caps_the_tile() -> None:
    geo = NetworkGeometry(halo=8, size_min=16, size_step=16, shift_period=16, size_max=512)
    assert plan_tiles((4000, 4000), geo, tile=496, mirror="reflect").read_shape == (512, 512)
    with pytest.raises(TilingError, match="up to 512"):
        plan_tiles((4000, 4000), geo, tile=1024, mirror="reflect")


@settings(deadline=None, max_examples=50)
@given(plans())
def test_block_indices_and_tile_counts_match_the_blocks(plan) -> None:
    blocks = plan.blocks()
    assert plan.block_indices() == [b.index for b in blocks]
    assert [plan.tiles_in(b.index) for b in blocks] == [len(b.tiles) for b in blocks]
