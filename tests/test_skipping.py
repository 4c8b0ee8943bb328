"""``tiling.skip``: blocks that need no model are written as one class, and counted.

The mapping of a write box to a mask of any resolution and the per-block rules are checked
against brute force (Hypothesis); then ``pipeline run`` on a slide-like image that is
background in most blocks, with a low-resolution mask and with each rule: skipped blocks
hold the skip class (one the network never outputs), every other block equals the NumPy
whole-image box filter exactly, and the network's own log shows it ran on the computed
blocks only. Plan text, console counts, run.json and the volume's record count the same.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.cli import main
from pipeline.geometry import Box
from pipeline.skipping import SkipPlan, SkipRule, mask_box, mask_shape_problem, masked_blocks
from pipeline.tiling import NetworkGeometry, plan_tiles
from tests.helpers import box_filter_reference

# --- the mask mapping, brute force ---------------------------------------------------------


def _touched(n: int, m: int, a: int, b: int) -> set[int]:
    """Mask pixels (of m along an axis of n image pixels) whose footprint meets [a, b)."""
    return {j for j in range(m) if Fraction(j * n, m) < b and Fraction((j + 1) * n, m) > a}


@st.composite
def _axis(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(image pixels n, mask pixels m, box start a, box stop b): integer or fractional scales."""
    m = draw(st.integers(1, 40))
    if draw(st.booleans()):
        n = m * draw(st.integers(1, 12))  # an integer scale factor
    else:
        n = draw(st.integers(m, 400))
    a = draw(st.integers(0, n - 1))
    b = draw(st.integers(a + 1, n))
    return n, m, a, b


@settings(max_examples=300, deadline=None)
@given(rows=_axis(), cols=_axis())
def test_a_mask_pixel_is_touched_iff_its_footprint_meets_the_box(rows, cols) -> None:
    (n0, m0, a0, b0), (n1, m1, a1, b1) = rows, cols
    box = mask_box(Box((a0, a1), (b0 - a0, b1 - a1)), (n0, n1), (m0, m1))
    assert set(range(box.offset[0], box.stop[0])) == _touched(n0, m0, a0, b0)
    assert set(range(box.offset[1], box.stop[1])) == _touched(n1, m1, a1, b1)


@settings(max_examples=100, deadline=None)
@given(
    factor=st.integers(1, 8),
    mask_shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    tile=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_masked_blocks_equal_the_upsampled_mask_on_each_write_box(
    factor, mask_shape, tile, seed
) -> None:
    """Integer scale: a block is skipped iff the mask, upsampled to the image, is 0 over it."""
    mask = np.random.default_rng(seed).random(mask_shape) < 0.15
    image_shape = tuple(m * factor for m in mask_shape)
    plan = plan_tiles(image_shape, NetworkGeometry(halo=1), tile=tile, mirror="reflect")
    skipped = masked_blocks(
        plan.blocks(), image_shape, mask.shape, lambda box: bool(mask[box.slices()].any())
    )
    upsampled = np.kron(mask, np.ones((factor, factor), bool))
    expected = {b.index for b in plan.blocks() if not upsampled[b.write.slices()].any()}
    assert skipped == expected


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8, 2.5, 16, 32.7])
@pytest.mark.parametrize("rounding", [np.floor, np.ceil, np.round])
def test_every_pyramid_level_of_the_image_is_an_acceptable_mask(factor, rounding) -> None:
    for image_shape in [(1000, 1000), (1003, 517), (40000, 91234), (97, 5000), (3, 7)]:
        mask_shape = tuple(max(1, int(rounding(n / factor))) for n in image_shape)
        if any(m > n for m, n in zip(mask_shape, image_shape)):
            continue
        assert mask_shape_problem(mask_shape, image_shape) is None, (image_shape, mask_shape)


@pytest.mark.parametrize(
    ("mask_shape", "image_shape", "problem"),
    [
        ((8, 16), (64, 64), "its aspect ratio differs from the image's"),
        ((125, 130), (1000, 1000), "its aspect ratio differs"),  # 5 mask pixels off
        ((250, 100), (500, 1000), "its aspect ratio differs"),  # a transposed level
        ((65, 64), (64, 64), "no axis larger than the image's (axis 0 is)"),
        ((4, 4, 4), (64, 64), "expected a 2D mask"),
    ],
)
def test_masks_that_cannot_describe_the_image(mask_shape, image_shape, problem) -> None:
    assert problem in (mask_shape_problem(mask_shape, image_shape) or "")


# --- the rules, brute force ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.integers(0, 6), min_size=1, max_size=24),
    channels=st.sampled_from([1, 2, 3]),
    uniform=st.booleans(),
    below=st.none() | st.sampled_from([0.0, 1.0, 2.5, 7.0]),
    above=st.none() | st.sampled_from([-1.0, 0.0, 3.0, 5.5]),
)
def test_the_rules_as_defined(values, channels, uniform, below, above) -> None:
    raw = np.resize(np.asarray(values, np.uint8), (channels, 2, 4))
    flat = raw.ravel().tolist()
    expected = (
        (uniform and len(set(flat)) == 1)
        or (below is not None and all(v < below for v in flat))
        or (above is not None and all(v > above for v in flat))
    )
    assert SkipRule(0, uniform, below, above).skips(raw) == expected


def test_one_value_in_one_channel_makes_a_block_non_uniform_and_nan_is_never_skipped() -> None:
    raw = np.full((3, 8, 8), 240, np.uint8)
    rule = SkipRule(uniform=True, above=230)
    assert rule.skips(raw)
    raw[2, 7, 7] = 241
    assert not SkipRule(uniform=True).skips(raw) and rule.skips(raw)
    raw[1, 0, 0] = 12
    assert not rule.skips(raw)
    floats = np.full((1, 4, 4), 0.0, np.float32)
    floats[0, 1, 1] = np.nan
    assert not SkipRule(uniform=True, below=1.0, above=-1.0).skips(floats)
    assert not SkipRule().skips(np.zeros((1, 4, 4)))  # no rule: nothing is skipped


def test_the_plan_line() -> None:
    both = SkipPlan(SkipRule(0, above=230), frozenset({(0, 0), (1, 1)}), "tissue.png", (8, 8))
    assert both.describe(64) == (
        "mask tissue.png (8 x 8 px): 2 of 64 blocks skipped (written as class 0); "
        "rule above 230 checked per block (raw read box) at run time"
    )
    rules = SkipPlan(SkipRule(3, uniform=True, below=0.5))
    assert rules.describe(64) == (
        "rules uniform, below 0.5 checked per block (raw read box) at run time; "
        "skipped blocks written as class 3"
    )


# --- pipeline run ---------------------------------------------------------------------------

SHAPE, TILE, CONTEXT, SCALE = (256, 256), 32, 2, 8
GRID = (SHAPE[0] // TILE, SHAPE[1] // TILE)
BLOCKS = GRID[0] * GRID[1]
MEAN = 100  # model.normalize: class 0 where the box mean is above it, 1 below, never 2
WEIGHT = [[1], [-1], [0]]
SKIP_LABEL = 2


def _image() -> np.ndarray:
    """A slide: background 240, tissue, a bright noisy corner, black and dark-noise regions."""
    rng = np.random.default_rng(7)
    image = np.full(SHAPE, 240, np.uint8)
    image[64:160, 32:128] = rng.integers(0, 201, (96, 96))  # tissue: blocks (2..4, 1..3)
    image[100, 50] = 255  # in block (3, 1): the one a broken model fails on
    image[0:32, 192:256] = rng.integers(235, 255, (32, 64))  # bright noise: above, not uniform
    image[192:256, 192:256] = 0  # black: uniform only where a read box holds nothing else
    image[190:256, 0:66] = rng.integers(0, 5, (66, 66))  # dark noise: below 5
    return image


def _mask() -> np.ndarray:
    """1/8 scale tissue mask: the tissue, the black corner, one pixel touching block (5, 1)."""
    mask = np.zeros((SHAPE[0] // SCALE, SHAPE[1] // SCALE), np.uint8)
    mask[8:20, 4:16] = 255
    mask[20, 4] = 1
    mask[24:32, 24:32] = 255
    return mask


def _reference() -> np.ndarray:
    centred = _image()[None].astype(np.int64) - MEAN
    return box_filter_reference(centred, 2, np.array(WEIGHT), "reflect").argmax(0)


def _expected_skips(skip: dict) -> set[tuple[int, int]]:
    """Independently: the mask over each write box, the rules over each mirrored read box."""
    if "mask" in skip:
        mask = _mask()
        m = TILE // SCALE
        return {
            (i, j) for i in range(GRID[0]) for j in range(GRID[1])
            if not mask[i * m : (i + 1) * m, j * m : (j + 1) * m].any()
        }  # fmt: skip
    padded = np.pad(_image(), CONTEXT, mode="reflect")
    found = set()
    for i in range(GRID[0]):
        for j in range(GRID[1]):
            read = padded[
                i * TILE : (i + 1) * TILE + 2 * CONTEXT, j * TILE : (j + 1) * TILE + 2 * CONTEXT
            ]
            if (
                (skip.get("uniform") and read.min() == read.max())
                or ("below" in skip and read.max() < skip["below"])
                or ("above" in skip and read.min() > skip["above"])
            ):
                found.add((i, j))
    return found


def _expected_labels(skipped: set[tuple[int, int]]) -> np.ndarray:
    labels = _reference()
    for i, j in skipped:
        labels[i * TILE : (i + 1) * TILE, j * TILE : (j + 1) * TILE] = SKIP_LABEL
    return labels


def _workflow(tmp_path: Path, skip: dict | None, **changes: object) -> str:
    if not (tmp_path / "slide.tif").exists():  # rewriting would change the input's fingerprint
        tifffile.imwrite(tmp_path / "slide.tif", _image(), tile=(32, 32))
        Image.fromarray(_mask()).save(tmp_path / "tissue.png")
    doc: dict = {
        "input": {"path": "slide.tif"},
        "model": {
            "arch": "custom", "factory": "tests.helpers:SlowBoxFilter", "num_classes": 3, "halo": 2,
            "normalize": {"mean": MEAN, "std": 1},
            "kwargs": {"radius": 2, "weight": WEIGHT, "log": str(tmp_path / "forward.log"),
                       "broken_if": str(tmp_path / "broken"), "broken_above": 255 - MEAN},
        },
        "tiling": {"tile": TILE, **({"skip": {**skip, "label": SKIP_LABEL}} if skip is not None else {})},
        "output": {"path": "out/labels.zarr"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }  # fmt: skip
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        doc.setdefault(section, {})[key] = value
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(doc))
    return str(tmp_path / "wf.yaml")


def _forward_passes(tmp_path: Path) -> int:
    log = tmp_path / "forward.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _labels(tmp_path: Path) -> np.ndarray:
    return zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["0"][:]


def _record(tmp_path: Path) -> dict:
    return dict(zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r").attrs["pipeline"])


def _run_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "labels.run.json").read_text())


MODES = {
    "mask": ({"mask": "tissue.png"}, "mask {folder}/tissue.png (32 x 32 px): {n} of 64 blocks skipped (written as class 2)"),
    "above": ({"above": 230}, "rule above 230 checked per block (raw read box) at run time; skipped blocks written as class 2"),
    "uniform-below": (
        {"uniform": True, "below": 5},
        "rules uniform, below 5 checked per block (raw read box) at run time; skipped blocks written as class 2",
    ),
}  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
def test_skipped_blocks_hold_the_skip_class_and_the_model_never_saw_them(
    tmp_path, capsys, mode
) -> None:
    skip, plan_line = MODES[mode]
    skipped = _expected_skips(skip)
    # Each mode meets blocks that only it skips, and blocks its context keeps computed.
    assert {
        "mask": {(0, 6), (7, 0), (0, 3)} <= skipped
        and (5, 1) not in skipped
        and (7, 7) not in skipped,
        "above": {(0, 6), (0, 7), (0, 3)} <= skipped and not {(5, 1), (7, 7), (7, 0)} & skipped,
        "uniform-below": {(7, 7), (7, 0), (6, 1), (0, 3)} <= skipped
        and not {(6, 6), (0, 6)} & skipped,
    }[mode]
    computed = BLOCKS - len(skipped)

    assert main(["run", _workflow(tmp_path, skip)]) == 0
    out, err = capsys.readouterr()

    np.testing.assert_array_equal(_labels(tmp_path), _expected_labels(skipped))
    assert _forward_passes(tmp_path) == computed  # the network's own count: one pass per block
    assert f"context {CONTEXT} px per side" in out
    assert "skip       " + plan_line.format(folder=tmp_path, n=len(skipped)) in out
    assert (
        f"blocks     {BLOCKS}: {computed} computed, {len(skipped)} skipped (no model), 0 retried"
        in out
    )
    assert (
        f"blocks {BLOCKS}/{BLOCKS} ({len(skipped)} skipped) (tiles {BLOCKS}/{BLOCKS}) 100%" in err
    )
    counts = {
        "total": BLOCKS,
        "resumed": 0,
        "computed": computed,
        "skipped": len(skipped),
        "retried": 0,
        "failed": 0,
    }
    run = _run_json(tmp_path)
    assert run["status"] == "complete" and run["blocks"] == counts
    record = _record(tmp_path)
    assert record["status"] == "complete" and record["block_counts"] == counts
    assert record["workflow"]["tiling"]["skip"]["label"] == SKIP_LABEL
    # throughput counts the pixels the model computed, not the skipped ones
    rate = computed * TILE * TILE / run["timings"]["predict"] / 1e6
    assert run["megapixels_per_second"] == pytest.approx(rate, rel=0.02, abs=2e-4)


def test_without_skip_every_block_is_computed(tmp_path, capsys) -> None:
    """The reference the skipping runs are compared with is what a plain run writes."""
    assert main(["run", _workflow(tmp_path, None)]) == 0
    out, _ = capsys.readouterr()
    np.testing.assert_array_equal(_labels(tmp_path), _reference())
    assert _forward_passes(tmp_path) == BLOCKS and "skip  " not in out
    assert _run_json(tmp_path)["blocks"]["skipped"] == 0


def test_a_changed_mask_refuses_resume_and_the_same_one_resumes(tmp_path, capsys) -> None:
    wf = _workflow(tmp_path, {"mask": "tissue.png"})
    (tmp_path / "broken").touch()  # block (3, 1) fails on every try: the run stops, resumable
    assert main(["run", wf]) == 1
    capsys.readouterr()
    assert _record(tmp_path)["status"] == "running"
    mask = tmp_path / "tissue.png"
    shutil.copy2(mask, tmp_path / "kept.png")  # same bytes and time: the same fingerprint
    changed = _mask()
    changed[0, 0] = 255
    Image.fromarray(changed).save(mask)
    assert main(["run", wf, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "tiling.skip.mask changed (sha256:" in err, err
    for skip, named in (
        ({"mask": "tissue.png", "label": 1}, "workflow.tiling.skip.label changed (2 -> 1)"),
        (
            {"mask": "tissue.png", "above": 230},
            "workflow.tiling.skip.above changed (null -> 230.0)",
        ),
    ):
        doc = yaml.safe_load(Path(wf).read_text())
        doc["tiling"]["skip"] = skip
        Path(wf).write_text(yaml.safe_dump(doc))
        assert main(["run", wf, "--resume"]) == 2
        assert named in capsys.readouterr().err

    shutil.copy2(tmp_path / "kept.png", mask)
    (tmp_path / "broken").unlink()  # the fix
    done = set(
        zip(
            *np.nonzero(
                zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["blocks"][:]
            )
        )
    )
    (tmp_path / "forward.log").unlink(missing_ok=True)
    wf = _workflow(tmp_path, {"mask": "tissue.png"})
    assert main(["run", wf, "--resume"]) == 0, capsys.readouterr().err
    skipped = _expected_skips({"mask": "tissue.png"})
    np.testing.assert_array_equal(_labels(tmp_path), _expected_labels(skipped))
    counts = _run_json(tmp_path)["blocks"]
    assert counts["resumed"] == len(done) > 0
    assert counts["skipped"] == len(skipped - done) and counts["computed"] == BLOCKS - len(
        skipped | done
    )
    assert _forward_passes(tmp_path) == counts["computed"]


# --- pipeline plan: masks of other formats and scales --------------------------------------


def test_plan_counts_a_tiff_mask_at_a_fractional_scale_and_a_squeezable_zarr_mask(
    tmp_path, capsys
) -> None:
    rng = np.random.default_rng(2)
    mask = (rng.random((85, 85)) < 0.01).astype(np.uint8)  # 256 / 85: about 3.01 px per mask pixel
    tifffile.imwrite(tmp_path / "third.tif", mask)
    expected = {
        (i, j) for i in range(GRID[0]) for j in range(GRID[1])
        if not any(
            _touched(SHAPE[0], 85, i * TILE, (i + 1) * TILE) & {r}
            and _touched(SHAPE[1], 85, j * TILE, (j + 1) * TILE) & {c}
            for r, c in zip(*np.nonzero(mask))
        )
    }  # fmt: skip
    assert 0 < len(expected) < BLOCKS
    assert main(["plan", _workflow(tmp_path, {"mask": "third.tif", "above": 230})]) == 0
    out = capsys.readouterr().out
    assert (
        f"skip       mask {tmp_path}/third.tif (85 x 85 px): {len(expected)} of 64 blocks skipped "
        f"(written as class 2); rule above 230 checked per block (raw read box) at run time"
    ) in out

    zarr.create_array(
        str(tmp_path / "mask.zarr"), shape=(1, 32, 32), chunks=(1, 8, 8), dtype="uint8"
    )[:] = _mask()[None]
    assert main(["plan", _workflow(tmp_path, {"mask": "mask.zarr"})]) == 0
    n = len(_expected_skips({"mask": "x"}))
    assert (
        f"mask {tmp_path}/mask.zarr (32 x 32 px): {n} of 64 blocks skipped"
        in capsys.readouterr().out
    )


# --- validation errors ----------------------------------------------------------------------


def _fails(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in err, err
    return err


def test_validation_errors_name_the_field(tmp_path, capsys) -> None:
    wf = _workflow(tmp_path, None)
    folder = tmp_path

    def with_skip(skip: object) -> str:
        doc = yaml.safe_load(Path(wf).read_text())
        doc["tiling"]["skip"] = skip
        Path(wf).write_text(yaml.safe_dump(doc))
        return wf

    _fails(
        capsys,
        ["validate", with_skip({})],
        f"{wf}: tiling.skip: expected at least one of mask, uniform: true, below or above",
    )
    _fails(
        capsys,
        ["validate", with_skip({"uniform": True, "tissue": 1})],
        "tiling.skip.tissue: unknown key; expected one of: mask, storage_options, uniform, below, above, label",
    )
    _fails(
        capsys,
        ["validate", with_skip({"above": "white"})],
        "tiling.skip.above: expected a finite number, got 'white'",
    )
    _fails(
        capsys,
        ["validate", with_skip({"uniform": True, "label": 3})],
        f"{wf}: tiling.skip.label: expected a class of the model, 0 <= label < model.num_classes (3), got 3",
    )
    _fails(
        capsys,
        ["validate", with_skip({"mask": "nowhere.png"})],
        f"{wf}: tiling.skip.mask: file not found: {folder}/nowhere.png",
    )
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(folder / "wide.png")
    _fails(
        capsys, ["validate", with_skip({"mask": "wide.png"})],
        f"{wf}: tiling.skip.mask: {folder}/wide.png has shape (32, 64), but the image {folder}/slide.tif has spatial shape (256, 256); its aspect ratio differs",
    )  # fmt: skip
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(folder / "big.png")
    _fails(
        capsys,
        ["validate", with_skip({"mask": "big.png"})],
        "tiling.skip.mask: ",
        "has shape (512, 512)",
        "no axis larger than the image's",
    )
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "rgb.png")
    _fails(
        capsys,
        ["validate", with_skip({"mask": "rgb.png"})],
        "tiling.skip.mask: ",
        "rgb.png: expected a single-channel 2D mask",
        "shape (32, 32, 3)",
    )
    zarr.create_array(str(folder / "masks.zarr"), shape=(32, 32), chunks=(8, 8), dtype="uint8")
    doc = yaml.safe_load(Path(with_skip({"mask": "masks.zarr"})).read_text())
    doc["output"]["path"] = "masks.zarr/labels.zarr"
    Path(wf).write_text(yaml.safe_dump(doc))
    _fails(capsys, ["validate", wf], "output.path: ", "lies inside the tiling.skip.mask")
