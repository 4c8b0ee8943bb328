"""Everything before computing: check a workflow, plan its tiles, describe the plan.

:func:`prepare` does every check that needs no computation (``pipeline validate``): files,
formats, model, sizes, ground truth, output. :func:`describe_plan` renders the plan as a
person reads it (``pipeline plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .autotile import TileChoice
from .cluster import ClusterShape, check_cluster, cluster_shape
from .config import DeclaredGeometry, EvaluationConfig, NormalizeConfig, Workflow
from .coordinates import PixelGrid, describe_grid
from .downsample import level_shapes
from .encodings import LabelEncoding
from .errors import EvaluationError, OutputExistsError, PipelineError
from .evaluation import EvaluationSpec, LabelPair
from .instance_evaluation import InstanceEvaluationSpec
from .instance_labels import InstanceSpec, check_connectivity
from .instance_volume import as_field, check_instance_classes, default_instances_path, table_paths
from .io import fs
from .io.coordinates import read_pixel_grid
from .io.geotiff import geotiff_path
from .io.images import ImageReader, ImageSpec, open_image
from .io.labels import check_output_free, is_label_volume, label_dtype, recorded_run
from .io.listing import fixed_folder
from .io.locations import check_not_an_input, check_writable
from .io.locks import check_unlocked, store_lock_path
from .io.ome import check_label_group, label_image_name
from .models.loading import LoadedModel, check_declared_halo, load_model, needs_halo_probe
from .models.probe import probe_size
from .probe_samples import probe_samples
from .scorecard import ReportFiles
from .sizing import TaskMemory, choose_plan, estimate_task_bytes, task_budget
from .skip_blocks import plan_skips
from .skipping import SkipPlan
from .tiling import TilePlan

SEGMENT_NOTE_BYTES = 64 << 20


@dataclass(frozen=True)
class Prepared:
    workflow: Workflow
    image: ImageReader
    model: LoadedModel
    plan: TilePlan
    cluster: ClusterShape
    truth: ImageReader | None
    normalize: NormalizeConfig
    notes: tuple[str, ...] = ()
    skip: SkipPlan | None = None  # tiling.skip: the rules, and the blocks the mask skips
    tile_choice: TileChoice | None = None  # how tiling.tile: auto chose the tile
    memory: TaskMemory | None = None  # a block task's memory, by tile size
    grid: PixelGrid | None = None  # the input's pixel size and georeference

    @property
    def pixel_grid(self) -> PixelGrid:
        return self.grid or PixelGrid.unknown(len(self.plan.image_shape))

    @property
    def pyramid(self) -> list[tuple[int, ...]]:
        """Shapes of the label pyramid's levels after the first (none without output.pyramid)."""
        if not self.workflow.output.pyramid:
            return []
        return level_shapes(self.plan.image_shape, self.output_chunks)[1:]

    @property
    def output_chunks(self) -> tuple[int, ...]:
        """The label array's chunks: ``output.chunk``, or one per block."""
        chunk = self.workflow.output.chunk
        planes = self.plan.plane_axes  # a stack's chunks are one plane thick
        return (1,) * planes + (chunk,) * (len(self.plan.block_shape) - planes) if chunk else self.plan.block_shape

    @property
    def task_bytes(self) -> int | None:
        """Estimated peak bytes of one block task (None: the model's memory is unknown)."""
        return None if self.memory is None else estimate_task_bytes(self.plan, self.memory)

    @property
    def label_dtype(self) -> np.dtype:
        return label_dtype(self.workflow.model.num_classes)

    @property
    def report_path(self) -> str | None:
        if self.workflow.evaluation is None:
            return None
        return str(ReportFiles.beside(self.workflow.output.path).json)


def input_spec(wf: Workflow) -> ImageSpec:
    return ImageSpec(
        wf.input.image_path, wf.input.channel_axis, "input.path", wf.input.channels,
        volume=True, series=wf.input.series, level=wf.input.level,
    )  # fmt: skip


def truth_spec(wf: Workflow) -> ImageSpec:
    assert wf.evaluation is not None
    axis = -1 if wf.evaluation.encoding == "palette" else None
    return ImageSpec(wf.evaluation.ground_truth, axis, "evaluation.ground_truth", volume=True)


def ignore_mask_spec(wf: Workflow) -> ImageSpec | None:
    if wf.evaluation is None or wf.evaluation.ignore_mask is None:
        return None
    return ImageSpec(wf.evaluation.ignore_mask, None, "evaluation.ignore_mask", volume=True)


def evaluation_spec(cfg: EvaluationConfig, num_classes: int) -> EvaluationSpec:
    """The evaluation options of a workflow (or of `pipeline evaluate`'s flags)."""
    classes = cfg.classes or []
    encoding = LabelEncoding(
        kind=cfg.encoding,
        palette=tuple(c.colour for c in classes if c.colour is not None) if cfg.encoding == "palette" else (),
        ignore_colours=tuple(cfg.ignore_colours),
    )
    return EvaluationSpec(
        num_classes=num_classes,
        ignore_index=cfg.ignore_index,
        encoding=encoding,
        absent=cfg.absent_classes,
        region=cfg.regions,
        per_slice=cfg.per_slice,
        class_names=tuple(c.name for c in classes) if classes else None,
    )


def storage_rules(wf: Workflow) -> fs.StorageRules:
    """Storage options of every path the workflow names: the top-level default, then each section's."""
    out = wf.output.storage_options
    inputs = wf.input.path if isinstance(wf.input.path, tuple) else (wf.input.path,)
    per_path: dict[str, dict[str, Any] | None] = {fixed_folder(p): wf.input.storage_options for p in inputs}
    per_path.update({
        fixed_folder(wf.output.path): out,
        **{report: out for report in report_files(wf)},
        store_lock_path(wf.output.path): out,
    })  # fmt: skip
    if wf.model.path is not None:  # a bioimage.io description reads its weights from beside it
        model_files = fs.parent(wf.model.path) if wf.model.arch == "bioimageio" else wf.model.path
        per_path[model_files] = wf.model.storage_options
    ev = wf.evaluation
    if ev is not None:
        per_path[fixed_folder(ev.ground_truth)] = ev.storage_options
        if ev.ignore_mask is not None:
            per_path[fixed_folder(ev.ignore_mask)] = ev.storage_options
    skip = wf.tiling.skip
    if skip is not None and skip.mask is not None:
        per_path[skip.mask] = skip.storage_options
    return fs.StorageRules.build(wf.storage_options, per_path)


def prepare(wf: Workflow, resume: bool = False) -> Prepared:
    """All checks short of computing: files, formats, model, sizes, output. Errors name the field.

    ``resume``: an existing volume of this pipeline is no error (the runner checks, under
    the output lock, that it can be resumed). Applies the workflow's storage options to
    this process (:func:`storage_rules`).
    """
    fs.use_rules(storage_rules(wf))
    try:
        return _prepare(wf, resume)
    except PipelineError as exc:
        raise type(exc)(f"{wf.source}: {exc}") from None


def non_finite_fill(wf: Workflow) -> float | None:
    """What replaces NaN/infinite input pixels; None when they are an error."""
    return wf.input.fill_value if wf.input.non_finite == "fill" else None


def report_files(wf: Workflow) -> list[str]:
    """The files a run of ``wf`` writes beside its output: run.json, the evaluation's, the GeoTIFF."""
    evaluation = [] if wf.evaluation is None else ReportFiles.beside(wf.output.path, wf.evaluation.instances).written()
    geotiff = [geotiff_path(wf.output.path)] if wf.output.geotiff else []
    return [run_json_path(wf), *evaluation, *geotiff]


def run_json_path(wf: Workflow) -> str:
    """``out/slide.zarr`` -> ``out/slide.run.json``."""
    return fs.sibling(wf.output.path, f"{fs.stem(wf.output.path)}.run.json")


def protected_inputs(wf: Workflow) -> dict[str, str | None]:
    """Every file a run reads, by field: no output may be, hold or lie inside one."""
    ev = wf.evaluation
    return {
        "input.path": wf.input.image_path,
        "model.path": wf.model.path,
        "evaluation.ground_truth": ev.ground_truth if ev else None,
        "evaluation.ignore_mask": ev.ignore_mask if ev else None,
        "evaluation.truth_instances": ev.truth_instances if ev else None,
        "tiling.skip.mask": wf.tiling.skip.mask if wf.tiling.skip else None,
        "workflow file": None if wf.source == "<memory>" else wf.source,
    }


def label_name_in_input(wf: Workflow) -> str | None:
    """The name, when the output is ``<input>/labels/<name>`` of an OME-Zarr input image."""
    return label_image_name(wf.output.path, wf.input.image_path)


def check_output_location(wf: Workflow) -> None:
    """The output and its report files: not an input (except the labels group of an
    OME-Zarr input image, where label images belong), somewhere writable."""
    inputs = protected_inputs(wf)
    name = label_name_in_input(wf)
    if name is not None:
        if wf.output.ngff != "0.5":
            raise PipelineError(
                f"output.ngff: {wf.output.ngff}, but the labels go into the OME-NGFF 0.5 image "
                f"{fs.redact(wf.input.image_path)}; a label image has its image's version: use 0.5"
            )
        check_label_group(wf.input.image_path, name)
        inputs = {k: v for k, v in inputs.items() if k != "input.path"}
    check_not_an_input(wf.output.path, "output.path", inputs)
    for report in report_files(wf):
        check_not_an_input(report, "output.path (its report file)", inputs)
    check_writable(wf.output.path, "output.path")


def _prepare(wf: Workflow, resume: bool) -> Prepared:
    check_output_location(wf)
    check_unlocked(wf.output.path)
    image = open_image(input_spec(wf))
    cfg = wf.model
    if image.channels != cfg.in_channels:
        raise PipelineError(
            f"model.in_channels: {cfg.in_channels}, but {fs.redact(wf.input.image_path)} has {image.channels} "
            f"channel{'s' if image.channels > 1 else ''}"
            + (" (set input.channel_axis for a multi-channel image)" if image.channels == 1 else "")
        )
    model = load_model(cfg, "cpu")
    if model.geometry.dims > len(image.shape):
        raise PipelineError(
            f"model.dims: {model.geometry.dims}, but {fs.redact(wf.input.image_path)} has spatial shape "
            f"{image.shape}; a 3D network needs a stack (z, y, x)"
        )
    normalize = effective_normalization(wf, model)
    for name in ("mean", "std"):
        value = getattr(normalize, name)
        if isinstance(value, tuple) and len(value) != image.channels:
            raise PipelineError(
                f"model.normalize.{name}: expected one value or {image.channels} (one per "
                f"channel), got {len(value)}"
            )
    if needs_halo_probe(cfg):
        size = probe_size(model.geometry)
        samples = probe_samples(image, normalize, size, wf.tiling.mirror, non_finite_fill(wf))
        check_declared_halo(model, cfg, samples)
    batch = 1 if wf.inference.batch_size == "auto" else int(wf.inference.batch_size)
    shape = cluster_shape(wf.cluster, wf.inference.device)
    plan, choice, memory = choose_plan(wf, image, model, batch, shape, kept_tile(wf) if resume else None)
    chunk = wf.output.chunk
    if chunk is not None and any(b % chunk for b in plan.block_shape[plan.plane_axes :]):
        raise PipelineError(
            f"output.chunk: {chunk} does not divide the blocks of "
            f"{' x '.join(map(str, plan.block_shape))} px; expected a divisor of the block edge "
            f"(e.g. {_divisor_near(plan.block_shape, chunk)}), so that every task writes whole chunks"
        )
    if wf.output.geotiff and plan.plane_axes:
        raise PipelineError(
            f"output.geotiff: {fs.redact(wf.input.image_path)} is a stack of {image.shape[0]} planes; a "
            f"GeoTIFF holds one 2D image: set output.geotiff: false (the OME-Zarr volume keeps every plane)"
        )
    truth = None
    if wf.evaluation is not None:
        truth = _check_truth(wf, image)
    if wf.instances is not None:
        _check_instances(wf, image.shape, plan.block_shape, resume)
    if not (resume and is_label_volume(wf.output.path)):
        check_output_free(wf.output.path, wf.output.overwrite, report_files(wf))
    notes = []
    segment = int(np.prod(image.chunks)) * image.channels * image.dtype.itemsize
    if segment > SEGMENT_NOTE_BYTES:
        notes.append(
            f"{fs.redact(wf.input.image_path)} is stored in compressed segments of {format_bytes(segment)} "
            f"({' x '.join(map(str, image.chunks))} px): every read decodes whole segments; "
            f"a tiled TIFF (e.g. tifffile.imwrite(..., tile=(512, 512))) or zarr reads faster"
        )
    prepared = Prepared(
        wf,
        image,
        model,
        plan,
        shape,
        truth,
        normalize,
        tuple(notes),
        plan_skips(wf, image, plan),
        choice,
        memory,
        read_pixel_grid(image),
    )
    check_cluster(wf.cluster, wf.inference.device, prepared.task_bytes or 0)
    return prepared


def instances_path(wf: Workflow) -> str:
    """Where the instance volume goes: ``instances.path``, or beside the labels."""
    assert wf.instances is not None
    return wf.instances.path or default_instances_path(wf.output.path)


def instance_spec(wf: Workflow, ndim: int) -> InstanceSpec:
    cfg = wf.instances
    assert cfg is not None
    return InstanceSpec(tuple(cfg.classes), cfg.neighbours(ndim), cfg.min_size, tuple(cfg.grow_into), cfg.grow_by)


def instance_evaluation(wf: Workflow, shape: tuple[int, ...]) -> InstanceEvaluationSpec | None:
    """How a run's objects are matched: its instance volume (ids) against the truth's
    connected components of the same classes, or ``evaluation.truth_instances`` (ids)."""
    ev = wf.evaluation
    if ev is None or not ev.instances:
        return None
    return InstanceEvaluationSpec(None, None if ev.truth_instances else instance_spec(wf, len(shape)))


def instance_pair(wf: Workflow) -> LabelPair:
    """The run's instance volume and the truth (ids, or class labels) for object matching."""
    ev = wf.evaluation
    assert ev is not None
    truth = ImageSpec(ev.truth_instances, None, "evaluation.truth_instances", volume=True) if ev.truth_instances else truth_spec(wf)
    return LabelPair(fs.stem(wf.output.path), ImageSpec(instances_path(wf), None, "instances.path"), truth, ignore_mask_spec(wf))


def _check_instances(wf: Workflow, shape: tuple[int, ...], block: tuple[int, ...], resume: bool) -> None:
    """The instances section against the labels it will read, its volume's place, and the
    truth's instance ids when given."""
    cfg = wf.instances
    assert cfg is not None
    ndim = len(shape)
    ev = wf.evaluation
    if ev is not None and ev.truth_instances:
        truth = open_image(ImageSpec(ev.truth_instances, None, "evaluation.truth_instances", volume=True))
        shown = fs.redact(ev.truth_instances)
        if truth.shape != shape or truth.channels != 1:
            raise EvaluationError(
                f"evaluation.truth_instances: {shown} has shape {truth.shape} with {truth.channels} channel(s), but "
                f"the image has spatial shape {shape}; expected one channel of instance ids of that shape"
            )
        if not np.issubdtype(truth.dtype, np.integer):
            raise EvaluationError(f"evaluation.truth_instances: {shown}: expected integer instance ids, got dtype {truth.dtype}")
    if cfg.connectivity is not None:
        check_connectivity(ndim, cfg.connectivity, "instances.connectivity")
    check_instance_classes(instance_spec(wf, ndim), wf.model.num_classes, ("instances.classes", "instances.grow_into"))
    if cfg.grow_by and min(block) < cfg.grow_by:
        raise PipelineError(f"instances.grow_by: {cfg.grow_by} pixels is more than the blocks' edge {min(block)}")
    target = instances_path(wf)
    if fs.location(target) == fs.location(wf.output.path):
        raise PipelineError(f"instances.path: {fs.redact(target)} is output.path; expected a volume of its own")
    inputs = protected_inputs(wf)
    name = label_image_name(target, wf.input.image_path)
    if name is not None:  # beside the classes in an OME-Zarr input's labels group
        check_label_group(wf.input.image_path, name)
        inputs = {k: v for k, v in inputs.items() if k != "input.path"}
    check_not_an_input(target, "instances.path", inputs)
    check_writable(target, "instances.path")
    if not resume:
        try:
            check_output_free(target, wf.output.overwrite, table_paths(target))
        except OutputExistsError as exc:
            raise OutputExistsError(as_field(str(exc))) from None


def _layout(wf: Workflow, block: tuple[int, ...]) -> str:
    """How the label array is stored: chunks per block, and shards."""
    blocks = " x ".join(map(str, block))
    chunk = wf.output.chunk
    if chunk is None:
        return f"chunks {blocks}, {'one shard of one chunk' if wf.output.shard else 'one'} per block"
    per_block = int(np.prod([-(-b // chunk) for b in block]))
    where = f"in one shard per block of {blocks}" if wf.output.shard else f"{per_block} per block of {blocks}"
    return f"chunks {' x '.join([str(chunk)] * len(block))}, {where}"


def _divisor_near(block: tuple[int, ...], chunk: int) -> int:
    edge = min(block)
    divisors = [d for d in range(16, edge + 1) if all(b % d == 0 for b in block)] or [edge]
    return min(divisors, key=lambda d: abs(d - chunk))


def _check_truth(wf: Workflow, image: ImageReader) -> ImageReader:
    ev = wf.evaluation
    assert ev is not None
    truth = open_image(truth_spec(wf))
    if truth.shape != image.shape:
        raise EvaluationError(
            f"evaluation.ground_truth: {fs.redact(ev.ground_truth)} has shape {truth.shape}, "
            f"but the image {fs.redact(wf.input.image_path)} has spatial shape {image.shape}; expected the same"
        )
    expected_channels = 3 if ev.encoding == "palette" else 1
    if truth.channels != expected_channels:
        raise EvaluationError(
            f"evaluation.ground_truth: {fs.redact(ev.ground_truth)} has {truth.channels} channels; "
            f"encoding {ev.encoding} expects {expected_channels}"
        )
    if ev.encoding != "palette" and not np.issubdtype(truth.dtype, np.integer):
        raise EvaluationError(
            f"evaluation.ground_truth: {fs.redact(ev.ground_truth)}: expected integer class ids, got dtype "
            f"{truth.dtype}"
        )
    k = wf.model.num_classes
    if ev.classes is not None and len(ev.classes) != k:
        raise EvaluationError(
            f"evaluation.classes: {len(ev.classes)} classes listed, but model.num_classes is {k}"
        )
    if ev.encoding == "binary" and k != 2:
        raise EvaluationError(f"evaluation.encoding: binary masks have 2 classes, but model.num_classes is {k}")
    if ev.bootstrap and ev.regions is None:
        raise EvaluationError(
            "evaluation.bootstrap: needs evaluation.regions, the units to resample within one image"
        )
    mask = ignore_mask_spec(wf)
    mask_shape = open_image(mask).shape if mask is not None else image.shape
    if mask is not None and mask_shape != image.shape:
        raise EvaluationError(
            f"evaluation.ignore_mask: {fs.redact(mask.path)} has shape {mask_shape}, but the "
            f"image has spatial shape {image.shape}"
        )
    return truth


def effective_normalization(wf: Workflow, model: LoadedModel) -> NormalizeConfig:
    """The workflow's normalisation, or the one the model file declares; never both."""
    if model.normalize is None:
        return wf.model.normalize
    if "normalize" in wf.model.model_fields_set:
        raise PipelineError(
            f"model.normalize: {fs.redact(wf.model.path or '')} declares its own preprocessing "
            f"({describe_normalization(model.normalize)}); remove model.normalize from the workflow"
        )
    return model.normalize


def kept_tile(wf: Workflow) -> int | None:
    """With ``tiling.tile: auto``, the tile an interrupted run of this output chose: a resume
    on another machine (another memory, other cores) must not choose another."""
    if wf.tiling.tile != "auto":
        return None
    record = recorded_run(wf.output.path) if is_label_volume(wf.output.path) else None
    tiles = (record or {}).get("plan", {}).get("tile")
    return max(tiles) if isinstance(tiles, list) and tiles and all(isinstance(t, int) for t in tiles) else None


def replan(p: Prepared, batch_size: int) -> Prepared:
    """The plan again for another batch size (tiles per block), e.g. one measured on a GPU."""
    plan, choice, memory = choose_plan(p.workflow, p.image, p.model, batch_size, p.cluster)
    return replace(p, plan=plan, tile_choice=choice, memory=memory)


def describe_plan(p: Prepared, evaluation: bool = True) -> str:
    """The plan as a person reads it: sizes, halo, borders, tasks, memory (and where the
    evaluation goes, unless ``evaluation`` is False: a set evaluates its images together)."""
    wf, plan, geo, img = p.workflow, p.plan, p.model.geometry, p.image
    shape = " x ".join(map(str, img.shape))
    read = " x ".join(map(str, plan.read_shape))
    tile = " x ".join(map(str, plan.tile))
    halo_from = (
        "declared, checked by a gradient probe"
        if isinstance(wf.model, DeclaredGeometry)
        else "from its layers"
    )
    weights = p.model.identity["weights"]
    weights_text = (
        f"untrained (fixed seed {weights['seed']})" if p.model.untrained else weights["path"]
    )
    far = [
        max(0, ext[-1][0] + ext[-1][1] - n) + plan.context
        for ext, n in list(zip(plan.tile_extents, img.shape))[plan.plane_axes :]
    ]
    lines = [
        f"image      {fs.redact(wf.input.image_path)}" + (f" (pyramid level {wf.input.level})" if wf.input.level else ""),
        f"           {shape} px, {img.channels} channel{'s' * (img.channels > 1)}, {img.dtype}, "
        f"stored in chunks of {' x '.join(map(str, img.chunks))}",
        f"model      {p.model.identity['arch']} {_params(p.model.identity['params'])}",
        f"           weights: {weights_text}",
        f"           {geo.name}: halo {geo.halo} px ({halo_from}), trim {geo.trim} px, "
        f"shift period {geo.shift_period}, legal inputs {geo.describe_sizes()}",
        f"normalise  {describe_normalization(p.normalize)}",
        f"tiles      write box {tile}, read box {read} (context {plan.context} px per side"
        + (f"; plane by plane: the {geo.dims}D network sees one plane at a time, "
           f"{plan.block_tiles[plan.plane_axes - 1]} planes per forward pass)" if plan.plane_axes else ")"),
        f"           {_tile_reason(p)}",
        f"           tile sizes are multiples of {geo.tile_multiple}; {plan.n_tiles} tiles; overlap "
        f"{plan.overlap:.2f}x (pixels computed per image pixel)",
        f"borders    mirrored ({plan.mirror}): {plan.context} px before the first row/column, "
        f"{' / '.join(map(str, far))} px after the last (rows / columns)",
        f"tasks      {' x '.join(map(str, plan.grid))} = {plan.n_blocks} blocks, "
        f"{'x'.join(map(str, plan.block_tiles))} tiles each (one forward pass per block)"
        + (", batch size auto: chosen from free GPU memory at run start" if wf.inference.batch_size == "auto" else ""),
        f"runtime    device {wf.inference.device}, {wf.inference.precision}, "
        f"channels_last {wf.inference.channels_last}, torch threads {wf.inference.torch_threads}, "
        f"test-time augmentation {wf.inference.tta}"
        + (" (auto: measured on a worker at run start)" if "auto" in (wf.inference.channels_last, wf.inference.torch_threads) else ""),
        f"memory     {_memory_line(p)}",
        f"output     {fs.redact(wf.output.path)} ({p.label_dtype}, {_layout(wf, plan.block_shape)})",
        f"           {_pyramid_line(p)}",
        *(
            [f"           per-class probabilities ({wf.output.probability_dtype}"
             f"{', 255 = 1.0' if wf.output.probability_dtype == 'uint8' else ''}) in its array 'probabilities'"]
            if wf.output.probability_dtype else []
        ),
        f"pixels     {describe_grid(p.pixel_grid)}",
    ]
    if wf.output.geotiff:
        lines.append(f"geotiff    {fs.redact(geotiff_path(wf.output.path))} ({_geotiff_line(p)})")
    if wf.instances is not None:
        spec = instance_spec(wf, len(img.shape))
        growth = f", grown by up to {spec.grow_by} px into classes {list(spec.grow_into)}" if spec.grow_by else ""
        lines.append(
            f"instances  {fs.redact(instances_path(wf))}: uint64 ids of the {spec.connectivity}-connected objects of "
            f"classes {list(spec.classes)}" + (f" of at least {spec.min_size} px" if spec.min_size else "") + growth
            + ", object table beside it (.objects.parquet, .objects.csv)"
        )
    if wf.evaluation is not None and evaluation:
        lines.append(f"evaluation {fs.redact(wf.evaluation.ground_truth)} ({wf.evaluation.encoding}) -> {fs.redact(p.report_path or '')}")
        if wf.evaluation.instances:
            truth = wf.evaluation.truth_instances
            lines.append(
                "           objects matched against "
                + (f"the instance ids of {fs.redact(truth)}" if truth else "the truth's objects (the same classes and connectivity)")
                + ": AP/F1 at IoU 0.50:0.95, PQ, adapted Rand, VI"
            )
    if p.skip is not None:
        lines.append(f"skip       {p.skip.describe(plan.n_blocks)}")
    lines.append(f"cluster    {p.cluster.describe()}")
    lines += [f"note       {n}" for n in p.notes]
    return "\n".join(lines)


def _pyramid_line(p: Prepared) -> str:
    levels = p.pyramid
    if not levels:
        return "OME-Zarr label image, one level (output.pyramid: false)"
    shapes = ", ".join(" x ".join(map(str, s)) for s in levels)
    return f"OME-Zarr label image with {len(levels)} more level{'s' * (len(levels) > 1)} ({p.workflow.output.downsampling} of 2 x 2): {shapes}"


def _geotiff_line(p: Prepared) -> str:
    geo = p.pixel_grid.georeference
    where = f"georeferenced as the input, {geo.crs or 'its CRS'}" if geo else "not georeferenced: the input has no GeoTIFF tags"
    overviews = f"{len(p.pyramid)} overviews (the pyramid)" if p.pyramid else "no overviews (output.pyramid: false)"
    return f"tiled, deflate, {overviews}; {where}"


def _tile_reason(p: Prepared) -> str:
    choice = p.tile_choice
    if choice is None:
        return f"tiling.tile: {p.workflow.tiling.tile} as set"
    if choice.task_bytes is None and "interrupted" in choice.limit:
        return f"tiling.tile: auto: {choice.limit}"
    budget = task_budget(p.workflow, p.cluster)
    return (
        f"tiling.tile: auto: the fastest tile whose task fits {format_bytes(budget.task_bytes)} "
        f"({budget.source}); {choice.limit}"
    )


def _memory_line(p: Prepared) -> str:
    task = p.task_bytes
    if task is None:
        return "unknown: the model's memory could not be measured (tiles up to 1024 px with tile: auto)"
    return f"~{format_bytes(task)} per task (source, batch, the model's tensors measured at this size, labels)"


def describe_normalization(cfg: NormalizeConfig) -> str:
    if cfg.zscore:
        return "zero mean, unit variance over the whole image, per channel (computed once at the start of the run)"
    if not cfg.fixed:
        low, high = cfg.percentiles  # type: ignore[misc]
        return (
            f"percentiles {low:g} / {high:g} of the whole image -> 0 / 1, per channel "
            f"(computed once at the start of the run)"
        )
    mean, std = cfg.scale()
    return f"(x - {_values(mean)}) / {_values(std)}"


def _values(v: float | tuple[float, ...]) -> str:
    return f"{v:g}" if isinstance(v, float) else "[" + ", ".join(f"{x:g}" for x in v) + "]"


def _params(params: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k} {v}" for k, v in params.items() if k != "arch") + ")"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
