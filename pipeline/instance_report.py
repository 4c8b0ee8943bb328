"""The instance part of the evaluation reports: JSON section, CSV rows, Markdown table.

Per image and pooled. Pooled matching and panoptic counts are the sums of the images'
counts (TP, FP, FN and matched IoU add up), pooled Rand and VI are those of the images laid
side by side (:func:`instance_metrics.disjoint_union`), and ``mean_ap_over_images`` is the
Data Science Bowl 2018 score: the mean over images of each image's mean AP.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .instance_evaluation import OBJECTS, InstanceEvaluationSpec, InstancePairResult
from .instance_metrics import (
    THRESHOLDS,
    MatchCounts,
    PanopticQuality,
    adapted_rand_error,
    disjoint_union,
    match,
    mean_average_precision,
    panoptic_quality,
    variation_of_information,
)

CSV_FIELDS = ("image", "threshold", "tp", "fp", "fn", "precision", "recall", "f1", "ap")


@dataclass(frozen=True)
class InstanceScores:
    """Everything reported of one image, or of the pool."""

    matching: list[MatchCounts]
    panoptic: dict[int, PanopticQuality]
    rand: tuple[float, float, float]
    vi: tuple[float, float]
    objects: tuple[int, int]  # predicted, true

    @property
    def mean_ap(self) -> float:
        return mean_average_precision(self.matching)


def scores_of(result: InstancePairResult) -> InstanceScores:
    table = result.table
    return InstanceScores(
        match(table, THRESHOLDS),
        panoptic_quality(table, result.pred_classes, result.truth_classes),
        tuple(adapted_rand_error(table)),  # type: ignore[arg-type]
        tuple(variation_of_information(table)),  # type: ignore[arg-type]
        (int(np.unique(table.pred[table.pred > 0]).size), int(np.unique(table.truth[table.truth > 0]).size)),
    )


def pooled_scores(results: list[InstancePairResult], each: list[InstanceScores]) -> InstanceScores:
    union = disjoint_union([r.table for r in results])
    matching = [
        MatchCounts(
            t,
            sum(s.matching[k].tp for s in each),
            sum(s.matching[k].fp for s in each),
            sum(s.matching[k].fn for s in each),
            sum(s.matching[k].iou_sum for s in each),
        )
        for k, t in enumerate(THRESHOLDS)
    ]
    panoptic: dict[int, PanopticQuality] = {}
    for s in each:
        for c, q in s.panoptic.items():
            was = panoptic.get(c, PanopticQuality(0, 0, 0, 0.0))
            panoptic[c] = PanopticQuality(was.tp + q.tp, was.fp + q.fp, was.fn + q.fn, was.iou_sum + q.iou_sum)
    return InstanceScores(
        matching,
        panoptic,
        tuple(adapted_rand_error(union)),  # type: ignore[arg-type]
        tuple(variation_of_information(union)),  # type: ignore[arg-type]
        (sum(s.objects[0] for s in each), sum(s.objects[1] for s in each)),
    )


def instance_section(
    results: list[InstancePairResult], spec: InstanceEvaluationSpec, names: list[str]
) -> tuple[dict[str, Any], list[InstanceScores], InstanceScores]:
    """The report's ``instances`` section, each image's scores and the pooled ones."""
    each = [scores_of(r) for r in results]
    pooled = pooled_scores(results, each)
    with_classes = all(r.with_classes for r in results)
    label = (lambda c: names[c] if 0 <= c < len(names) else f"class {c}") if with_classes else (lambda c: OBJECTS)
    doc: dict[str, Any] = {
        "objects": {"prediction": spec.describe("prediction"), "truth": spec.describe("truth")},
        "matching_rule": "IoU > threshold (one to one for thresholds >= 0.5); AP = TP / (TP + FP + FN) (DSB 2018)",
        "thresholds": list(THRESHOLDS),
        "pooled": _scores_dict(pooled, label),
    }
    if len(results) > 1:
        doc["mean_ap_over_images"] = _num(float(np.nanmean([s.mean_ap for s in each])) if each else math.nan)
    doc["per_image"] = [{"name": r.name, **_scores_dict(s, label)} for r, s in zip(results, each)]
    return doc, each, pooled


def _scores_dict(s: InstanceScores, label: Any) -> dict[str, Any]:
    return {
        "objects": {"prediction": s.objects[0], "truth": s.objects[1]},
        "mean_ap": _num(s.mean_ap),
        "matching": [_match_dict(m) for m in s.matching],
        "panoptic_quality": {
            label(c): {"tp": q.tp, "fp": q.fp, "fn": q.fn, "sq": _num(q.sq), "rq": _num(q.rq), "pq": _num(q.pq)}
            for c, q in sorted(s.panoptic.items())
        },
        "adapted_rand": {"error": _num(s.rand[0]), "precision": _num(s.rand[1]), "recall": _num(s.rand[2])},
        "variation_of_information": {"split": _num(s.vi[0]), "merge": _num(s.vi[1]), "total": _num(s.vi[0] + s.vi[1])},
    }


def _match_dict(m: MatchCounts) -> dict[str, Any]:
    return {
        "threshold": m.threshold, "tp": m.tp, "fp": m.fp, "fn": m.fn, "precision": _num(m.precision),
        "recall": _num(m.recall), "f1": _num(m.f1), "ap": _num(m.ap),
    }  # fmt: skip


def csv_text(results: list[InstancePairResult], each: list[InstanceScores], pooled: InstanceScores) -> str:
    """One row per image and threshold, then the pooled rows (image ``pooled``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    rows = [(r.name, s) for r, s in zip(results, each)] + [("pooled", pooled)]
    for name, s in rows:
        for m in s.matching:
            writer.writerow([name, m.threshold, m.tp, m.fp, m.fn, *(_cell(v) for v in (m.precision, m.recall, m.f1, m.ap))])
    return out.getvalue()


def format_instances(section: dict[str, Any]) -> str:
    """A report's ``instances`` section (its pooled scores) as Markdown: matching per
    threshold, then mean AP, panoptic quality per class, adapted Rand error and VI."""
    pooled = section["pooled"]
    lines = [
        "| IoU > | TP | FP | FN | precision | recall | F1 | AP |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in pooled["matching"]:
        lines.append(
            f"| {m['threshold']:.2f} | {m['tp']} | {m['fp']} | {m['fn']} | {_pct(m['precision'])} | "
            f"{_pct(m['recall'])} | {_pct(m['f1'])} | {_pct(m['ap'])} |"
        )
    objects = pooled["objects"]
    lines += ["", f"objects: {objects['prediction']} predicted, {objects['truth']} true; mean AP (IoU 0.50:0.95) {_pct(pooled['mean_ap'])}"]
    if "mean_ap_over_images" in section:
        lines.append(f"mean over images of each image's mean AP (DSB 2018 score): {_pct(section['mean_ap_over_images'])}")
    for name, q in pooled["panoptic_quality"].items():
        lines.append(f"panoptic quality ({name}): PQ {_pct(q['pq'])} = SQ {_pct(q['sq'])} x RQ {_pct(q['rq'])}")
    rand, vi = pooled["adapted_rand"], pooled["variation_of_information"]
    lines.append(
        f"adapted Rand error {_fixed(rand['error'])} (precision {_fixed(rand['precision'])}, recall "
        f"{_fixed(rand['recall'])}); variation of information {_fixed(vi['total'])} bits (split "
        f"{_fixed(vi['split'])}, merge {_fixed(vi['merge'])})"
    )
    return "\n".join(lines)


def curves(section: dict[str, Any]) -> dict[str, list[float]]:
    """Pooled precision, recall and F1 per threshold, for the plot (NaN where undefined)."""
    matching = section["pooled"]["matching"]
    return {k: [math.nan if m[k] is None else m[k] for m in matching] for k in ("precision", "recall", "f1")}


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}%"
