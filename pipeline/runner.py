"""Read -> plan -> infer -> write -> evaluate -> report, for one workflow.

:func:`prepare` does every check that needs no computation (what ``pipeline validate``
runs); :func:`describe_plan` renders the plan (``pipeline plan``); :func:`run` does the
work on the workflow's Dask cluster, one task per output block.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from distributed import as_completed

from . import __version__
from .cluster import ClusterShape, cluster_shape, connect
from .config import TorchScriptConfig, Workflow
from .errors import EvaluationError, ExecutionError, PipelineError
from .evaluation import evaluate_paths
from .inference import InferenceSpec, run_block
from .io.images import ImageReader, ImageSpec, open_image
from .io.labels import check_output_free, create_label_volume, label_dtype, mark_complete
from .metrics import Scores
from .models.loading import LoadedModel, load_model
from .progress import Progress, format_seconds
from .report import UNTRAINED_NOTE, class_names, format_table, scores_to_dict, write_json
from .tiling import TilePlan, plan_tiles

MEMORY_BUDGET = 2 << 30  # per task, for tiling.tile: auto
SEGMENT_NOTE_BYTES = 64 << 20


@dataclass(frozen=True)
class Prepared:
    workflow: Workflow
    image: ImageReader
    model: LoadedModel
    plan: TilePlan
    cluster: ClusterShape
    truth: ImageReader | None
    notes: tuple[str, ...] = ()

    @property
    def label_dtype(self) -> np.dtype:
        return label_dtype(self.workflow.model.num_classes)

    @property
    def report_path(self) -> str | None:
        if self.workflow.evaluation is None:
            return None
        return evaluation_report_path(self.workflow.output.path)


@dataclass(frozen=True)
class RunResult:
    output_path: str
    report_path: str | None
    scores: Scores | None
    seconds: float


def evaluation_report_path(output_path: str) -> str:
    """``out/slide.zarr`` -> ``out/slide.evaluation.json``, beside the volume."""
    p = Path(output_path)
    return str(p.with_name(p.stem + ".evaluation.json"))


def prepare(wf: Workflow) -> Prepared:
    """All checks short of computing: files, formats, model, sizes, output. Errors name the field."""
    try:
        return _prepare(wf)
    except PipelineError as exc:
        raise type(exc)(f"{wf.source}: {exc}") from None


def _prepare(wf: Workflow) -> Prepared:
    image = open_image(ImageSpec(wf.input.path, wf.input.channel_axis, "input.path"))
    cfg = wf.model
    if image.channels != cfg.in_channels:
        raise PipelineError(
            f"model.in_channels: {cfg.in_channels}, but {wf.input.path} has {image.channels} "
            f"channel{'s' if image.channels > 1 else ''}"
            + (" (set input.channel_axis for a multi-channel image)" if image.channels == 1 else "")
        )
    for name in ("mean", "std"):
        value = getattr(cfg.normalize, name)
        if isinstance(value, tuple) and len(value) != image.channels:
            raise PipelineError(
                f"model.normalize.{name}: expected one value or {image.channels} (one per "
                f"channel), got {len(value)}"
            )
    model = load_model(cfg, "cpu")
    act = model.activation_bytes_per_pixel or 0.0
    bytes_per_read_pixel = 4.0 * (image.channels + cfg.num_classes) + act
    plan = plan_tiles(
        image.shape,
        model.geometry,
        tile=None if wf.tiling.tile == "auto" else int(wf.tiling.tile),
        mirror=wf.tiling.mirror,
        batch_size=wf.inference.batch_size,
        halo=None if isinstance(cfg, TorchScriptConfig) or cfg.halo == "auto" else int(cfg.halo),
        bytes_per_read_pixel=bytes_per_read_pixel,
        memory_budget=MEMORY_BUDGET,
    )
    truth = None
    if wf.evaluation is not None:
        truth = open_image(ImageSpec(wf.evaluation.ground_truth, None, "evaluation.ground_truth"))
        if truth.shape != image.shape:
            raise EvaluationError(
                f"evaluation.ground_truth: {wf.evaluation.ground_truth} has shape {truth.shape}, "
                f"but the image {wf.input.path} has spatial shape {image.shape}; expected the same"
            )
        if not np.issubdtype(truth.dtype, np.integer):
            raise EvaluationError(
                f"evaluation.ground_truth: {wf.evaluation.ground_truth}: expected integer class "
                f"ids, got dtype {truth.dtype}"
            )
    check_output_free(wf.output.path, wf.output.overwrite)
    notes = []
    segment = int(np.prod(image.chunks)) * image.channels * image.dtype.itemsize
    if segment > SEGMENT_NOTE_BYTES:
        notes.append(
            f"{wf.input.path} is stored in compressed segments of {_bytes(segment)} "
            f"({' x '.join(map(str, image.chunks))} px): every read decodes whole segments; "
            f"a tiled TIFF (e.g. tifffile.imwrite(..., tile=(512, 512))) or zarr reads faster"
        )
    return Prepared(wf, image, model, plan, cluster_shape(wf.cluster), truth, tuple(notes))


def describe_plan(p: Prepared) -> str:
    """The plan as a person reads it: sizes, halo, borders, tasks, memory."""
    wf, plan, geo, img = p.workflow, p.plan, p.model.geometry, p.image
    shape = " x ".join(map(str, img.shape))
    read = " x ".join(map(str, plan.read_shape))
    tile = " x ".join(map(str, plan.tile))
    halo_from = "declared" if isinstance(wf.model, TorchScriptConfig) else "from its layers"
    weights = p.model.identity["weights"]
    weights_text = (
        f"untrained (fixed seed {weights['seed']})" if p.model.untrained else weights["path"]
    )
    far = [
        max(0, ext[-1][0] + ext[-1][1] - n) + plan.context
        for ext, n in zip(plan.tile_extents, img.shape)
    ]
    lines = [
        f"image      {wf.input.path}",
        f"           {shape} px, {img.channels} channel{'s' * (img.channels > 1)}, {img.dtype}, "
        f"stored in chunks of {' x '.join(map(str, img.chunks))}",
        f"model      {p.model.identity['arch']} {_params(p.model.identity['params'])}",
        f"           weights: {weights_text}",
        f"           {geo.name}: halo {geo.halo} px ({halo_from}), trim {geo.trim} px, "
        f"shift period {geo.shift_period}, legal inputs {geo.size_min} + n x {geo.size_step}",
        f"tiles      write box {tile}, read box {read} (context {plan.context} px per side)",
        f"           tile sizes are multiples of {geo.tile_multiple}; {plan.n_tiles} tiles",
        f"borders    mirrored ({plan.mirror}): {plan.context} px before the first row/column, "
        f"{' / '.join(map(str, far))} px after the last (rows / columns)",
        f"tasks      {' x '.join(map(str, plan.grid))} = {plan.n_blocks} blocks, "
        f"{'x'.join(map(str, plan.block_tiles))} tiles each (one forward pass per block)",
        f"memory     ~{_bytes(estimate_task_bytes(p))} per task"
        + ("" if p.model.activation_bytes_per_pixel else " + model activations (unknown for TorchScript)"),
        f"output     {wf.output.path} ({p.label_dtype}, chunks "
        f"{' x '.join(map(str, plan.block_shape))}, one per block)",
    ]
    if wf.evaluation is not None:
        lines.append(f"evaluation {wf.evaluation.ground_truth} -> {p.report_path}")
    lines.append(f"cluster    {p.cluster.describe()}")
    lines += [f"note       {n}" for n in p.notes]
    return "\n".join(lines)


def estimate_task_bytes(p: Prepared) -> int:
    """Peak bytes of one block task: source read, float copies, batch, activations, logits."""
    plan, img = p.plan, p.image
    read_px = int(np.prod(plan.max_block_read_shape))
    tiles = int(np.prod(plan.block_tiles))
    tile_px = int(np.prod(plan.read_shape))
    out_px = int(np.prod([t + 2 * (plan.context - plan.geometry.trim) for t in plan.tile]))
    source = read_px * img.channels * (img.dtype.itemsize + 4)
    batch = tiles * tile_px * img.channels * 4 * 2  # numpy stack + tensor
    acts = tiles * tile_px * (p.model.activation_bytes_per_pixel or 0.0)
    logits = tiles * out_px * p.workflow.model.num_classes * 4
    labels = int(np.prod(plan.block_shape)) * 8
    return int(source + batch + acts + logits + labels)


def run(wf: Workflow, out: TextIO | None = None, err: TextIO | None = None) -> RunResult:
    """Run the workflow end to end; prints the plan, progress, output and report paths."""
    out, err = out or sys.stdout, err or sys.stderr
    started = time.perf_counter()
    prepared = prepare(wf)
    plan = prepared.plan
    print(describe_plan(prepared), file=out, flush=True)
    run_id = create_label_volume(
        wf.output.path,
        shape=plan.image_shape,
        chunks=plan.block_shape,
        dtype=prepared.label_dtype,
        provenance=_provenance(prepared),
        overwrite=wf.output.overwrite,
    )
    spec = InferenceSpec(
        image=ImageSpec(wf.input.path, wf.input.channel_axis, "input.path"),
        model=wf.model,
        plan=plan,
        output_path=wf.output.path,
        run_id=run_id,
        label_dtype=str(prepared.label_dtype),
        device=wf.inference.device,
        torch_threads=prepared.cluster.torch_threads,
    )
    scores = None
    with connect(wf.cluster) as client:
        compute_seconds = _predict_all(client, spec, prepared, err)
        mark_complete(
            wf.output.path,
            {
                "blocks": plan.n_blocks,
                "tiles": plan.n_tiles,
                "seconds": round(compute_seconds, 3),
                "megapixels_per_second": round(np.prod(plan.image_shape) / compute_seconds / 1e6, 4),
            },
        )
        print(f"labels     {wf.output.path} (complete)", file=out, flush=True)
        if wf.evaluation is not None:
            scores = evaluate_paths(
                ImageSpec(wf.output.path, None, "output.path"),
                ImageSpec(wf.evaluation.ground_truth, None, "evaluation.ground_truth"),
                wf.model.num_classes,
                wf.evaluation.ignore_index,
            )
    report_path = None
    if scores is not None:
        report_path = prepared.report_path
        names = class_names(wf.model.num_classes)
        document = {
            "prediction": wf.output.path,
            "ground_truth": wf.evaluation.ground_truth,
            "workflow": wf.source,
            "num_classes": wf.model.num_classes,
            "ignore_index": wf.evaluation.ignore_index,
            "model": prepared.model.identity,
            **scores_to_dict(scores, names),
        }
        if prepared.model.untrained:
            document["note"] = UNTRAINED_NOTE
        write_json(report_path, document)
        print(f"report     {report_path}", file=out)
        print(format_table(scores, names), file=out)
        if prepared.model.untrained:
            print(f"note: {UNTRAINED_NOTE}", file=out)
    total = time.perf_counter() - started
    print(f"done in {format_seconds(total)}", file=out, flush=True)
    return RunResult(wf.output.path, report_path, scores, total)


def _predict_all(client: Any, spec: InferenceSpec, p: Prepared, err: TextIO) -> float:
    plan = p.plan
    indices = [b.index for b in plan.blocks()]
    progress = Progress(plan.n_blocks, plan.n_tiles, err)
    start = time.perf_counter()
    shared = client.scatter(spec, broadcast=True)
    futures = client.map(
        run_block,
        indices,
        spec=shared,
        key=[f"predict-{spec.run_id[:8]}-{'-'.join(map(str, i))}" for i in indices],
    )
    index_of = {f.key: i for f, i in zip(futures, indices)}
    try:
        for future in as_completed(futures):
            if future.status == "error":
                raise _block_failure(index_of[future.key], plan, future.exception(), spec)
            result = future.result()
            progress.update(result.tiles, result.pixels)
    except BaseException:
        client.cancel(futures)
        raise
    return time.perf_counter() - start


def _block_failure(index: tuple[int, ...], plan: TilePlan, exc: BaseException, spec: InferenceSpec) -> PipelineError:
    box = plan.block(index).write
    where = ", ".join(f"{a}:{b}" for a, b in zip(box.offset, box.stop))
    detail = str(exc) if isinstance(exc, PipelineError) else _one_line(exc)
    return ExecutionError(
        f"block {index} (pixels {where}) of {spec.image.path} failed: {detail}; "
        f"{spec.output_path} is left marked incomplete"
    )


def _one_line(exc: BaseException) -> str:
    """First and last line of an error (TorchScript and CUDA errors carry long traces)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}"


def _provenance(p: Prepared) -> dict[str, Any]:
    plan = p.plan
    return {
        "version": __version__,
        "workflow_file": p.workflow.source,
        "workflow": p.workflow.model_dump(mode="json"),
        "model": p.model.identity,
        "plan": {
            "tile": list(plan.tile),
            "context": plan.context,
            "halo": p.model.geometry.halo,
            "trim": p.model.geometry.trim,
            "shift_period": p.model.geometry.shift_period,
            "mirror": plan.mirror,
            "block_tiles": list(plan.block_tiles),
            "blocks": plan.n_blocks,
        },
    }


def _params(params: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in params.items() if k != "arch") + ")"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
