import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from pipeline.errors import EvaluationError
from pipeline.evaluation import confusion_matrix_dask, evaluate_paths
from pipeline.io.images import ImageSpec
from tests.helpers import shared_data


@pytest.mark.parametrize("ignore_index", [None, 4])
def test_chunked_confusion_equals_scikit_learn_with_chunks_cutting_through(rng, ignore_index) -> None:
    # blobs of labels, cut by chunks of 37 x 41 that never align with them
    truth = np.kron(rng.integers(0, 4, (10, 11)), np.ones((10, 10), int))
    truth[rng.random(truth.shape) < 0.05] = 4 if ignore_index is not None else 0
    pred = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 4, truth.shape))
    pred[pred == 4] = 0
    cm = confusion_matrix_dask(
        da.from_array(truth, chunks=(37, 41)), da.from_array(pred, chunks=(23, 50)), 4, ignore_index
    )
    keep = truth != ignore_index if ignore_index is not None else np.ones(truth.shape, bool)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(truth[keep], pred[keep], labels=range(4)))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(EvaluationError, match=r"has shape \(4, 5\), but .* has shape \(4, 4\)"):
        confusion_matrix_dask(da.zeros((4, 5), int), da.zeros((4, 4), int), 2)


def test_out_of_range_ids_name_the_file_and_region(tmp_path) -> None:
    truth = np.zeros((64, 64), np.uint8)
    truth[40, 50] = 9
    pred = np.zeros((64, 64), np.uint8)
    tifffile.imwrite(tmp_path / "truth.tif", truth, tile=(32, 32))
    tifffile.imwrite(tmp_path / "pred.tif", pred, tile=(32, 32))
    with pytest.raises(EvaluationError, match=r"truth.tif holds class ids 9 in the region 32:64, 32:64"):
        evaluate_paths(
            ImageSpec(str(tmp_path / "pred.tif"), None, "prediction"),
            ImageSpec(str(tmp_path / "truth.tif"), None, "ground truth"),
            2,
        )


def test_isbi_labels_against_a_perturbed_copy(tmp_path) -> None:
    """Real EM membrane labels (0/255 -> 0/1), 30 slices as one mosaic, vs a known perturbation."""
    folder = shared_data("microscopy", "isbi2012_em_membranes", "labels")
    slices = [np.asarray(Image.open(folder / f"{i}.png")) // 255 for i in range(30)]
    truth = np.concatenate(slices, axis=1).astype(np.uint8)  # 512 x 15360
    rng = np.random.default_rng(0)
    pred = truth.copy()
    flip = rng.random(truth.shape) < 0.1
    pred[flip] = 1 - pred[flip]
    tifffile.imwrite(tmp_path / "truth.tif", truth, tile=(256, 256))
    tifffile.imwrite(tmp_path / "pred.tif", pred, rowsperstrip=100)
    scores = evaluate_paths(
        ImageSpec(str(tmp_path / "pred.tif"), None, "prediction"),
        ImageSpec(str(tmp_path / "truth.tif"), None, "ground truth"),
        2,
    )
    expected = sk_confusion_matrix(truth.ravel(), pred.ravel(), labels=[0, 1])
    np.testing.assert_array_equal(scores.confusion, expected)
    assert scores.pixel_accuracy == pytest.approx(1 - flip.mean(), abs=1e-12)
