"""Instance metrics through the evaluation: chunked contingency tables on Dask against
whole-array references (dense IoU matrices of ``scipy.ndimage.label`` objects,
scikit-image's Rand error and variation of information), on synthetic labels, through
``pipeline evaluate --instances``, and on the ISBI 2012 slices through ``pipeline run``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from PIL import Image
from scipy import ndimage
from skimage.metrics import adapted_rand_error, variation_of_information

from pipeline.evaluation import EvaluationSpec, LabelPair
from pipeline.instance_evaluation import InstanceEvaluationSpec, evaluate_instance_pairs
from pipeline.instance_labels import InstanceSpec
from pipeline.instance_metrics import THRESHOLDS
from pipeline.instance_report import instance_section
from pipeline.io.images import ImageSpec
from tests.helpers import run_pipeline, shared_data

ISBI = ("microscopy", "isbi2012_em_membranes")


def components(mask: np.ndarray, neighbours: int = 4, min_size: int = 0) -> np.ndarray:
    rank = {4: 1, 8: 2, 6: 1, 26: 3}[neighbours]
    found, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, rank))
    sizes = np.bincount(found.ravel(), minlength=n + 1)
    keep = (sizes >= max(min_size, 1)) & (np.arange(n + 1) > 0)
    _, sequential = np.unique(np.where(keep[found], found, 0), return_inverse=True)
    return sequential.reshape(mask.shape)


def reference(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Matching, PQ (one class), Rand and VI of two sequential id images, the plain way."""
    p, t = pred.ravel(), truth.ravel()
    n_p, n_t = int(p.max()) + 1, int(t.max()) + 1
    joint = np.bincount(p * n_t + t, minlength=n_p * n_t).reshape(n_p, n_t)[1:, 1:].astype(float)
    area_p = np.bincount(p, minlength=n_p)[1:].astype(float)
    area_t = np.bincount(t, minlength=n_t)[1:].astype(float)
    iou = joint / (area_p[:, None] + area_t[None, :] - joint) if joint.size else joint
    rows = []
    for th in THRESHOLDS:
        tp = int((iou > th).sum())
        rows.append((tp, len(area_p) - tp, len(area_t) - tp))
    matched = iou[iou > 0.5]
    rand = adapted_rand_error(truth, pred)
    split, merge = variation_of_information(truth, pred)  # skimage: (H(pred|truth), H(truth|pred))
    return {"matching": rows, "iou_sum": float(matched.sum()), "rand_error": rand[0], "vi": (split, merge)}


def check_section(section_scores: dict, ref: dict) -> None:
    got = [(m["tp"], m["fp"], m["fn"]) for m in section_scores["matching"]]
    assert got == ref["matching"]
    tp, fp, fn = ref["matching"][0]
    pq = next(iter(section_scores["panoptic_quality"].values()))
    assert (pq["tp"], pq["fp"], pq["fn"]) == (tp, fp, fn)
    if tp:
        assert pq["pq"] == pytest.approx(ref["iou_sum"] / (tp + fp / 2 + fn / 2), abs=1e-12)
    ap = [t / (t + f + n) for t, f, n in ref["matching"]]
    assert section_scores["mean_ap"] == pytest.approx(np.mean(ap), abs=1e-12)
    assert section_scores["adapted_rand"]["error"] == pytest.approx(ref["rand_error"], abs=1e-12)
    vi = section_scores["variation_of_information"]
    assert (vi["split"], vi["merge"]) == pytest.approx(ref["vi"], abs=1e-12)


def blobs(rng: np.random.Generator, shape: tuple[int, ...], threshold: float, sigma: float = 2.0) -> np.ndarray:
    return (ndimage.gaussian_filter(rng.random(shape), sigma) > threshold).astype(np.uint8)


def test_chunked_tables_equal_whole_array_references(tmp_path, rng) -> None:
    """Two class-label images, objects as connected components on each side, in small tiles
    that cut through objects: every number equals the whole-array reference."""
    truth = blobs(rng, (150, 170), 0.5)
    pred = truth.copy()
    pred[rng.random(truth.shape) > 0.97] ^= 1  # speckle: splits, merges, tiny false objects
    pred = np.roll(pred, 2, axis=1)
    tifffile.imwrite(tmp_path / "pred.tif", pred, tile=(32, 32))
    tifffile.imwrite(tmp_path / "truth.tif", truth * 255, tile=(48, 48))
    pair = LabelPair("x", ImageSpec(str(tmp_path / "pred.tif"), field="prediction"), ImageSpec(str(tmp_path / "truth.tif"), field="truth"))
    spec = InstanceEvaluationSpec(InstanceSpec((1,), 8), InstanceSpec((1,), 8))
    from pipeline.encodings import LabelEncoding

    found = evaluate_instance_pairs([pair], spec, EvaluationSpec(2, encoding=LabelEncoding(kind="binary")))
    section, _, _ = instance_section(found, spec, ["background", "object"])
    check_section(section["pooled"], reference(components(pred == 1, 8), components(truth == 1, 8)))
    assert list(section["pooled"]["panoptic_quality"]) == ["object"]


def test_evaluate_instances_on_id_images_pools_side_by_side(tmp_path, rng) -> None:
    """`pipeline evaluate --instances --prediction-ids --truth-ids`: per image and pooled."""
    pairs = []
    for k in range(2):
        truth = components(blobs(rng, (90, 100), 0.5) == 1)
        pred = components(np.roll(truth > 0, k + 1, axis=0))
        pred[pred > 0] += 2**33  # ids past 32 bits, not sequential
        (tmp_path / "pred").mkdir(exist_ok=True)
        (tmp_path / "truth").mkdir(exist_ok=True)
        stored = zarr.create_array(str(tmp_path / "pred" / f"{k}.zarr"), shape=pred.shape, chunks=(40, 30), dtype=np.uint64)
        stored[:] = pred
        tifffile.imwrite(tmp_path / "truth" / f"{k}.tif", truth.astype(np.uint16))
        pairs.append((pred, truth))
    proc = run_pipeline(
        "evaluate", str(tmp_path / "pred"), str(tmp_path / "truth"), "--instances", "--prediction-ids", "--truth-ids",
        "--json", str(tmp_path / "r.json"), "--instances-csv", str(tmp_path / "r.csv"), "--instances-plot", str(tmp_path / "r.png"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    section = json.loads((tmp_path / "r.json").read_text())["instances"]
    for (pred, truth), image in zip(pairs, section["per_image"]):
        _, sequential = np.unique(pred, return_inverse=True)
        check_section(image, reference(sequential.reshape(pred.shape), truth))
    side = [np.unique(p, return_inverse=True)[1].reshape(p.shape) for p, _ in pairs]
    side[1] = np.where(side[1] > 0, side[1] + side[0].max(), 0)
    truths = [pairs[0][1], np.where(pairs[1][1] > 0, pairs[1][1] + pairs[0][1].max(), 0)]
    pooled_ref = reference(np.concatenate(side, axis=1), np.concatenate(truths, axis=1))
    check_section(section["pooled"], pooled_ref)
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0] == "image,threshold,tp,fp,fn,precision,recall,f1,ap" and len(rows) == 1 + 3 * len(THRESHOLDS)
    assert Image.open(tmp_path / "r.png").size == (640, 400)
    assert "| IoU > | TP | FP | FN |" in proc.stdout


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--instances"], "error: --instance-classes: the prediction holds classes;"),
        (["--instances", "--prediction-ids", "--truth-ids", "--csv", "x.csv"], "error: --csv: class statistics need class labels"),
        (["--instances", "--instance-classes", "1", "--connectivity", "6"], "error: --connectivity: 6 is not a 2D neighbourhood"),
    ],
)
def test_evaluate_instances_refusals(tmp_path, flags, message) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.ones((20, 20), np.uint8))
    proc = run_pipeline("evaluate", str(tmp_path / "a.tif"), str(tmp_path / "a.tif"), *flags, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(message) and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.csv").exists()


class Brightness(torch.nn.Module):
    """Cell interior where the 5 x 5 mean is above 128: EM membranes are dark."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
        return torch.cat([128.0 - m, m - 128.0], dim=1)


def test_isbi_cells_of_a_run_against_the_truth_cells(tmp_path) -> None:
    """Three ISBI slices in one run: cells are the 4-connected components of the interior
    class (at least 20 px) of the prediction and of the truth; the report's numbers, per
    slice and pooled, equal the whole-array reference."""
    images, labels = shared_data(*ISBI, "images"), shared_data(*ISBI, "labels")
    torch.jit.save(torch.jit.script(Brightness()), tmp_path / "m.pt")
    slices = ["0", "1", "2"]
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": [str(images / f"{s}.png") for s in slices]},
        "model": {"arch": "torchscript", "path": "m.pt", "num_classes": 2, "halo": 2, "normalize": {"mean": 0.0, "std": 1.0}},
        "tiling": {"tile": 200},
        "output": {"path": "out/{name}.zarr"},
        "instances": {"classes": [1], "connectivity": 4, "min_size": 20},
        "evaluation": {"ground_truth": str(labels), "encoding": "binary", "instances": True,
                       "classes": [{"name": "membrane"}, {"name": "cell interior"}]},
        "cluster": {"n_workers": 1, "threads_per_worker": 2},
    }))  # fmt: skip
    proc = run_pipeline("run", str(tmp_path / "wf.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())["instances"]
    preds, truths = [], []
    for s, image in zip(slices, report["per_image"]):
        classes = zarr.open_group(str(tmp_path / "out" / f"{s}.zarr"), mode="r")["0"][:]
        pred = components(classes == 1, 4, 20)
        truth = components(np.asarray(Image.open(labels / f"{s}.png")) == 255, 4, 20)
        assert image["name"] == s
        check_section(image, reference(pred, truth))
        assert list(image["panoptic_quality"]) == ["cell interior"]
        preds.append(pred)
        truths.append(truth)
    offsets_p = np.cumsum([0] + [p.max() for p in preds[:-1]])
    offsets_t = np.cumsum([0] + [t.max() for t in truths[:-1]])
    pooled_p = np.concatenate([np.where(p > 0, p + o, 0) for p, o in zip(preds, offsets_p)], axis=1)
    pooled_t = np.concatenate([np.where(t > 0, t + o, 0) for t, o in zip(truths, offsets_t)], axis=1)
    check_section(report["pooled"], reference(pooled_p, pooled_t))
    assert report["mean_ap_over_images"] == pytest.approx(np.mean([i["mean_ap"] for i in report["per_image"]]))
    assert "panoptic quality (cell interior)" in proc.stdout
    assert (tmp_path / "out" / "instances.csv").exists() and (tmp_path / "out" / "instances.png").exists()


def test_a_run_matches_its_objects_against_truth_instance_ids(tmp_path) -> None:
    """evaluation.truth_instances: an instance-label image of the truth, through pipeline run."""
    rng = np.random.default_rng(11)
    truth_classes = blobs(rng, (120, 140), 0.5, sigma=3.0)
    image = (truth_classes * 160 + 40).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "classes.tif", truth_classes)
    truth_ids = components(truth_classes == 1, 4)
    tifffile.imwrite(tmp_path / "ids.tif", truth_ids.astype(np.uint32))
    torch.jit.save(torch.jit.script(Brightness()), tmp_path / "m.pt")
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "img.tif"},
        "model": {"arch": "torchscript", "path": "m.pt", "num_classes": 2, "halo": 2, "normalize": {"mean": 0.0, "std": 1.0}},
        "tiling": {"tile": 64},
        "inference": {"torch_threads": 1, "channels_last": False},
        "output": {"path": "out/a.zarr"},
        "instances": {"classes": [1], "connectivity": 4},
        "evaluation": {"ground_truth": "classes.tif", "instances": True, "truth_instances": "ids.tif"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }))  # fmt: skip
    proc = run_pipeline("run", str(tmp_path / "wf.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    section = json.loads((tmp_path / "out" / "a.evaluation.json").read_text())["instances"]
    assert section["objects"]["truth"] == "instance ids as stored"
    pred = components(zarr.open_group(str(tmp_path / "out" / "a.zarr"), mode="r")["0"][:] == 1, 4)
    check_section(section["pooled"], reference(pred, truth_ids))
