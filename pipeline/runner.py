"""Run a workflow: plan -> one Dask task per block (infer + write) -> evaluate -> report."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from distributed import KilledWorker, as_completed

from . import __version__
from .cluster import connect
from .config import NormalizeConfig, Workflow
from .errors import ExecutionError, PipelineError
from .evaluation import LabelPair
from .inference import InferenceSpec, measure_batch_size, run_block, share_spec
from .io.images import ImageSpec
from .io.labels import create_label_volume, mark_complete, record_reports
from .io.locks import output_lock
from .metrics import Scores
from .normalization import resolve_normalization
from .planning import (
    Prepared,
    check_output_location,
    describe_normalization,
    describe_plan,
    evaluation_spec,
    ignore_mask_spec,
    input_spec,
    make_plan,
    non_finite_fill,
    prepare,
    report_files,
    truth_spec,
)
from .progress import Progress, format_seconds
from .report import UNTRAINED_NOTE, format_table
from .scorecard import ReportFiles, evaluate_and_report
from .tiling import TilePlan


@dataclass(frozen=True)
class RunResult:
    output_path: str
    report_path: str | None
    scores: Scores | None
    seconds: float


def run(wf: Workflow, out: TextIO | None = None, err: TextIO | None = None) -> RunResult:
    """Run the workflow end to end; prints the plan, progress, output and report paths."""
    out, err = out or sys.stdout, err or sys.stderr
    started = time.perf_counter()
    prepared = prepare(wf)
    plan = prepared.plan
    print(describe_plan(prepared), file=out, flush=True)
    image = input_spec(wf)
    scores = None
    reports = report_files(wf)
    with output_lock(wf.output.path), connect(wf.cluster, wf.inference.device) as client:
        if wf.inference.batch_size == "auto":
            batch = client.submit(measure_batch_size, wf.model, wf.inference, plan.read_shape, pure=False).result()
            prepared = replace(prepared, plan=make_plan(wf, prepared.image, prepared.model, batch))
            plan = prepared.plan
            print(f"batch      {batch} tiles per forward pass (from free device memory)", file=out, flush=True)
        normalize = resolve_normalization(prepared.normalize, image, non_finite_fill(wf))
        if not prepared.normalize.fixed:
            print(f"normalise  resolved: {describe_normalization(normalize)}", file=out, flush=True)
        check_output_location(wf)
        run_id = create_label_volume(
            wf.output.path,
            shape=plan.image_shape,
            chunks=plan.block_shape,
            dtype=prepared.label_dtype,
            provenance=_provenance(prepared, normalize),
            overwrite=wf.output.overwrite,
            reports=reports,
        )
        spec = InferenceSpec(
            image=image,
            model=wf.model,
            normalize=normalize,
            plan=plan,
            output_path=wf.output.path,
            run_id=run_id,
            label_dtype=str(prepared.label_dtype),
            inference=wf.inference,
            torch_threads=prepared.cluster.torch_threads,
            fill_value=non_finite_fill(wf),
        )
        compute_seconds, filled = _predict_all(client, spec, prepared, err)
        summary: dict[str, Any] = {
            "blocks": plan.n_blocks,
            "tiles": plan.n_tiles,
            "seconds": round(compute_seconds, 3),
            "megapixels_per_second": round(np.prod(plan.image_shape) / compute_seconds / 1e6, 4),
        }
        if filled:
            summary["non_finite_pixels_filled"] = filled
            print(
                f"note: {filled} NaN/infinite input pixels were replaced by "
                f"{wf.input.fill_value:g} (input.non_finite: fill)",
                file=out,
                flush=True,
            )
        mark_complete(wf.output.path, run_id, summary)
        print(f"labels     {wf.output.path} (complete)", file=out, flush=True)
        if wf.evaluation is not None:
            try:
                scores = _evaluate(wf, prepared, out)
            finally:
                # No report file existed when the volume was created (checked under the lock),
                # so every one there now is this run's, also when evaluation failed halfway.
                record_reports(wf.output.path, run_id, [r for r in reports if r.is_file()])
    total = time.perf_counter() - started
    print(f"done in {format_seconds(total)}", file=out, flush=True)
    report_path = str(reports[0]) if scores is not None else None
    return RunResult(wf.output.path, report_path, scores, total)


def _evaluate(wf: Workflow, prepared: Prepared, out: TextIO) -> Scores:
    ev = wf.evaluation
    assert ev is not None
    spec = evaluation_spec(ev, wf.model.num_classes)
    pair = LabelPair(
        Path(wf.output.path).stem,
        ImageSpec(wf.output.path, None, "output.path"),
        truth_spec(wf),
        ignore_mask_spec(wf),
    )
    files = ReportFiles.beside(wf.output.path)
    extra: dict[str, Any] = {"workflow": wf.source, "model": prepared.model.identity}
    if prepared.model.untrained:
        extra["note"] = UNTRAINED_NOTE
    _, scores = evaluate_and_report(
        [pair], spec, files, ev.bootstrap, ev.confidence, image=input_spec(wf), extra=extra
    )
    for path in files.written():
        print(f"report     {path}", file=out)
    print(format_table(scores, spec.names), file=out)
    if prepared.model.untrained:
        print(f"note: {UNTRAINED_NOTE}", file=out)
    return scores


def _predict_all(client: Any, spec: InferenceSpec, p: Prepared, err: TextIO) -> tuple[float, int]:
    """Run every block; returns the compute seconds and the count of filled non-finite pixels.

    The spec reaches the workers as the result of a task, not as scattered data: if the
    worker holding it dies, the scheduler recomputes it elsewhere (or on the restarted
    worker), and the blocks that worker was running are retried.
    """
    plan = p.plan
    indices = [b.index for b in plan.blocks()]
    progress = Progress(plan.n_blocks, plan.n_tiles, err)
    start = time.perf_counter()
    tag = spec.run_id[:8]
    shared = client.submit(share_spec, spec, key=f"spec-{tag}", pure=False)
    futures = client.map(
        run_block,
        indices,
        spec=shared,
        key=[f"predict-{tag}-{'-'.join(map(str, i))}" for i in indices],
    )
    index_of = {f.key: i for f, i in zip(futures, indices)}
    filled = 0
    try:
        for future in as_completed(futures):
            if future.status != "finished":
                raise _block_failure(index_of[future.key], plan, _exception_of(future), spec)
            result = future.result()
            filled += result.filled
            progress.update(result.tiles, result.pixels)
    except BaseException:
        client.cancel(futures + [shared])
        raise
    return time.perf_counter() - start, filled


def _exception_of(future: Any) -> BaseException:
    if future.status == "cancelled":
        return RuntimeError("the task was cancelled (the cluster lost it)")
    try:
        return future.exception()
    except BaseException as exc:  # a lost future raises instead of returning its error
        return exc


def _block_failure(index: tuple[int, ...], plan: TilePlan, exc: BaseException, spec: InferenceSpec) -> PipelineError:
    box = plan.block(index).write
    where = ", ".join(f"{a}:{b}" for a, b in zip(box.offset, box.stop))
    if isinstance(exc, PipelineError):
        detail = str(exc)
    elif isinstance(exc, KilledWorker):
        detail = (
            "the worker process running it died each time it was tried (killed by the system, "
            "e.g. for memory, or crashed in native code)"
        )
    else:
        detail = _one_line(exc)
    return ExecutionError(
        f"block {index} (pixels {where}) of {spec.image.path} failed: {detail}; "
        f"{spec.output_path} is left marked incomplete"
    )


def _one_line(exc: BaseException) -> str:
    """First and last line of an error (TorchScript and CUDA errors carry long traces)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {text}"


def _provenance(p: Prepared, normalize: NormalizeConfig) -> dict[str, Any]:
    plan = p.plan
    return {
        "normalization": normalize.model_dump(mode="json"),
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
