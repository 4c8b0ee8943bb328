"""Chunked evaluation on Dask against scikit-learn, on real and synthetic label images."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from pipeline.encodings import LabelEncoding
from pipeline.errors import EvaluationError, InputImageError
from pipeline.evaluation import (
    EvaluationSpec,
    LabelPair,
    confusion_matrix_dask,
    evaluate_pairs,
    pair_paths,
)
from pipeline.io.images import ImageSpec
from pipeline.metrics import scores_from_confusion
from tests.helpers import shared_data

DUBAI_CLASSES = [  # colours measured in the masks (shared/data README), not classes.json's
    ("Building", (60, 16, 152)),
    ("Land", (132, 41, 246)),
    ("Road", (110, 193, 228)),
    ("Vegetation", (254, 221, 58)),
    ("Water", (226, 169, 41)),
    ("Unlabeled", (155, 155, 155)),
]


def _blobs(rng, shape=(100, 110), k=4):
    truth = np.kron(rng.integers(0, k, (shape[0] // 10, shape[1] // 10)), np.ones((10, 10), int))
    pred = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, k, truth.shape))
    return truth, pred


@pytest.mark.parametrize("ignore_index", [None, 4])
def test_chunked_confusion_equals_scikit_learn_with_chunks_cutting_through(rng, ignore_index) -> None:
    truth, pred = _blobs(rng)
    if ignore_index is not None:
        truth[rng.random(truth.shape) < 0.05] = ignore_index
    cm = confusion_matrix_dask(
        da.from_array(truth, chunks=(37, 41)), da.from_array(pred, chunks=(23, 50)), 4, ignore_index
    )
    keep = truth != ignore_index
    np.testing.assert_array_equal(cm, sk_confusion_matrix(truth[keep], pred[keep], labels=range(4)))


def _write_pair(tmp_path, truth, pred, name="x", tile=(32, 32)):
    (tmp_path / "t").mkdir(exist_ok=True)
    (tmp_path / "p").mkdir(exist_ok=True)
    tifffile.imwrite(tmp_path / "t" / f"{name}.tif", truth.astype(np.uint8), tile=tile)
    tifffile.imwrite(tmp_path / "p" / f"{name}.tif", pred.astype(np.uint8), rowsperstrip=7)


def test_region_breakdown_equals_scikit_learn_per_cell(tmp_path, rng) -> None:
    truth, pred = _blobs(rng, (100, 110))
    _write_pair(tmp_path, truth, pred)
    pairs = pair_paths(str(tmp_path / "p"), str(tmp_path / "t"))
    [result] = evaluate_pairs(pairs, EvaluationSpec(4, region=48))
    assert result.regions.shape == (3, 3, 4, 4)
    for i in range(3):
        for j in range(3):
            cell = (slice(48 * i, 48 * i + 48), slice(48 * j, 48 * j + 48))
            expected = sk_confusion_matrix(truth[cell].ravel(), pred[cell].ravel(), labels=range(4))
            np.testing.assert_array_equal(result.regions[i, j], expected)
    np.testing.assert_array_equal(result.confusion, sk_confusion_matrix(truth.ravel(), pred.ravel(), labels=range(4)))


def test_several_images_pool_and_pair_by_name(tmp_path, rng) -> None:
    pairs_data = {name: _blobs(rng, (60, 50)) for name in ("a", "b", "c")}
    for name, (t, p) in pairs_data.items():
        _write_pair(tmp_path, t, p, name)
    pairs = pair_paths(str(tmp_path / "p" / "*.tif"), str(tmp_path / "t"))
    assert [p.name for p in pairs] == ["a", "b", "c"]
    results = evaluate_pairs(pairs, EvaluationSpec(4))
    all_t = np.concatenate([t.ravel() for t, _ in pairs_data.values()])
    all_p = np.concatenate([p.ravel() for _, p in pairs_data.values()])
    np.testing.assert_array_equal(sum(r.confusion for r in results), sk_confusion_matrix(all_t, all_p, labels=range(4)))
    (tmp_path / "t" / "d.tif").write_bytes((tmp_path / "t" / "a.tif").read_bytes())
    with pytest.raises(EvaluationError, match=r"cannot pair .*missing \['d'\]"):
        pair_paths(str(tmp_path / "p"), str(tmp_path / "t"))


def test_ignore_mask_removes_pixels(tmp_path, rng) -> None:
    truth, pred = _blobs(rng, (40, 40))
    mask = np.zeros(truth.shape, np.uint8)
    mask[:20] = 1
    _write_pair(tmp_path, truth, pred)
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    [pair] = pair_paths(str(tmp_path / "p" / "x.tif"), str(tmp_path / "t" / "x.tif"), str(tmp_path / "mask.tif"))
    [result] = evaluate_pairs([pair], EvaluationSpec(4))
    np.testing.assert_array_equal(result.confusion, sk_confusion_matrix(truth[20:].ravel(), pred[20:].ravel(), labels=range(4)))


def test_counts_beyond_2_to_the_32_are_exact() -> None:
    """2^32 + 2^28 pixels through the chunked path: int64 counts, no overflow."""
    n = 69632  # 69632^2 = 4.85e9 > 2^32
    truth = da.zeros((n, n), dtype=np.uint8, chunks=(8704, 8704))
    pred = da.ones((n, n), dtype=np.uint8, chunks=(8704, 8704))
    pred = da.where(da.arange(n, chunks=8704)[None, :] < 4096, 0, pred)
    cm = confusion_matrix_dask(truth, pred, 2)
    assert cm.dtype == np.int64
    assert cm[0, 0] == n * 4096 and cm[0, 1] == n * (n - 4096)
    assert cm.sum() == n * n > 2**32
    assert scores_from_confusion(cm).pixel_accuracy == pytest.approx(4096 / n, rel=1e-15)


def test_isbi_labels_against_a_perturbed_copy(tmp_path) -> None:
    """Real EM membrane labels (binary 0/255), 30 slices paired by name, vs a known perturbation."""
    folder = shared_data("microscopy", "isbi2012_em_membranes", "labels")
    rng = np.random.default_rng(0)
    (tmp_path / "pred").mkdir()
    truths, preds = [], []
    for i in range(30):
        truth = np.asarray(Image.open(folder / f"{i}.png"))
        pred = truth.copy()
        flip = rng.random(truth.shape) < 0.1
        pred[flip] = 255 - pred[flip]
        Image.fromarray(pred).save(tmp_path / "pred" / f"{i}.png")
        truths.append(truth // 255)
        preds.append(pred // 255)
    pairs = pair_paths(str(tmp_path / "pred"), str(folder))
    assert len(pairs) == 30
    results = evaluate_pairs(pairs, EvaluationSpec(2, encoding=LabelEncoding("binary")))
    expected = sk_confusion_matrix(np.concatenate(truths).ravel(), np.concatenate(preds).ravel(), labels=[0, 1])
    np.testing.assert_array_equal(sum(r.confusion for r in results), expected)
    for r, t, p in zip(sorted(results, key=lambda r: int(r.pair.name)), truths, preds):
        np.testing.assert_array_equal(r.confusion, sk_confusion_matrix(t.ravel(), p.ravel(), labels=[0, 1]))


def _palette_spec(ignore_black: bool = True) -> EvaluationSpec:
    encoding = LabelEncoding(
        "palette",
        palette=tuple(c for _, c in DUBAI_CLASSES),
        ignore_colours=((0, 0, 0),) if ignore_black else (),
    )
    return EvaluationSpec(len(DUBAI_CLASSES), encoding=encoding, class_names=tuple(n for n, _ in DUBAI_CLASSES))


@pytest.mark.parametrize("tile", ["Tile 2", "Tile 8"])  # palette-mode PNGs; stray black pixels
def test_dubai_masks_decode_through_their_palette(tile) -> None:
    masks = shared_data("aerial", "dubai_mbrsc_semantic_segmentation", tile, "masks")
    pairs = pair_paths(str(masks), str(masks), channel_axis_of={"prediction": -1, "ground truth": -1})
    results = evaluate_pairs(pairs, _palette_spec())
    for r in results:
        rgb = np.asarray(Image.open(r.pair.truth.path).convert("RGB")).reshape(-1, 3)
        counted = ~(rgb == 0).all(axis=1)
        expected = np.zeros(len(DUBAI_CLASSES), np.int64)
        for k, (_, colour) in enumerate(DUBAI_CLASSES):
            expected[k] = (rgb == colour).all(axis=1).sum()
        np.testing.assert_array_equal(np.diag(r.confusion), expected)
        assert r.confusion.sum() == counted.sum()  # black is ignored, nothing else
        assert np.count_nonzero(r.confusion - np.diag(np.diag(r.confusion))) == 0


def test_unknown_colours_are_listed() -> None:
    masks = shared_data("aerial", "dubai_mbrsc_semantic_segmentation", "Tile 8", "masks")
    pairs = pair_paths(str(masks / "image_part_003.png"), str(masks / "image_part_003.png"), channel_axis_of={"prediction": -1, "ground truth": -1})
    with pytest.raises(EvaluationError, match=r"colours not in the palette: #000000 \(\d+ px\)"):
        evaluate_pairs(pairs, _palette_spec(ignore_black=False))


def test_bad_inputs(tmp_path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint8), tile=(32, 32), compression="zlib")
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((64, 60), np.uint8))
    truth = np.zeros((64, 64), np.uint8)
    truth[40, 50] = 9
    tifffile.imwrite(tmp_path / "c.tif", truth, tile=(32, 32))
    spec = EvaluationSpec(2)

    def pair(p, t):
        return LabelPair("x", ImageSpec(str(tmp_path / p), None, "prediction"), ImageSpec(str(tmp_path / t), None, "ground truth"))

    with pytest.raises(EvaluationError, match=r"has shape \(64, 60\), but .* has shape \(64, 64\)"):
        evaluate_pairs([pair("a.tif", "b.tif")], spec)
    with pytest.raises(EvaluationError, match=r"c.tif holds class ids 9 in the region 32:64, 32:64; expected 0..1"):
        evaluate_pairs([pair("a.tif", "c.tif")], spec)
    zarr.create_array(str(tmp_path / "empty.zarr"), shape=(0, 5), dtype="uint8")
    with pytest.raises(InputImageError, match="empty"):
        evaluate_pairs([pair("empty.zarr", "a.tif")], spec)


def test_label_volumes_with_a_per_slice_breakdown(tmp_path) -> None:
    """The ISBI stack as one (30, 512, 512) volume: per z-slice matrices equal scikit-learn's."""
    folder = shared_data("microscopy", "isbi2012_em_membranes", "labels")
    truth = np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(30)])
    rng = np.random.default_rng(3)
    pred = np.where(rng.random(truth.shape) < 0.02 * (1 + np.arange(30))[:, None, None], 255 - truth, truth)
    tifffile.imwrite(tmp_path / "truth.tif", truth)  # multipage: one page per slice
    zarr.create_array(str(tmp_path / "pred.zarr"), data=pred.astype(np.uint8), chunks=(7, 200, 300))
    pairs = pair_paths(str(tmp_path / "pred.zarr"), str(tmp_path / "truth.tif"))
    [result] = evaluate_pairs(pairs, EvaluationSpec(2, encoding=LabelEncoding("binary"), per_slice=True))
    assert result.regions.shape == (30, 1, 1, 2, 2)
    for z in range(30):
        expected = sk_confusion_matrix(truth[z].ravel() // 255, pred[z].ravel() // 255, labels=[0, 1])
        np.testing.assert_array_equal(result.regions[z, 0, 0], expected)
    accuracy = [np.trace(result.regions[z, 0, 0]) / truth[z].size for z in range(30)]
    assert accuracy == sorted(accuracy, reverse=True)  # more flips deeper in the stack
