"""Instance metrics of prediction/truth pairs on Dask: contingency tables counted per chunk.

Each side's objects are either the ids the image holds (an instance volume of this
pipeline, a cellpose mask) or the connected components of chosen classes of a class-label
image, found across block seams as :mod:`.instance_labels` does. Every chunk pair gives a
sparse table of (predicted id, true id) overlaps (:func:`instance_metrics.count_overlaps`);
the tables add up exactly, and memory is bounded by the number of overlapping pairs.
Truth pixels the evaluation ignores (ignore index, ignore colours, ignore mask) count
nowhere, object areas included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np

from .encodings import EncodingError, decode
from .errors import EvaluationError
from .evaluation import EvaluationSpec, LabelPair
from .instance_labels import InstanceSpec, instance_ids, label_blocks, resolve_objects
from .instance_metrics import Contingency, count_overlaps, merge
from .instance_volume import table_paths
from .io import fs
from .io.images import ImageSpec, as_dask_array
from .io.labels import is_label_volume, open_label_volume, recorded_run
from .io.tables import read_table

OBJECTS = "objects"  # the one class of objects whose image holds ids without classes


@dataclass(frozen=True)
class InstanceEvaluationSpec:
    """How objects are found on each side: ``None`` means the image holds instance ids."""

    prediction: InstanceSpec | None
    truth: InstanceSpec | None

    def describe(self, side: str) -> str:
        spec = self.prediction if side == "prediction" else self.truth
        if spec is None:
            return "instance ids as stored"
        classes = ", ".join(map(str, spec.classes))
        return f"connected components of class{'es' * (len(spec.classes) > 1)} {classes} ({spec.connectivity}-connected)"


@dataclass(frozen=True)
class InstancePairResult:
    """One pair's table and the class of each object on both sides (ids, classes)."""

    name: str
    table: Contingency
    pred_classes: tuple[np.ndarray, np.ndarray]
    truth_classes: tuple[np.ndarray, np.ndarray]
    with_classes: bool  # both sides know their objects' classes: panoptic quality per class


def evaluate_instance_pairs(
    pairs: list[LabelPair], spec: InstanceEvaluationSpec, classes: EvaluationSpec
) -> list[InstancePairResult]:
    """The contingency table of every pair, and its objects' classes."""
    return [_evaluate_pair(pair, spec, classes) for pair in pairs]


def _evaluate_pair(pair: LabelPair, spec: InstanceEvaluationSpec, classes: EvaluationSpec) -> InstancePairResult:
    pred, pred_is_ids, recorded_classes = _prediction(pair.prediction, spec.prediction is None)
    chunks = pred.chunks
    truth_raw = as_dask_array(replace(pair.truth, volume=True))
    name_t = f"{pair.truth.field}: {fs.redact(pair.truth.path)}"
    name_p = f"{pair.prediction.field}: {fs.redact(pair.prediction.path)}"
    if tuple(truth_raw.shape[1:]) != tuple(pred.shape):
        raise EvaluationError(
            f"{name_t} has shape {tuple(truth_raw.shape[1:])}, but {name_p} has shape {tuple(pred.shape)}; expected the same"
        )
    truth_raw = truth_raw.rechunk(((truth_raw.shape[0],),) + chunks)
    truth_ids_or_classes, ignored = _decoded(truth_raw, classes, spec.truth is None, name_t)
    if pair.ignore_mask is not None:
        mask = as_dask_array(replace(pair.ignore_mask, volume=True))[0].rechunk(chunks) != 0
        ignored = mask if ignored is None else (ignored | mask)
    pred_ids, pred_classes = _objects(pred, None if pred_is_ids else spec.prediction, name_p)
    truth_ids, truth_classes = _objects(truth_ids_or_classes, spec.truth, name_t)
    if recorded_classes is not None:
        pred_classes = recorded_classes
    blocks_p, blocks_t = pred_ids.to_delayed(), truth_ids.to_delayed()
    blocks_m = ignored.to_delayed() if ignored is not None else None
    tasks = [
        dask.delayed(count_overlaps, pure=True)(blocks_p[i], blocks_t[i], None if blocks_m is None else blocks_m[i])
        for i in np.ndindex(*blocks_p.shape)
    ]
    (table,) = dask.compute(dask.delayed(merge, pure=True)(tasks))
    with_classes = pred_classes is not None and truth_classes is not None
    if not with_classes:  # one class of objects on both sides
        pred_classes = _one_class(table.pred)
        truth_classes = _one_class(table.truth)
    assert pred_classes is not None and truth_classes is not None
    return InstancePairResult(pair.name, table, pred_classes, truth_classes, with_classes)


def _prediction(spec: ImageSpec, as_ids: bool) -> tuple[da.Array, bool, tuple[np.ndarray, np.ndarray] | None]:
    """The prediction (spatial), whether it holds ids, and its objects' classes if recorded."""
    if is_label_volume(spec.path):
        array = da.from_zarr(open_label_volume(spec.path))
        record = recorded_run(spec.path) or {}
        if "instances" in record:  # an instance volume of this pipeline: its table has the classes
            table = read_table(table_paths(spec.path)[0])
            return array, True, (table["label"].astype(np.uint64), table["class"].astype(np.int64))
        return array, as_ids, None
    raw = as_dask_array(replace(spec, volume=True))
    if raw.shape[0] != 1:
        raise EvaluationError(f"{spec.field}: {fs.redact(spec.path)} has {raw.shape[0]} channels; expected one of ids or classes")
    return label_blocks(raw[0]), as_ids, None


def _decoded(raw: da.Array, classes: EvaluationSpec, as_ids: bool, name: str) -> tuple[da.Array, da.Array | None]:
    """Truth as ids (stored) or class ids (decoded as the evaluation decodes them), and the
    pixels not counted (ignore colours, ignore index), or None."""
    if not np.issubdtype(raw.dtype, np.integer):
        raise EvaluationError(f"{name}: expected integer ids, got dtype {raw.dtype}")
    if as_ids:
        return raw[0], None
    encoding = classes.encoding

    def ids(block: np.ndarray) -> np.ndarray:
        try:
            found, _ = decode(block if encoding.kind == "palette" else block[0], encoding)
        except EncodingError as exc:
            raise EvaluationError(f"{name}: {exc}") from None
        return found

    def skipped(block: np.ndarray) -> np.ndarray:
        found, ignored = decode(block if encoding.kind == "palette" else block[0], encoding)
        out = np.zeros(found.shape, bool) if ignored is None else ignored
        if classes.ignore_index is not None:
            out = out | (found == classes.ignore_index)
        return out

    decoded = da.map_blocks(ids, raw, drop_axis=0, dtype=np.int64)
    needs_mask = encoding.ignore_colours or classes.ignore_index is not None
    return decoded, (da.map_blocks(skipped, raw, drop_axis=0, dtype=bool) if needs_mask else None)


def _objects(labels: da.Array, spec: InstanceSpec | None, name: str) -> tuple[da.Array, tuple[np.ndarray, np.ndarray] | None]:
    """Instance ids of one side and their classes (None when the image holds bare ids)."""
    if spec is None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise EvaluationError(f"{name}: expected integer instance ids, got dtype {labels.dtype}")
        return labels, None
    objects = resolve_objects(labels, spec)
    ids = np.arange(1, objects.count + 1, dtype=np.uint64)
    return instance_ids(labels, spec, objects), (ids, objects.classes[1:])


def _one_class(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    found = np.unique(ids[ids > 0])
    return found, np.zeros(found.shape, np.int64)
