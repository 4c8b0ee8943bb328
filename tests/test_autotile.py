"""tiling.tile: auto: legal, within memory and the activation limit, fastest for the cluster."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.autotile import BLOCK_COST_PIXELS, CPU_PASS_LIMIT, TOLERANCE, TileBudget, choose_tile
from pipeline.errors import TilingError
from pipeline.models.unet import unet_geometry
from pipeline.tiling import NetworkGeometry, plan_tiles

GIB = 2**30


def per_pixel(bytes_per_px: float, largest_per_px: float = 0.0, slots: int = 2, memory: int = 4 * GIB) -> TileBudget:
    return TileBudget(
        memory=memory,
        task_bytes=lambda edge: bytes_per_px * edge * edge,
        largest_bytes=lambda edge: largest_per_px * edge * edge,
        slots=slots,
    )


def brute_force_time(shape: tuple[int, int], tile: int, geo: NetworkGeometry, slots: int) -> float:
    """The busiest slot's computed pixels, blocks assigned largest first, from the real plan."""
    plan = plan_tiles(shape, geo, tile=tile, mirror="reflect")
    costs = sorted((sum(t.read.size for t in b.tiles) + BLOCK_COST_PIXELS for b in plan.blocks()), reverse=True)
    loads = [0] * slots
    for c in costs:
        loads[loads.index(min(loads))] += c
    return max(loads)


def test_an_8192_image_on_two_slots_gets_sixteen_equal_blocks() -> None:
    geo = unet_geometry(4, "same")
    choice = choose_tile((8192, 8192), geo, per_pixel(600.0, 128.0, slots=2, memory=6 * GIB))
    assert choice.tile == 2048  # 2720 has the same overlap but leaves a slot idle: 9 big blocks on 2
    assert brute_force_time((8192, 8192), 2048, geo, 2) < brute_force_time((8192, 8192), 2720, geo, 2)
    assert choice.task_bytes == 600.0 * 2272**2


def test_memory_bounds_the_tile_and_says_so() -> None:
    geo = unet_geometry(4, "same")
    choice = choose_tile((8192, 8192), geo, per_pixel(600.0, slots=1, memory=GIB))
    largest = max(t for t in range(16, 8192, 16) if 600.0 * (t + 224) ** 2 <= GIB)
    assert 600.0 * (choice.tile + 224) ** 2 <= GIB
    assert choice.limit.startswith(f"tiles above {largest} px exceed memory: 1.0 GiB per task")
    # a smaller tile only where the estimates are within 2%: less memory for the same speed
    assert choice.tile == largest or "within 2% of the fastest estimate" in choice.limit


def test_no_tensor_reaches_the_slow_kernel_limit() -> None:
    geo = NetworkGeometry(halo=35)
    choice = choose_tile((20000, 20000), geo, per_pixel(10.0, largest_per_px=128.0, slots=1, memory=64 * GIB))
    largest = max(t for t in range(1, 20000) if 128.0 * (t + 70) ** 2 < 2**31)
    assert 128.0 * (choice.tile + 70) ** 2 < 2**31
    found = re.match(r"tiles above (\d+) px exceed a tensor of 2 GiB \(slow kernels beyond\)", choice.limit)
    assert found and 0.98 * largest <= int(found[1]) <= largest  # candidates on a grid this coarse


def test_a_cpu_pass_stays_within_its_live_tensor_limit() -> None:
    geo = unet_geometry(4, "same")
    budget = TileBudget(
        memory=64 * GIB, task_bytes=lambda e: 600.0 * e * e, largest_bytes=lambda e: 128.0 * e * e,
        slots=1, pass_bytes=lambda e: 468.0 * e * e, pass_limit=CPU_PASS_LIMIT,
    )  # fmt: skip
    choice = choose_tile((8192, 8192), geo, budget)
    largest = max(t for t in range(16, 8192, 16) if 468.0 * (t + 224) ** 2 <= CPU_PASS_LIMIT)
    assert choice.tile <= largest and f"tiles above {largest} px exceed 1024 MiB of live tensors" in choice.limit
    gpu = TileBudget(memory=64 * GIB, task_bytes=budget.task_bytes, largest_bytes=budget.largest_bytes, slots=1)
    assert choose_tile((8192, 8192), geo, gpu).tile > choice.tile  # no such limit on a GPU


def test_a_model_whose_memory_is_unknown_gets_tiles_up_to_1024() -> None:
    budget = TileBudget(memory=GIB, task_bytes=lambda e: None, largest_bytes=lambda e: None, slots=1)
    assert choose_tile((8192, 8192), unet_geometry(4, "same"), budget).tile <= 1024


def test_a_small_image_is_one_tile_and_a_fixed_size_model_gets_its_only_tile() -> None:
    assert choose_tile((300, 200), unet_geometry(4, "same"), per_pixel(100.0, slots=1)).tile == 304
    fixed = NetworkGeometry(halo=10, shift_period=4, size_min=128, size_max=128)
    plan = plan_tiles((300, 200), fixed, tile=choose_tile((300, 200), fixed, per_pixel(100.0)).tile, mirror="reflect")
    assert plan.read_shape == (128, 128)  # its only input size


def test_no_legal_tile_is_a_clear_error() -> None:
    geo = NetworkGeometry(halo=70, shift_period=4, size_min=128, size_max=128)
    with pytest.raises(TilingError, match="tiling.tile: auto: no tile size is a legal input"):
        choose_tile((300, 300), geo, per_pixel(100.0))


geometries = st.sampled_from(
    [
        NetworkGeometry(halo=3),
        unet_geometry(2, "same"),
        unet_geometry(3, "valid"),
        NetworkGeometry(halo=7, shift_period=4, size_min=12, size_step=6),
        NetworkGeometry(halo=8, size_min=16, size_step=16, shift_period=16, size_max=512),
    ]
)


@settings(deadline=None, max_examples=60)
@given(
    geo=geometries,
    shape=st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
    bytes_per_px=st.floats(1.0, 2000.0),
    memory=st.integers(1 << 20, 8 * GIB),
    slots=st.integers(1, 8),
)
def test_the_choice_is_legal_fits_and_no_legal_tile_that_fits_is_faster(geo, shape, bytes_per_px, memory, slots) -> None:
    budget = per_pixel(bytes_per_px, slots=slots, memory=memory)
    try:
        choice = choose_tile(shape, geo, budget)
    except TilingError:
        return
    plan = plan_tiles(shape, geo, tile=choice.tile, mirror="reflect")  # legal, or it raises
    read = choice.tile + 2 * plan.context
    smallest_legal = min(t for t in range(geo.tile_multiple, 4096, geo.tile_multiple) if _legal(shape, t, geo))
    assert bytes_per_px * read**2 <= memory or choice.tile == smallest_legal
    best = brute_force_time(shape, choice.tile, geo, slots)
    for t in range(geo.tile_multiple, min(choice.tile, 1024), geo.tile_multiple):
        if _legal(shape, t, geo) and math.ceil(max(shape) / t) <= 40:
            # The choice is the smallest candidate within TOLERANCE of the fastest candidate, and
            # candidates are a grid (plus even splits): a smaller legal tile off that grid may be
            # faster than the choice, but not by more than the tolerance.
            faster_bound = best / (1 + TOLERANCE)
            assert brute_force_time(shape, t, geo, slots) >= faster_bound or not _fits(shape, t, geo, bytes_per_px, memory)


def _legal(shape: tuple[int, int], t: int, geo: NetworkGeometry) -> bool:
    try:
        plan_tiles(shape, geo, tile=t, mirror="reflect")
    except TilingError:
        return False
    return True


def _fits(shape: tuple[int, int], t: int, geo: NetworkGeometry, bytes_per_px: float, memory: int) -> bool:
    plan = plan_tiles(shape, geo, tile=t, mirror="reflect")
    return bytes_per_px * (t + 2 * plan.context) ** 2 <= memory


def test_the_tile_stops_growing_with_the_image_once_the_halo_is_cheap() -> None:
    """A worker's memory must not grow with the image: beyond the sizes that need smaller
    tiles to keep every pass busy, the choice is the same for any image."""
    geo = unet_geometry(1, "same")  # a halo of a few pixels
    budget = per_pixel(40.0, slots=2, memory=64 * GIB)
    tiles = {n: choose_tile((n, n), geo, budget).tile for n in (16384, 32768, 65536, 131072)}
    assert max(tiles.values()) <= 1.1 * min(tiles.values()), tiles  # the memory within ~20%
    assert tiles[131072] < 4096  # not the largest that fits: that would save a few per mille
