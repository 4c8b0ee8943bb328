"""Run a workflow: plan -> one Dask task per block (infer + write) -> evaluate -> report.

Every run leaves ``<output stem>.run.json`` beside the volume (also when it fails or is
interrupted): what ran, where, how fast, and what happened to every block. A run that
stops early leaves the volume ``running`` with its finished blocks in the ledger, and
``pipeline run --resume`` computes only the rest.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import dask.array as da

from . import __version__
from .cluster import Connection, connect
from .cluster.environment import allocator_environment
from .config import NormalizeConfig, Workflow
from .crs import crs_wkt
from .errors import ExecutionError, PipelineError, ResumeRefusedError, RunInterrupted
from .evaluation import LabelPair
from .execution import BlockCounts, build_pyramid, execute_blocks, one_line
from .image_set import SET_KIND, ImageSet, check_set_files, describe_set, expand_images, prepare_set
from .inference import InferenceSpec, measure_batch_size
from .instance_report import format_instances
from .instance_volume import InstanceResult, write_instance_volume
from .io import fs
from .io.checkpoints import describe_training
from .io.geotiff import geotiff_path, write_geotiff
from .io.images import ImageSpec, as_dask_array, pinned_version
from .io.labels import (
    PROBABILITIES,
    changed_fingerprints,
    check_run,
    create_label_volume,
    is_complete,
    is_label_volume,
    mark_complete,
    open_label_volume,
    record_reports,
    recorded_run,
    resume_label_volume,
)
from .io.locks import output_lock
from .io.ome import label_group_attributes, label_image_name, register_label, source_image_path
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
    instance_evaluation,
    instance_pair,
    instance_spec,
    instances_path,
    label_name_in_input,
    non_finite_fill,
    prepare,
    replan,
    report_files,
    run_json_path,
    storage_rules,
    truth_spec,
)
from .probabilities import UINT8_SCALE
from .progress import Progress, format_seconds
from .provenance import public_workflow, run_document, run_fingerprints
from .report import UNTRAINED_NOTE, format_table, write_json
from .scorecard import ReportFiles, evaluate_and_report
from .sizing import worker_memory_budget
from .skip_blocks import plan_skips
from .tuning import Limits, RuntimeChoice, choose_runtime

PROCESS_BYTES = 1 << 30  # a worker process itself: Python, torch, the model, Dask


@dataclass(frozen=True)
class RunResult:
    output_path: str
    report_path: str | None
    scores: Scores | None
    seconds: float
    blocks: BlockCounts | None = None


@dataclass
class RunState:
    """What run.json reports, filled in as the run goes."""

    status: str = "starting"
    run_id: str | None = None
    cluster: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    blocks: BlockCounts | None = None
    tiles: int = 0
    megapixels_per_second: float | None = None
    error: str | None = None
    runtime: dict[str, Any] | None = None  # forward passes at once, torch threads, memory format
    instances: dict[str, Any] | None = None  # the instance volume, its object count and tables

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "run_id": self.run_id,
            "cluster": self.cluster,
            "timings": {k: round(v, 3) for k, v in (self.timings or {}).items()},
            "blocks": self.blocks.as_dict() if self.blocks else None,
            "tiles": self.tiles,
            "megapixels_per_second": self.megapixels_per_second,
            "runtime": self.runtime,
            **({"instances": self.instances} if self.instances is not None else {}),
            "error": self.error,
        }


def run(
    wf: Workflow,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    resume: bool = False,
    performance_report: str | None = None,
) -> RunResult:
    """Run the workflow end to end; prints the plan, progress, output and report paths.

    ``resume``: if the output holds an interrupted run of the same input, model and
    label-deciding settings, compute only its missing blocks (else start as usual). A
    workflow over several images (:mod:`pipeline.image_set`) runs them one after another
    on one cluster: see :func:`run_set`.
    """
    out, err = out or sys.stdout, err or sys.stderr
    images = expand_images(wf)
    if images is not None:
        return run_set(images, out, err, resume=resume, performance_report=performance_report)
    started = time.perf_counter()
    prepared = prepare(wf, resume=resume)
    plan_seconds = time.perf_counter() - started
    print(describe_plan(prepared), file=out, flush=True)
    with _named_in(wf), connect(wf.cluster, wf.inference.device) as conn:
        _say_connected(conn, wf, out)
        scores, state = _run_image(
            wf, prepared, conn, _Options(resume, performance_report, True), out, err, started, plan_seconds
        )
    total = time.perf_counter() - started
    print(f"run        {fs.redact(run_json_path(wf))}", file=out)
    print(f"done in {format_seconds(total)}", file=out, flush=True)
    report_path = str(ReportFiles.beside(wf.output.path).json) if scores is not None else None
    return RunResult(wf.output.path, report_path, scores, total, state.blocks)


@dataclass
class _Options:
    """How each image of a run runs; ``measured`` keeps what one image measured for the next."""

    resume: bool
    performance_report: str | None
    evaluate: bool  # the image's own evaluation (a set evaluates its images together)
    measured: dict[Any, Any] = field(default_factory=dict)


def _run_image(
    wf: Workflow,
    prepared: Prepared,
    conn: Connection,
    options: _Options,
    out: TextIO,
    err: TextIO,
    started: float,
    plan_seconds: float,
) -> tuple[Scores | None, RunState]:
    """One image on a connected cluster, under its output's lock; ``run.json`` whatever happens."""
    timings: dict[str, float] = {"plan": plan_seconds}
    state = RunState(timings=timings)
    reports = report_files(wf)
    with output_lock(wf.output.path):
        try:
            scores = _run_connected(wf, prepared, conn, state, reports, options, out, err)
        except (KeyboardInterrupt, RunInterrupted) as exc:
            state.status = "interrupted"
            signal_name = exc.signal_name if isinstance(exc, RunInterrupted) else "SIGINT"
            if isinstance(exc, RunInterrupted):
                exc.reported = True
            print(
                f"interrupted ({signal_name}): the run's tasks were cancelled and the cluster "
                f"stopped; {fs.redact(wf.output.path)} keeps its written blocks: rerun with --resume to "
                f"compute the rest",
                file=err,
                flush=True,
            )
            raise
        except BaseException as exc:
            state.status = "failed"
            state.error = fs.redact(str(exc).splitlines()[0]) if isinstance(exc, PipelineError) else type(exc).__name__
            raise
        finally:
            timings["total"] = time.perf_counter() - started
            if state.run_id is not None:
                _write_run_json(wf, prepared, state, reports)
    return scores, state


def run_set(
    images: ImageSet, out: TextIO, err: TextIO, *, resume: bool = False, performance_report: str | None = None
) -> RunResult:
    """Each image of the set as a single-image run would do it, one after another on one
    cluster; then the pooled evaluation of all of them, and ``<folder>/run.json``.

    Every image is checked before any is written. ``resume`` keeps the complete volumes
    of an earlier run of the same set (same fingerprints), resumes an interrupted one and
    runs the rest.
    """
    started = time.perf_counter()
    wf = images.workflow
    prepared = prepare_set(images, resume)
    check_set_files(images, resume)
    plan_seconds = time.perf_counter() - started
    print(describe_set(images, prepared), file=out, flush=True)
    options = _Options(resume, None, False)
    entries: dict[str, dict[str, Any]] = {item.name: {"status": "pending"} for item in images.images}
    record: dict[str, Any] = {"status": "running", "images": entries}
    scores = None
    with ExitStack() as stack:
        stack.enter_context(_named_in(wf))
        conn = stack.enter_context(connect(wf.cluster, wf.inference.device))
        _say_connected(conn, wf, out)
        if performance_report:
            from distributed import performance_report as dask_report

            stack.enter_context(dask_report(filename=performance_report))
        try:
            for number, (item, p) in enumerate(zip(images.images, prepared, strict=True), 1):
                one = item.workflow
                entry = entries[item.name]
                entry.update(input=fs.redact(one.input.image_path), output=fs.redact(one.output.path))
                shape = " x ".join(map(str, p.image.shape))
                print(
                    f"image      {number} of {len(prepared)}: {item.name} ({shape} px) -> {fs.redact(one.output.path)}",
                    file=out,
                    flush=True,
                )
                t = time.perf_counter()
                if resume and _complete_and_unchanged(one, p):
                    entry["status"] = "kept"
                    print("           complete from an earlier run of this set: kept", file=out, flush=True)
                    continue
                entry["status"] = "running"
                _, state = _run_image(one, p, conn, options, out, err, t, plan_seconds if number == 1 else 0.0)
                seconds = time.perf_counter() - t
                entry.update(
                    status=state.status, seconds=round(seconds, 3), run=fs.redact(run_json_path(one)),
                    megapixels_per_second=state.megapixels_per_second,
                    blocks=state.blocks.as_dict() if state.blocks else None,
                )  # fmt: skip
                _write_set_record(images, record, None)  # progress across images, for whoever watches
            if wf.evaluation is not None:
                scores = _evaluate_set(images, prepared, out)
            record["status"] = "complete"
        except (KeyboardInterrupt, RunInterrupted):
            record["status"] = "interrupted"
            _mark_current(entries, "interrupted")
            raise
        except BaseException as exc:
            record["status"] = "failed"
            record["error"] = fs.redact(str(exc).splitlines()[0]) if isinstance(exc, PipelineError) else type(exc).__name__
            _mark_current(entries, "failed")
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - started, 3)
            _write_set_record(images, record, scores)
    total = time.perf_counter() - started
    kept = sum(1 for e in entries.values() if e["status"] == "kept")
    print(
        f"images     {len(entries)} complete" + (f" ({kept} kept from an earlier run)" if kept else "")
        + f", one label volume each under {fs.redact(images.folder)}",
        file=out,
    )  # fmt: skip
    print(f"run        {fs.redact(images.record_path)}", file=out)
    print(f"done in {format_seconds(total)}", file=out, flush=True)
    report_path = images.reports.json if scores is not None else None
    return RunResult(images.folder, report_path, scores, total)


def _mark_current(entries: dict[str, dict[str, Any]], status: str) -> None:
    for entry in entries.values():
        if entry["status"] == "running":
            entry["status"] = status


def _complete_and_unchanged(wf: Workflow, p: Prepared) -> bool:
    """The image's volume is complete and was computed from this input, model and settings."""
    path = wf.output.path
    if not is_complete(path):
        return False
    record = recorded_run(path)
    if record is None:
        return False
    return not changed_fingerprints(record.get("fingerprints", {}), run_fingerprints(wf, p.model.identity, p.plan))


def _evaluate_set(images: ImageSet, prepared: list[Prepared], out: TextIO) -> Scores:
    """Every image against its ground truth: per image and pooled, in the set's folder."""
    wf = images.workflow
    ev = wf.evaluation
    assert ev is not None
    spec = evaluation_spec(ev, wf.model.num_classes)
    pairs = [
        LabelPair(
            item.name,
            ImageSpec(item.workflow.output.path, None, "output.path"),
            truth_spec(item.workflow),
            ignore_mask_spec(item.workflow),
        )
        for item in images.images
    ]
    extra: dict[str, Any] = {"workflow": wf.source, "model": prepared[0].model.identity, "images": len(pairs)}
    if prepared[0].model.untrained:
        extra["note"] = UNTRAINED_NOTE
    files = images.reports
    objects = instance_evaluation(wf, prepared[0].plan.image_shape)
    doc, scores = evaluate_and_report(
        pairs, spec, files, ev.bootstrap, ev.confidence, image=input_spec(images.images[0].workflow), extra=extra,
        instances=objects, instance_pairs=[instance_pair(item.workflow) for item in images.images] if objects else None,
    )  # fmt: skip
    for path in files.written():
        print(f"report     {fs.redact(path)}", file=out)
    print(f"{len(pairs)} images; pooled (dataset-level) statistics:", file=out)
    print(format_table(scores, spec.names), file=out)
    if "instances" in doc:
        print(format_instances(doc["instances"]), file=out)
    trained = describe_training(wf.model.path)
    if trained:
        print(f"model      {trained}", file=out)
    if prepared[0].model.untrained:
        print(f"note: {UNTRAINED_NOTE}", file=out)
    return scores


def _write_set_record(images: ImageSet, record: dict[str, Any], scores: Scores | None) -> None:
    """``<folder>/run.json``: the set's status and every image's, with the workflow that ran."""
    document = {
        "pipeline_version": __version__,
        "kind": SET_KIND,
        "workflow_file": images.workflow.source,
        "workflow": public_workflow(images.workflow),
        **record,
        "evaluation": fs.redact(images.reports.json or "") if scores is not None else None,
    }
    try:
        write_json(images.record_path, document)
    except PipelineError:
        pass  # a store refusing the record must not hide the run's own error


@contextmanager
def _named_in(wf: Workflow) -> Iterator[None]:
    """User errors raised once the run started (cluster, resume) name the workflow file too,
    as ``prepare``'s do; a failed block (ExecutionError) already names its image."""
    try:
        yield
    except PipelineError as exc:
        if isinstance(exc, ExecutionError) or str(exc).startswith(f"{wf.source}: "):
            raise
        raise type(exc)(f"{wf.source}: {exc}") from None


def _say_connected(conn: Connection, wf: Workflow, out: TextIO) -> None:
    """What a user needs to know of the cluster once it is there: its shape, its dashboard."""
    if conn.cfg.kind == "address":
        print(f"cluster    {conn.shape.describe()}", file=out, flush=True)
    if conn.dashboard:
        print(f"dashboard  {conn.dashboard}", file=out, flush=True)
    _check_allocator(conn, wf, out)


def _run_connected(
    wf: Workflow,
    prepared: Prepared,
    conn: Connection,
    state: RunState,
    reports: list[str],
    options: _Options,
    out: TextIO,
    err: TextIO,
) -> Scores | None:
    timings = state.timings
    assert timings is not None
    client = conn.client
    resume, performance_report = options.resume, options.performance_report
    plan = prepared.plan
    if wf.inference.batch_size == "auto":
        key = ("batch", plan.network_read_shape)
        if key not in options.measured:
            options.measured[key] = client.submit(
                measure_batch_size, wf.model, wf.inference, plan.network_read_shape, storage_rules(wf), pure=False,
                resources={"GPU": 1} if conn.gpu_tasks else None,  # measured where blocks will run
            ).result()  # fmt: skip
        batch = options.measured[key]
        prepared = replan(prepared, batch)
        plan = prepared.plan
        print(f"batch      {batch} tiles per forward pass (from free device memory)", file=out, flush=True)
        skip = plan_skips(wf, prepared.image, plan)  # the blocks the mask skips, on the new grid
        prepared = replace(prepared, skip=skip)
        if skip is not None:
            print(f"skip       {skip.describe(plan.n_blocks)}", file=out, flush=True)
    choice = _tune(conn, wf, prepared, out, options.measured)
    image = pinned_version(input_spec(wf))
    check_output_location(wf)
    fingerprints = run_fingerprints(wf, prepared.model.identity, plan)
    done: set[tuple[int, ...]] = set()
    t = time.perf_counter()
    if resume and is_label_volume(wf.output.path):
        try:
            run_id, done = resume_label_volume(wf.output.path, fingerprints, reports)
        except ResumeRefusedError as exc:
            if not wf.output.overwrite:
                raise
            raise ResumeRefusedError(
                str(exc).replace("set output.overwrite: true to start over", "run without --resume to start over")
            ) from None
        record = check_run(wf.output.path, run_id)
        pyramid: dict[str, Any] = record.get("pyramid") or {}  # as the volume was created: a resumed run keeps its layout
        probabilities = record.get("probabilities")
        normalize = NormalizeConfig.model_validate(record["normalization"], strict=False)
        choice = _kept_memory_format(choice, record)
        print(
            f"resume     {len(done)} of {plan.n_blocks} blocks were written by the interrupted "
            f"run {run_id[:8]}; computing the other {plan.n_blocks - len(done)}",
            file=out,
            flush=True,
        )
    else:
        normalize = resolve_normalization(prepared.normalize, image, non_finite_fill(wf))
        if not prepared.normalize.fixed:
            print(f"normalise  resolved: {describe_normalization(normalize)}", file=out, flush=True)
        pyramid = {"levels": len(prepared.pyramid), "downsampling": wf.output.downsampling}
        probabilities = wf.output.probability_dtype
        run_id = create_label_volume(
            wf.output.path,
            shape=plan.image_shape,
            chunks=plan.block_shape,
            dtype=prepared.label_dtype,
            provenance={
                **_provenance(prepared, normalize),
                "runtime": choice.as_dict(),
                "fingerprints": fingerprints,
                "pyramid": pyramid,
                "pixels": prepared.pixel_grid.as_dict(),
                "probabilities": probabilities,
            },
            overwrite=wf.output.overwrite,
            reports=reports,
            inner_chunks=prepared.output_chunks,
            sharded=wf.output.shard,
            pyramid=prepared.pyramid,
            ome=_ome_attributes(wf, prepared),
            attributes={**_geo_attributes(prepared), **_probability_attributes(wf)},
            probabilities=(wf.model.num_classes, probabilities) if probabilities else None,
            ngff=wf.output.ngff,
        )
    timings["normalization"] = time.perf_counter() - t
    state.run_id = run_id
    state.runtime = choice.as_dict()
    print(f"runtime    {choice.describe()}", file=out, flush=True)
    spec = InferenceSpec(
        image=image,
        model=wf.model,
        normalize=normalize,
        plan=plan,
        output_path=wf.output.path,
        run_id=run_id,
        label_dtype=str(prepared.label_dtype),
        inference=wf.inference.model_copy(update={"channels_last": choice.channels_last}),
        torch_threads=choice.torch_threads,
        compute_slots=choice.slots,
        release_above=_heap_bound(conn, wf, prepared, choice),
        fill_value=non_finite_fill(wf),
        skip=prepared.skip.rule if prepared.skip else None,
        probabilities=probabilities,
    )
    masked = prepared.skip.masked if prepared.skip else frozenset()
    todo = [i for i in plan.block_indices() if i not in done]  # indices only: cheap at 10^5 blocks
    resumed_tiles = sum(plan.tiles_in(i) for i in done)
    state.blocks = counts = BlockCounts(plan.n_blocks, resumed=len(done))
    progress = Progress(
        plan.n_blocks, plan.n_tiles, err, resumed_blocks=len(done), resumed_tiles=resumed_tiles,
        expected_skips=len(masked - done),
    )  # fmt: skip
    state.status = "running"
    with ExitStack() as report_stack:
        if performance_report:
            from distributed import performance_report as dask_report

            report_stack.enter_context(dask_report(filename=performance_report))
        try:
            execution = execute_blocks(conn, spec, todo, counts, progress, masked)
        finally:
            state.cluster = {"description": conn.shape.describe(), **_describe(conn)}
    timings["predict"] = execution.seconds
    timings["submit"] = execution.submit_seconds
    if pyramid.get("levels"):
        timings["pyramid"] = build_pyramid(
            conn, wf.output.path, run_id, int(pyramid["levels"]), pyramid["downsampling"], storage_rules(wf)
        )
        print(f"pyramid    {pyramid['levels']} more levels written ({pyramid['downsampling']})", file=out, flush=True)
    if wf.output.geotiff:
        t = time.perf_counter()
        target = geotiff_path(wf.output.path)
        with fs.storage_errors("output.geotiff", target, "write"):
            write_geotiff(wf.output.path, 1 + int(pyramid.get("levels") or 0), prepared.pixel_grid.georeference, target)
        timings["geotiff"] = time.perf_counter() - t
        print(f"geotiff    {fs.redact(target)}", file=out, flush=True)
    computed_pixels = execution.computed_pixels  # by the model: skipped blocks are not in the rate
    state.tiles = plan.n_tiles - resumed_tiles
    state.megapixels_per_second = round(computed_pixels / execution.seconds / 1e6, 4) if execution.seconds else None
    summary: dict[str, Any] = {
        "blocks": plan.n_blocks,
        "tiles": plan.n_tiles,
        "seconds": round(execution.seconds, 3),
        "megapixels_per_second": state.megapixels_per_second,
        "block_counts": counts.as_dict(),
        "cluster": state.cluster,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if execution.filled:
        summary["non_finite_pixels_filled"] = execution.filled
        print(
            f"note: {execution.filled} NaN/infinite input pixels were replaced by "
            f"{wf.input.fill_value:g} (input.non_finite: fill)",
            file=out,
            flush=True,
        )
    mark_complete(wf.output.path, run_id, summary)
    name = label_name_in_input(wf)
    if name is not None:  # listed beside the image only now that it is complete
        register_label(wf.input.image_path, name)
    state.status = "complete"
    print(counts.describe(), file=out, flush=True)
    print(f"labels     {fs.redact(wf.output.path)} (complete)", file=out, flush=True)
    if performance_report:
        print(f"dask       performance report {performance_report}", file=out, flush=True)
    if wf.instances is not None:
        t = time.perf_counter()
        state.instances = _instances(wf, prepared, resume, out).as_dict()
        timings["instances"] = time.perf_counter() - t
    if wf.evaluation is None or not options.evaluate:
        return None
    t = time.perf_counter()
    try:
        return _evaluate(wf, prepared, out)
    finally:
        timings["evaluate"] = time.perf_counter() - t


def _instances(wf: Workflow, prepared: Prepared, resume: bool, out: TextIO) -> InstanceResult:
    """The objects of the finished labels: the instance volume and its object table.

    ``--resume`` recomputes them (cheap next to inference), replacing an unfinished volume
    of this pipeline's.
    """
    labels = da.from_zarr(open_label_volume(wf.output.path))
    target = instances_path(wf)
    result = write_instance_volume(
        labels, target, instance_spec(wf, labels.ndim),
        overwrite=wf.output.overwrite or resume,
        grid=prepared.pixel_grid,
        image=as_dask_array(input_spec(wf)),
        provenance={"labels": fs.name(wf.output.path), "workflow_file": wf.source},
        ngff=wf.output.ngff, pyramid=wf.output.pyramid, out=out,
    )  # fmt: skip
    name = label_image_name(target, wf.input.image_path)
    if name is not None:  # beside the class labels in the OME-Zarr image's labels group
        register_label(wf.input.image_path, name)
    return result


def _ome_attributes(wf: Workflow, prepared: Prepared) -> dict[str, Any]:
    """The volume's OME-NGFF metadata: levels, pixel size, class colours and names."""
    classes = wf.output.classes or (wf.evaluation.classes if wf.evaluation is not None else None)
    return label_group_attributes(
        fs.stem(wf.output.path),
        1 + len(prepared.pyramid),
        prepared.pixel_grid,
        wf.output.downsampling,
        wf.model.num_classes,
        [c.name for c in classes] if classes else None,
        [c.colour for c in classes] if classes else None,
        source_image=source_image_path(wf.output.path, wf.input.image_path),
        version=wf.output.ngff,
    )


def _probability_attributes(wf: Workflow) -> dict[str, Any]:
    """How to read the ``probabilities`` array: its axes, encoding and classes."""
    dtype = wf.output.probability_dtype
    if dtype is None:
        return {}
    classes = wf.output.classes or (wf.evaluation.classes if wf.evaluation is not None else None)
    return {
        "probabilities": {
            "array": PROBABILITIES,
            "dtype": dtype,
            "scale": UINT8_SCALE if dtype == "uint8" else 1,
            "meaning": "softmax of the logits per class; stored value / scale = probability",
            "classes": [c.name for c in classes] if classes else [f"class {k}" for k in range(wf.model.num_classes)],
        }
    }


def _geo_attributes(prepared: Prepared) -> dict[str, Any]:
    """A georeferenced input's CRS and transform, beside the OME metadata (as GDAL states them)."""
    geo = prepared.pixel_grid.georeference
    return {} if geo is None else {"georeference": {**geo.as_dict(), "crs_wkt": crs_wkt(geo.crs)}}


def _tune(
    conn: Connection, wf: Workflow, prepared: Prepared, out: TextIO, measured: dict[Any, Any]
) -> RuntimeChoice:
    """Forward passes at once, torch threads each and memory format, measured on a worker
    where blocks run (or as configured), within its cores and memory; once per task size
    in a run over several images."""
    shape = conn.shape
    memory = worker_memory_budget(wf, shape)
    limits = Limits(shape.slots, shape.cores_per_worker, prepared.task_bytes or 0, memory, shape.torch_threads)
    key = ("runtime", limits, prepared.plan.read_shape)
    if key in measured:
        return measured[key]
    try:
        measured[key] = conn.client.submit(
            choose_runtime, wf.model, wf.inference, prepared.model.geometry, limits,
            storage_rules(wf), pure=False, resources={"GPU": 1} if conn.gpu_tasks else None,
        ).result()  # fmt: skip
        return measured[key]
    except Exception as exc:  # the blocks report a real problem with the model in their own words
        print(f"note       runtime not measured ({one_line(exc)}): as configured", file=out, flush=True)
        configured = wf.inference
        threads = shape.torch_threads or 1 if configured.torch_threads == "auto" else int(configured.torch_threads)
        slots = max(1, min(shape.slots, (shape.cores_per_worker or shape.slots) // threads))
        return RuntimeChoice(slots, threads, configured.channels_last is not False)


def _heap_bound(conn: Connection, wf: Workflow, prepared: Prepared, choice: RuntimeChoice) -> int | None:
    """A worker's resident memory beyond which it releases its free heap after a block: half
    again what its passes at once need (plus the process itself), within its memory budget."""
    if prepared.task_bytes is None or wf.cluster.allocator != "tuned":
        return None
    needed = int(1.5 * choice.slots * prepared.task_bytes)
    budget = worker_memory_budget(wf, conn.shape)
    return (needed if budget is None else min(needed, budget)) + PROCESS_BYTES


def _check_allocator(conn: Connection, wf: Workflow, out: TextIO) -> None:
    """Workers someone else started may lack the allocator settings: say so, and how."""
    if wf.cluster.allocator != "tuned" or conn.gpu_tasks:
        return
    tuned = conn.allocator_tuned()
    missing = sum(1 for ok in tuned.values() if not ok)
    if missing:
        exports = " ".join(f"{k}={v}" for k, v in allocator_environment().items())
        print(
            f"note       {missing} of {len(tuned)} workers run without the tuned allocator "
            f"settings (forward passes up to 2x slower on CPUs); start them with: {exports}",
            file=out,
            flush=True,
        )


def _kept_memory_format(choice: RuntimeChoice, record: dict[str, Any]) -> RuntimeChoice:
    """A resumed volume keeps the memory format its run measured (it may round logits apart)."""
    kept = (record.get("runtime") or {}).get("channels_last")
    return replace(choice, channels_last=kept) if isinstance(kept, bool) else choice


def _describe(conn: Connection) -> dict[str, Any]:
    try:
        return conn.describe()
    except Exception:  # the cluster is gone (interrupted, lost): keep what the plan knew
        return {"backend": conn.cfg.kind}


def _write_run_json(wf: Workflow, p: Prepared, state: RunState, reports: list[str]) -> None:
    """``run.json`` beside the volume, listed (with its hash) in the volume's record.

    No report file existed when the volume was created (checked under the lock), so every
    one there now is this run's, also when evaluation failed halfway.
    """
    assert state.run_id is not None
    document = run_document(wf, p.model.identity, state.as_dict())
    write_json(run_json_path(wf), document)
    try:
        record_reports(wf.output.path, state.run_id, [r for r in reports if fs.is_file(r)])
    except PipelineError:
        pass  # the volume was replaced meanwhile: its record is not ours to change


def _evaluate(wf: Workflow, prepared: Prepared, out: TextIO) -> Scores:
    ev = wf.evaluation
    assert ev is not None
    spec = evaluation_spec(ev, wf.model.num_classes)
    pair = LabelPair(
        fs.stem(wf.output.path),
        ImageSpec(wf.output.path, None, "output.path"),
        truth_spec(wf),
        ignore_mask_spec(wf),
    )
    files = ReportFiles.beside(wf.output.path, instances=ev.instances)
    extra: dict[str, Any] = {"workflow": wf.source, "model": prepared.model.identity}
    if prepared.model.untrained:
        extra["note"] = UNTRAINED_NOTE
    objects = instance_evaluation(wf, prepared.plan.image_shape)
    doc, scores = evaluate_and_report(
        [pair], spec, files, ev.bootstrap, ev.confidence, image=input_spec(wf), extra=extra,
        instances=objects, instance_pairs=[instance_pair(wf)] if objects else None,
    )  # fmt: skip
    for path in files.written():
        print(f"report     {fs.redact(path)}", file=out)
    print(format_table(scores, spec.names), file=out)
    if "instances" in doc:
        print(format_instances(doc["instances"]), file=out)
    trained = describe_training(wf.model.path)
    if trained:
        print(f"model      {trained}", file=out)
    if prepared.model.untrained:
        print(f"note: {UNTRAINED_NOTE}", file=out)
    return scores


def _provenance(p: Prepared, normalize: NormalizeConfig) -> dict[str, Any]:
    plan = p.plan
    return {
        "normalization": normalize.model_dump(mode="json"),
        "version": __version__,
        "workflow_file": p.workflow.source,
        "workflow": public_workflow(p.workflow),
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
