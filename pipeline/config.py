"""The workflow file: schema, loading, and error messages a user can act on.

The schema is strict: unknown keys, wrong types and out-of-range values are errors that
name the file, the field path, what was expected and what arrived. Relative paths resolve
against the workflow file's folder; URLs (``scheme://``) are left as they are.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from .downsample import Downsampling
from .errors import ModelError, WorkflowError
from .io import fs
from .io.checkpoints import expand_model_section
from .mirror import MirrorMode


def _int_or_auto(minimum: int) -> Any:
    def check(value: object) -> int | str:
        if value == "auto":
            return "auto"
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        raise ValueError(f"an integer >= {minimum} or 'auto'")

    return Annotated[int | Literal["auto"], PlainValidator(check)]


def _finite(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError("a finite number")


def _float_or_list(value: object) -> float | tuple[float, ...]:
    def number(v: object) -> float:
        try:
            return _finite(v)
        except ValueError:
            raise ValueError("a finite number or a list of finite numbers (one per channel)") from None

    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("a number or a non-empty list of numbers (one per channel)")
        return tuple(number(v) for v in value)
    return number(value)


def _path(value: object) -> str:
    if isinstance(value, str) and value.strip() and "\x00" not in value:
        return value
    raise ValueError("a file path or URL (a non-empty string)")


def _paths(value: object) -> str | tuple[str, ...]:
    """One path (a file, a zarr, a folder of images, a glob) or a non-empty list of paths."""
    if isinstance(value, (list, tuple)) and value:
        try:
            return tuple(_path(v) for v in value)
        except ValueError:
            pass
    elif not isinstance(value, (list, tuple)):
        try:
            return _path(value)
        except ValueError:
            pass
    raise ValueError("a file path or URL, a folder or glob of images, or a non-empty list of paths")


def _storage_options(value: object) -> dict[str, Any]:
    """fsspec storage options: a mapping of option names to JSON values (kept as given)."""
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            pass
        else:
            return value
    raise ValueError(
        "a mapping of fsspec storage options, e.g. {endpoint_url: 'https://s3.example.org', "
        "anon: true} (see README, 'Object stores')"
    )


def _declared_halo(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(
        "a halo in pixels (integer >= 0): the receptive field of a model the pipeline cannot "
        "see into must be declared"
    )


def _channel_list(value: object) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        and len(set(value)) == len(value)
    ):
        return tuple(value)
    raise ValueError("a list of distinct channel indices >= 0, e.g. [2, 1, 0]")


def _percentiles(value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] < value[1] <= 100
    ):
        return (float(value[0]), float(value[1]))
    raise ValueError("two percentiles [low, high] with 0 <= low < high <= 100, e.g. [1, 99.8]")


def _colour(value: object) -> tuple[int, int, int] | None:
    if value is None:
        return None
    from .encodings import parse_colour

    if isinstance(value, (str, list, tuple)):
        return parse_colour(value)  # raises ValueError with the expected form
    raise ValueError("a colour like '#8429F6' or [132, 41, 246]")


def _device(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    raise ValueError("one of auto, cpu, cuda, cuda:N")


# Plain validators lose pydantic's own serialisation of unions of tuples: say it here.
_TupleAsList = PlainSerializer(lambda v: list(v) if isinstance(v, tuple) else v, return_type=Any)
FloatOrList = Annotated[float | tuple[float, ...], PlainValidator(_float_or_list), _TupleAsList]
FiniteFloat = Annotated[float, PlainValidator(_finite)]
PathStr = Annotated[str, PlainValidator(_path)]
PathsStr = Annotated[str | tuple[str, ...], PlainValidator(_paths), _TupleAsList]
StorageOptions = Annotated[dict[str, Any], PlainValidator(_storage_options)]
_STORAGE_DOC = "fsspec options for this section's paths, over the top-level storage_options"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InputConfig(Section):
    path: PathsStr = Field(
        description="TIFF/BigTIFF (tiled or stripped), zarr / OME-Zarr, PNG/JPEG; or several images: "
        "a list, a glob or a folder (one label volume each, see output.path)"
    )
    channel_axis: int | None = Field(
        default=None, description="index of the channel axis of a multi-channel image"
    )
    channels: Annotated[tuple[int, ...] | None, PlainValidator(_channel_list), _TupleAsList] = Field(
        default=None, description="channels to use, in the order the model expects"
    )
    series: int | None = Field(
        default=None, ge=0, description="which image series of a TIFF holding several"
    )
    level: int = Field(
        default=0, ge=0,
        description="pyramid level of a pyramidal TIFF / OME-TIFF / COG or of an OME-Zarr multiscale "
        "image to segment: 0 = full resolution, 1 = the next coarser, ...",
    )  # fmt: skip
    non_finite: Literal["error", "fill"] = Field(
        default="error", description="NaN/infinite pixels of a float image: an error, or filled"
    )
    fill_value: FiniteFloat = Field(default=0.0, description="what non_finite: fill puts in their place")
    storage_options: StorageOptions = Field(default_factory=dict, description=_STORAGE_DOC)

    @property
    def image_path(self) -> str:
        """The one image of a single-image workflow (a set is expanded first: pipeline.image_set)."""
        if not isinstance(self.path, str):
            raise TypeError("input.path names several images: expand the workflow first")
        return self.path


class NormalizeConfig(Section):
    """``x -> (x - mean) / std``, per channel when lists are given; or image statistics.

    ``percentiles: [low, high]`` maps the image's low/high percentiles to 0/1;
    ``zscore: true`` subtracts the image's mean and divides by its standard deviation.
    Both statistics are computed once over the whole image (per channel), never per tile:
    per-tile statistics would make seams.
    """

    mean: FloatOrList | None = None
    std: FloatOrList | None = None
    percentiles: Annotated[
        tuple[float, float] | None, PlainValidator(_percentiles), _TupleAsList
    ] = None
    zscore: bool = False

    @field_validator("std")
    @classmethod
    def _positive(cls, v: float | tuple[float, ...] | None) -> float | tuple[float, ...] | None:
        if v is not None and any(s <= 0 for s in (v if isinstance(v, tuple) else (v,))):
            raise ValueError("positive standard deviations")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> NormalizeConfig:
        kinds = [self.mean is not None or self.std is not None, self.percentiles is not None, self.zscore]
        if sum(kinds) > 1:
            raise ValueError("one of mean/std, percentiles or zscore")
        return self

    @property
    def fixed(self) -> bool:
        return self.percentiles is None and not self.zscore

    def scale(self) -> tuple[float | tuple[float, ...], float | tuple[float, ...]]:
        """``(mean, std)`` of a fixed normalisation (defaults 0 and 1)."""
        if not self.fixed:
            raise ValueError("percentile normalisation must be resolved against the image first")
        return (0.0 if self.mean is None else self.mean, 1.0 if self.std is None else self.std)


class ModelBase(Section):
    path: PathStr | None = Field(default=None, description="weights file (or TorchScript file)")
    num_classes: int = Field(ge=2, le=65536)
    in_channels: int = Field(default=1, ge=1)
    halo: _int_or_auto(0) = "auto"  # type: ignore[valid-type]
    normalize: NormalizeConfig = NormalizeConfig()
    storage_options: StorageOptions = Field(default_factory=dict, description=_STORAGE_DOC)


class UNetConfig(ModelBase):
    """Ronneberger et al. 2015 U-Net; ``width`` is the first level's channel count."""

    arch: Literal["unet"]
    depth: int = Field(default=4, ge=1, le=8)
    width: int = Field(default=64, ge=1)
    padding: Literal["same", "valid"] = "same"
    batch_norm: bool = False
    dims: Literal[2, 3] = Field(
        default=2, description="2: planes (a stack plane by plane); 3: a 3D U-Net on 3D tiles of a stack"
    )
    seed: int = Field(default=0, ge=0, description="initialisation seed when path is null")


class DilatedConfig(ModelBase):
    """Yu & Koltun 2016 context module on a plain convolutional front end."""

    arch: Literal["dilated"]
    front_width: int = Field(default=64, ge=1)
    front_depth: int = Field(default=2, ge=1)
    context: Literal["basic", "large"] = "basic"
    context_width: int | None = Field(
        default=None, ge=1, description="C of the context module; null: num_classes, as in the paper"
    )
    padding: Literal["same", "valid"] = "same"
    seed: int = Field(default=0, ge=0, description="initialisation seed when path is null")


class DeclaredGeometry(ModelBase):
    """A model whose layers the pipeline cannot read: its geometry is declared.

    ``halo`` is required; ``validate`` checks it with a gradient probe. Input sizes are
    ``size_min + n * size_step`` up to ``size_max``; unset values are read from the file
    where it says (a torch.export program's dynamic shapes), else ``1, 1, unbounded``.
    """

    halo: Annotated[int, PlainValidator(_declared_halo)]
    shift_period: int = Field(default=1, ge=1, description="total stride of pooling layers")
    size_min: int | None = Field(default=None, ge=1, description="legal sizes: min + n * step")
    size_step: int | None = Field(default=None, ge=1)
    size_max: int | None = Field(default=None, ge=1)


class TorchScriptConfig(DeclaredGeometry):
    """A TorchScript file (``torch.jit.save``)."""

    arch: Literal["torchscript"]
    path: PathStr


class ExportConfig(DeclaredGeometry):
    """A ``torch.export`` program (``.pt2``); export with dynamic height and width."""

    arch: Literal["export"]
    path: PathStr


class CustomConfig(DeclaredGeometry):
    """An architecture of the user's, ``package.module:callable(**kwargs)``, with a state dict."""

    arch: Literal["custom"]
    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0, description="initialisation seed when path is null")


class BioimageioConfig(ModelBase):
    """A bioimage.io model description (rdf.yaml, format 0.4 or 0.5): the file says it all.

    Axes, input size rule, halo, preprocessing and weights come from the description;
    ``halo`` may add context; ``shift_period`` defaults to the input size step.
    """

    arch: Literal["bioimageio"]
    path: PathStr
    weights: Literal["auto", "torchscript", "pytorch_state_dict"] = "auto"
    shift_period: int | None = Field(default=None, ge=1)
    threshold: FiniteFloat = Field(default=0.5, description="for models with one output channel")
    trust_code: bool = Field(
        default=False,
        description="run the Python architecture file shipped with the description (executes its code)",
    )


ModelConfig = Annotated[
    UNetConfig | DilatedConfig | TorchScriptConfig | ExportConfig | CustomConfig | BioimageioConfig,
    Field(discriminator="arch"),
]


class SkipConfig(Section):
    """Blocks written as one class without running the model (see pipeline/skipping.py)."""

    mask: PathStr | None = Field(
        default=None,
        description="image or zarr at any resolution; blocks with no nonzero mask pixel are skipped",
    )
    storage_options: StorageOptions = Field(default_factory=dict, description=_STORAGE_DOC)
    uniform: bool = Field(default=False, description="skip a block whose read box holds one single value")
    below: FiniteFloat | None = Field(default=None, description="skip a block whose raw read box is all below this")
    above: FiniteFloat | None = Field(default=None, description="skip a block whose raw read box is all above this")
    label: int = Field(default=0, ge=0, description="class written for skipped blocks")

    @model_validator(mode="after")
    def _something_to_skip(self) -> SkipConfig:
        if self.mask is None and not self.uniform and self.below is None and self.above is None:
            raise ValueError("at least one of mask, uniform: true, below or above")
        return self


class TilingConfig(Section):
    tile: _int_or_auto(1) = Field(  # type: ignore[valid-type]
        default="auto",
        description="write-box edge in pixels; auto: the largest whose task fits the worker's memory budget",
    )
    mirror: MirrorMode = "reflect"
    memory_share: float = Field(
        default=0.5, gt=0.0, le=0.9,
        description="share of a worker's memory (GPU: free device memory) its concurrent block tasks may use",
    )  # fmt: skip
    skip: SkipConfig | None = Field(default=None, description="blocks that need no model; null: compute every block")


class InferenceConfig(Section):
    """Where and how the network runs; none of it changes which tile owns which pixel."""

    device: Annotated[str, PlainValidator(_device)] = "auto"
    batch_size: _int_or_auto(1) = Field(  # type: ignore[valid-type]
        default=1, description="tiles per forward pass and per task; auto: from free GPU memory"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="autocast precision of the forward pass; argmax in fp32"
    )
    channels_last: bool | Literal["auto"] = Field(
        default="auto",
        description="NHWC memory format: auto measures both on a worker at run start (cached per machine and model)",
    )
    torch_threads: _int_or_auto(1) = Field(  # type: ignore[valid-type]
        default="auto",
        description="torch threads per forward pass; auto: the split of a worker's cores between "
        "concurrent passes and threads is measured at run start (cached per machine and model)",
    )
    tta: Literal["none", "flips", "d4"] = Field(
        default="none", description="test-time augmentation: averaged logits of flips (4) or flips and 90-degree rotations (8)"
    )


class ClassConfig(Section):
    name: str
    colour: Annotated[tuple[int, int, int] | None, PlainValidator(_colour), _TupleAsList] = None


class OutputConfig(Section):
    path: PathStr = Field(
        description="the label volume (out/slide.zarr); for several images a folder (one <name>.zarr "
        "each) or a template with {name} (out/{name}_labels.zarr)"
    )
    overwrite: bool = False
    storage_options: StorageOptions = Field(default_factory=dict, description=_STORAGE_DOC)
    chunk: int | None = Field(
        default=None, ge=16, description="chunk edge of the label array (divides the block); null: one chunk per block"
    )
    shard: bool = Field(
        default=False,
        description="zarr 3 sharding: each block's chunks in one object (one PUT per block)",
    )
    pyramid: bool = Field(
        default=True,
        description="OME-Zarr multiscale levels 1, 2, ... (y, x halved each) until one fits a chunk",
    )
    downsampling: Downsampling = Field(
        default="mode", description="how a pyramid level summarises 2 x 2 labels: mode (ties: smallest id) or nearest"
    )
    ngff: Literal["0.5", "0.4"] = Field(
        default="0.5",
        description="OME-NGFF version of the label image: 0.5 (zarr 3) or 0.4 (zarr 2, for older viewers; no shard)",
    )
    geotiff: bool = Field(
        default=False,
        description="also write the labels as a tiled GeoTIFF beside the volume (slide.zarr -> slide.tif), "
        "with the pyramid as overviews and a GeoTIFF input's georeference",
    )
    probabilities: Literal[False, True, "uint8", "float16"] = Field(
        default=False,
        description="also store per-class probabilities (softmax of the logits) as array "
        "'probabilities' (c, [z,] y, x) in the volume: uint8 (true: 255 = 1.0) or float16",
    )
    classes: list[ClassConfig] | None = Field(
        default=None,
        description="class names (and colours) in id order for the OME-Zarr image-label metadata; "
        "default: evaluation.classes",
    )


    @model_validator(mode="after")
    def _shards_need_zarr_3(self) -> OutputConfig:
        if self.shard and self.ngff == "0.4":
            raise ValueError("ngff: '0.5' with shard: true (zarr format 2 has no shards)")
        return self

    @property
    def probability_dtype(self) -> Literal["uint8", "float16"] | None:
        """How probabilities are stored; None: not stored."""
        if self.probabilities is False:
            return None
        return "uint8" if self.probabilities is True else self.probabilities


class EvaluationConfig(Section):
    """Ground truth and how to compare with it (see pipeline/metrics.py for definitions)."""

    ground_truth: PathStr
    storage_options: StorageOptions = Field(default_factory=dict, description=_STORAGE_DOC)
    ignore_index: int | None = Field(default=None, ge=0)
    ignore_mask: PathStr | None = Field(default=None, description="label image; nonzero = not counted")
    encoding: Literal["indices", "binary", "palette"] = "indices"
    classes: list[ClassConfig] | None = Field(
        default=None, description="class names in id order; with colours for palette encoding"
    )
    ignore_colours: list[Annotated[tuple[int, int, int], PlainValidator(_colour), _TupleAsList]] = Field(
        default_factory=list
    )
    absent_classes: Literal["exclude", "nan"] = "exclude"
    regions: int | None = Field(default=None, ge=1, description="grid cell edge for a per-region breakdown")
    per_slice: bool = Field(default=False, description="per z-slice breakdown of label volumes")
    bootstrap: int = Field(default=0, ge=0, description="bootstrap resamples of mIoU over regions")
    confidence: float = Field(default=0.95, gt=0, lt=1)
    instances: bool = Field(
        default=False,
        description="match objects too (AP over IoU 0.5:0.95, F1, PQ, adapted Rand, VI); needs the instances section",
    )
    truth_instances: PathStr | None = Field(
        default=None,
        description="an instance-label image of the truth (ids); default: connected components of "
        "instances.classes in ground_truth",
    )

    @model_validator(mode="after")
    def _palette_has_colours(self) -> EvaluationConfig:
        if self.encoding == "palette":
            if not self.classes or any(c.colour is None for c in self.classes):
                raise ValueError("classes with a colour each for encoding: palette")
            colours = [c.colour for c in self.classes]
            if len(set(colours)) != len(colours):
                raise ValueError("distinct colours, one per class")
        return self


class InstancesConfig(Section):
    """Objects: connected components of chosen classes over the whole volume (pipeline/instances.py)."""

    classes: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, description="class ids whose connected pixels make objects")
    connectivity: Literal[4, 8, 6, 18, 26] | None = Field(
        default=None, description="neighbours that connect: 4 or 8 (2D), 6, 18 or 26 (3D); default 4 / 6"
    )
    min_size: int = Field(default=0, ge=0, description="objects of fewer pixels are dropped")
    grow_into: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="classes objects may grow into (e.g. a predicted border)"
    )
    grow_by: int = Field(default=0, ge=0, le=256, description="at most this many pixels of growth")
    path: PathStr | None = Field(
        default=None, description="the instance volume; default <output>_instances beside output.path"
    )

    @model_validator(mode="after")
    def _growth_is_whole(self) -> InstancesConfig:
        if bool(self.grow_into) != bool(self.grow_by):
            raise ValueError("grow_into and grow_by together (classes to grow into, and by how many pixels)")
        both = set(self.classes) & set(self.grow_into)
        if both:
            raise ValueError(f"grow_into classes other than classes (class {min(both)} is in both)")
        return self

    def neighbours(self, ndim: int) -> int:
        return self.connectivity or (4 if ndim == 2 else 6)


def _dashboard(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"[\w.\-\[\]:]*:\d{1,5}", value) and int(value.rsplit(":", 1)[1]) <= 65535:
        return value
    raise ValueError("null (no dashboard) or host:port to serve it on, e.g. 127.0.0.1:8787")


def _duration(value: object) -> str:
    """A Dask duration: ``"55m"``, ``"2h"``, ``"90s"`` (what ``dask worker --lifetime`` takes)."""
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?\s*(s|m|h|d)", value.strip()):
        return value.strip()
    raise ValueError("a duration like '90s', '55m' or '2h'")


def _walltime(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}(:\d{2})?", value):
        return value
    raise ValueError("a walltime like '01:30:00' (hours:minutes:seconds, or days-hh:mm:ss)")


def _memory(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)", value.strip()):
        return value.strip()
    raise ValueError("an amount of memory like '16GB' or '16GiB'")


def _environment(value: object) -> dict[str, str]:
    if isinstance(value, dict) and all(
        isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) and isinstance(v, (str, int, float))
        and not isinstance(v, bool)
        for k, v in value.items()
    ):
        return {k: str(v) for k, v in value.items()}
    raise ValueError("a mapping of environment variable names to values, e.g. {MALLOC_ARENA_MAX: 2}")


Duration = Annotated[str, PlainValidator(_duration)]


class ClusterBase(Section):
    """What every cluster kind shares: how blocks are retried, and the workers' environment."""

    retries: int = Field(
        default=2, ge=0, le=10, description="reruns of a block whose task raised, before the run stops"
    )
    environment: Annotated[dict[str, str], PlainValidator(_environment)] = Field(
        default_factory=dict,
        description="environment of the worker processes, set before they start (allocator settings, ...)",
    )
    allocator: Literal["tuned", "system"] = Field(
        default="tuned",
        description="tuned: glibc malloc keeps freed memory and one arena (2x faster CPU forward passes); system: the C library's defaults",
    )
    worker_timeout: Duration = Field(
        default="10m", description="how long the run waits with no worker at all before it stops"
    )


class LocalClusterConfig(ClusterBase):
    """Worker processes on this machine (distributed.LocalCluster)."""

    kind: Literal["local"] = "local"
    n_workers: _int_or_auto(1) = "auto"  # type: ignore[valid-type]
    threads_per_worker: _int_or_auto(1) = "auto"  # type: ignore[valid-type]
    dashboard: Annotated[str | None, PlainValidator(_dashboard)] = Field(
        default=None, description="host:port of the Dask dashboard (needs bokeh); null: none"
    )


class AddressClusterConfig(ClusterBase):
    """A running Dask scheduler that someone else started (``dask scheduler`` / ``dask worker``)."""

    kind: Literal["address"]
    address: str | None = Field(default=None, pattern=r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$")
    scheduler_file: PathStr | None = None
    wait_for_workers: int = Field(default=1, ge=1, description="workers to wait for before the run starts")

    @model_validator(mode="after")
    def _one_address(self) -> AddressClusterConfig:
        if (self.address is None) == (self.scheduler_file is None):
            raise ValueError("exactly one of address (tcp://host:8786) or scheduler_file")
        return self


class JobCount(Section):
    minimum: int = Field(ge=0)
    maximum: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> JobCount:
        if self.minimum > self.maximum:
            raise ValueError("minimum <= maximum")
        return self


class JobqueueClusterConfig(ClusterBase):
    """Workers as batch jobs through dask-jobqueue; each field names the jobqueue one it sets."""

    kind: Literal["slurm", "pbs", "lsf", "sge"]
    worker_timeout: Duration = Field(
        default="1h", description="how long the run waits with no worker (queued jobs count as none)"
    )
    queue: str | None = Field(default=None, description="queue / SLURM partition (queue)")
    account: str | None = Field(default=None, description="account / project charged (account, project)")
    cores: int = Field(default=1, ge=1, description="cores per job (job_cpu, ncpus, resource_spec)")
    memory: Annotated[str, PlainValidator(_memory)] = Field(default="4GB", description="memory per job (memory)")
    processes: int = Field(default=1, ge=1, description="worker processes per job (processes)")
    threads_per_worker: _int_or_auto(1) = "auto"  # type: ignore[valid-type]
    gpus_per_job: int = Field(default=0, ge=0, description="GPUs per job: one worker process each")
    walltime: Annotated[str, PlainValidator(_walltime)] = Field(default="01:00:00", description="walltime")
    directives: list[str] = Field(default_factory=list, description="extra header lines (job_extra_directives)")
    jobs: int | JobCount = Field(default=1, description="a fixed count, or {minimum, maximum} (adapt)")
    worker_lifetime: Duration | None = Field(
        default=None, description="workers retire after this and are replaced (--lifetime)"
    )
    lifetime_stagger: Duration = Field(default="5m", description="spread of retirements (--lifetime-stagger)")
    interface: str | None = Field(default=None, description="network interface of scheduler and workers (interface)")
    prologue: list[str] = Field(default_factory=list, description="job-script lines before the worker starts (job_script_prologue)")
    python: str | None = Field(default=None, description="the workers' python (python); default: this one")
    log_directory: PathStr | None = Field(default=None, description="job logs (log_directory)")
    dashboard: Annotated[str | None, PlainValidator(_dashboard)] = None

    @model_validator(mode="after")
    def _gpu_processes(self) -> JobqueueClusterConfig:
        if self.gpus_per_job and self.processes not in (1, self.gpus_per_job):
            raise ValueError(f"processes equal to gpus_per_job ({self.gpus_per_job}): one worker per GPU")
        if isinstance(self.jobs, int) and self.jobs < 1:
            raise ValueError("at least one job")
        return self

    @property
    def worker_processes(self) -> int:
        return self.gpus_per_job or self.processes


class KubernetesResources(Section):
    cpu: str = Field(default="2", pattern=r"^\d+(\.\d+)?m?$")
    memory: str = Field(default="8Gi", pattern=r"^\d+(\.\d+)?([KMGT]i?)?$")


class KubernetesClusterConfig(ClusterBase):
    """A DaskCluster resource created through the Dask Kubernetes operator (pip extra ``kubernetes``)."""

    kind: Literal["kubernetes"]
    worker_timeout: Duration = Field(
        default="30m", description="how long the run waits with no worker (pods pending count as none)"
    )
    name: str = Field(default="gigaseg", pattern=r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
    namespace: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = Field(description="worker and scheduler image with this pipeline installed")
    n_workers: int = Field(default=1, ge=1)
    threads_per_worker: _int_or_auto(1) = "auto"  # type: ignore[valid-type]
    resources: KubernetesResources = KubernetesResources()
    gpus_per_worker: int = Field(default=0, ge=0, le=1, description="nvidia.com/gpu per worker pod (0 or 1)")


def _cluster_kind(value: object) -> str:
    if isinstance(value, dict):
        kind = value.get("kind", "local")
        return _CLUSTER_TAGS.get(kind, str(kind)) if isinstance(kind, str) else repr(kind)
    return _CLUSTER_TAGS.get(getattr(value, "kind", "local"), "")


_CLUSTER_TAGS = {"local": "local", "address": "address", "kubernetes": "kubernetes"} | {
    k: "jobqueue" for k in ("slurm", "pbs", "lsf", "sge")
}
CLUSTER_KINDS = tuple(_CLUSTER_TAGS)
ClusterConfig = Annotated[
    Annotated[LocalClusterConfig, Tag("local")]
    | Annotated[AddressClusterConfig, Tag("address")]
    | Annotated[JobqueueClusterConfig, Tag("jobqueue")]
    | Annotated[KubernetesClusterConfig, Tag("kubernetes")],
    Discriminator(_cluster_kind),
]


class TrainData(Section):
    """Image/label pairs: files, folders, globs or lists, paired by name as evaluation pairs them."""

    images: PathsStr
    labels: PathsStr
    channel_axis: int | None = Field(default=None, description="of the images; null: one channel, or RGB last")


class ElasticConfig(Section):
    grid: int = Field(default=3, ge=2, le=32, description="displacement lattice points per axis")
    sigma: float = Field(default=10.0, ge=0, description="standard deviation of the displacements, pixels")


class AugmentConfig(Section):
    elastic: ElasticConfig | None = Field(default_factory=ElasticConfig, description="null: no elastic deformation")
    flips: bool = True
    rotations: bool = Field(default=True, description="quarter turns (square patches)")
    intensity: float = Field(default=0.1, ge=0, le=1, description="contrast and brightness jitter")


class BorderWeightConfig(Section):
    w0: float = Field(default=10.0, ge=0)
    sigma: float = Field(default=5.0, gt=0)
    classes: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=1, description="classes whose connected components are the objects (cells)"
    )


class TrainConfig(Section):
    """How to fit the model (pipeline/train): data, patches, augmentation, loss, optimiser."""

    data: TrainData
    validation: TrainData | None = None
    encoding: Literal["indices", "binary", "palette"] = "indices"
    classes: list[ClassConfig] | None = Field(default=None, description="names (and palette colours) in id order")
    ignore_index: int | None = Field(default=None, ge=0)
    ignore_colours: list[Annotated[tuple[int, int, int], PlainValidator(_colour), _TupleAsList]] = Field(
        default_factory=list
    )
    patch: int = Field(default=256, ge=8, description="input patch edge; rounded up to a legal size")
    batch_size: int = Field(default=4, ge=1)
    epochs: int = Field(default=10, ge=1)
    steps_per_epoch: int = Field(default=50, ge=1)
    validate_every: int = Field(
        default=1, ge=1, description="validate after every n-th epoch (and the last): large held-out images take long"
    )
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.99, ge=0, lt=1, description="SGD momentum (the U-Net paper: 0.99)")
    schedule: Literal["constant", "cosine"] = "cosine"
    loss: Literal["cross_entropy", "dice", "cross_entropy+dice"] = "cross_entropy"
    class_balance: bool = Field(default=True, description="weigh classes by inverse frequency")
    border_weight: BorderWeightConfig | None = Field(default=None, description="the U-Net paper's separation weights")
    augment: AugmentConfig = AugmentConfig()
    seed: int = Field(default=0, ge=0)
    average: float | None = Field(
        default=None, gt=0, lt=1,
        description="decay of an exponential moving average of the weights, validated and saved instead of the last step's; null: none",
    )
    mixed_precision: bool = Field(
        default=False, description="bfloat16 autocast for the forward pass (CPUs with AVX512-BF16 or AMX, GPUs)"
    )
    device: Annotated[str, PlainValidator(_device)] = "auto"
    threads: int | None = Field(default=None, ge=1, description="torch threads; default: all cores")
    output: PathStr = Field(description="the checkpoint (.safetensors) written, with its .json description")
    overwrite: bool = False
    time_limit: Duration | None = Field(default=None, description="stop after this long (the best checkpoint is kept)")


class TrainWorkflow(Section):
    """``pipeline train``: a model section and a train section."""

    model: ModelConfig
    train: TrainConfig
    storage_options: StorageOptions = Field(default_factory=dict, description=_STORAGE_DOC)
    _source: str = PrivateAttr(default="<memory>")

    @property
    def source(self) -> str:
        return self._source


class Workflow(Section):
    input: InputConfig
    model: ModelConfig
    tiling: TilingConfig = TilingConfig()
    inference: InferenceConfig = InferenceConfig()
    output: OutputConfig
    instances: InstancesConfig | None = Field(
        default=None, description="object ids, an object table, instance metrics; null: classes only"
    )
    evaluation: EvaluationConfig | None = None
    cluster: ClusterConfig = LocalClusterConfig()
    storage_options: StorageOptions = Field(
        default_factory=dict, description="fsspec options for every URL (endpoint_url, anon, profile, ...)"
    )
    _source: str = PrivateAttr(default="<memory>")

    @model_validator(mode="after")
    def _instance_evaluation_has_objects(self) -> Workflow:
        ev = self.evaluation
        if ev is not None and (ev.instances or ev.truth_instances) and self.instances is None:
            raise ValueError(
                "an instances section (instances.classes) with evaluation.instances: objects are "
                "matched only when the workflow finds them"
            )
        if ev is not None and ev.truth_instances and not ev.instances:
            raise ValueError("evaluation.instances: true with evaluation.truth_instances (objects are matched only then)")
        return self

    @property
    def source(self) -> str:
        """The workflow file this came from, for error messages."""
        return self._source


def load_workflow(path: str | Path) -> Workflow:
    """Read, validate and resolve a workflow file (a path or URL); raise WorkflowError naming every problem."""
    path = str(path)
    try:
        text = fs.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise WorkflowError(f"{path}: workflow file not found") from None
    except IsADirectoryError:
        raise WorkflowError(f"{path}: is a folder, expected a workflow YAML file") from None
    except OSError as exc:
        raise WorkflowError(f"{fs.redact(path)}: cannot read workflow file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise WorkflowError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            f"expected a YAML workflow file"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise WorkflowError(f"{path}: not a workflow: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise WorkflowError(f"{where}: not valid YAML: {problem}") from None
    return parse_workflow(raw, source=path)


def parse_workflow(raw: object, source: str | Path = "<memory>") -> Workflow:
    """Validate a workflow mapping; relative paths resolve against ``source``'s folder."""
    if not isinstance(raw, dict):
        raise WorkflowError(
            f"{source}: expected a mapping with sections input, model, output, ..., "
            f"got {type(raw).__name__}"
        )
    base = str(Path.cwd()) if str(source) == "<memory>" else fs.parent(str(source))
    raw = _with_checkpoint(raw, base, source)
    try:
        workflow = Workflow.model_validate(raw)
    except ValidationError as exc:
        lines = [format_error(source, err) for err in exc.errors()]
        raise WorkflowError("\n".join(lines)) from None
    source = str(source)
    return _resolve_paths(workflow, base, source)


def _with_checkpoint(raw: dict, base: str, source: str | Path) -> dict:
    """A model section naming only a trained checkpoint (``path``, no ``arch``) completed
    from the description beside its weights (:mod:`pipeline.io.checkpoints`)."""
    model = raw.get("model")
    if not isinstance(model, dict) or "arch" in model or not isinstance(model.get("path"), str) or not model["path"]:
        return raw
    weights = resolve_path(model["path"], base)
    try:
        with fs.rules_applied(fs.StorageRules.build(raw.get("storage_options") or {}, {})):
            expanded = expand_model_section(model, weights)
    except ModelError as exc:
        raise WorkflowError(f"{source}: {exc}") from None
    except (OSError, TypeError, ValueError):
        return raw  # unreadable here: validation then says what is missing
    return {**raw, "model": expanded}


def _resolve_paths(wf: Workflow, base: str, source: str) -> Workflow:
    def fix(section: BaseModel | None, key: str) -> BaseModel | None:
        value = None if section is None else getattr(section, key, None)
        if section is None or value is None:
            return section
        if isinstance(value, tuple):
            return section.model_copy(update={key: tuple(resolve_path(v, base) for v in value)})
        return section.model_copy(update={key: resolve_path(value, base)})

    resolved = wf.model_copy(
        update={
            "input": fix(wf.input, "path"),
            "model": fix(wf.model, "path"),
            "output": fix(wf.output, "path"),
            "evaluation": fix(fix(fix(wf.evaluation, "ground_truth"), "ignore_mask"), "truth_instances"),
            "instances": fix(wf.instances, "path"),
            "cluster": fix(fix(wf.cluster, "scheduler_file"), "log_directory"),
            "tiling": wf.tiling.model_copy(update={"skip": fix(wf.tiling.skip, "mask")}),
        }
    )
    resolved._source = source
    return resolved


def resolve_path(value: str, base: str | Path) -> str:
    """``value`` as written if a URL or absolute, else relative to ``base`` (a folder or URL prefix)."""
    if fs.is_url(value):
        return value
    if fs.is_url(str(base)):
        return fs.join(str(base), value)
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (Path(base) / p).resolve())


def _union_members() -> dict[str, dict[str, type[BaseModel]]]:
    """Per section holding a tagged union: tag -> member class (tags appear in error paths)."""
    return {
        "model": {
            "unet": UNetConfig,
            "dilated": DilatedConfig,
            "torchscript": TorchScriptConfig,
            "export": ExportConfig,
            "custom": CustomConfig,
            "bioimageio": BioimageioConfig,
        },
        "cluster": {
            "local": LocalClusterConfig,
            "address": AddressClusterConfig,
            "jobqueue": JobqueueClusterConfig,
            "kubernetes": KubernetesClusterConfig,
        },
    }


_UNION_TAGS = set(_union_members()["model"])
_TAG_FIELD = {"model": ("arch", sorted(_UNION_TAGS)), "cluster": ("kind", list(CLUSTER_KINDS))}


def format_error(source: object, err: Mapping[str, Any]) -> str:
    """One pydantic error as ``file: field.path: expected X, got Y``."""
    loc = [str(p) for p in err["loc"]]
    # Drop the discriminated union's tag and union-member names from the path.
    members = _union_members()
    loc = [p for i, p in enumerate(loc) if not (i == 1 and p in members.get(loc[0], ()))]
    loc = [p for p in loc if not p.startswith(("literal[", "function-"))]
    field = ".".join(loc) or "(top level)"
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(err["loc"]))
        return f"{source}: {field}: unknown key; expected one of: {allowed}"
    if kind == "missing":
        if field == "model.halo":
            return (
                f"{source}: model.halo: required for this arch: the pipeline cannot read the "
                f"receptive field of a model it cannot see into, so declare it in pixels"
            )
        return f"{source}: {field}: required field is missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag, allowed_tags = _TAG_FIELD.get(loc[0] if loc else "", ("arch", sorted(_UNION_TAGS)))
        if kind == "union_tag_not_found":
            return f"{source}: {field}.{tag}: required field is missing ({', '.join(allowed_tags)})"
        expected = ", ".join(allowed_tags) if loc[:1] == ["cluster"] else err["ctx"]["expected_tags"]
        found = got.get(tag) if isinstance(got, dict) else got
        return f"{source}: {field}.{tag}: expected one of {expected}, got {found!r}"
    msg = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
            break
    msg = msg.replace("a valid integer", "an integer").replace("a valid ", "a ")
    if kind == "value_error" and isinstance(got, dict):  # a section's own check: no dump of the section
        return f"{source}: {field + ': ' if loc else ''}expected {msg}"
    return f"{source}: {field}: expected {msg}, got {got!r}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = Workflow
    members = _union_members()
    for i, part in enumerate(loc[:-1]):
        if model is None:
            break
        if i == 1 and part in members.get(str(loc[0]), {}):
            model = members[str(loc[0])][part]
            continue
        info = model.model_fields.get(str(part))
        annotation = getattr(info, "annotation", None)
        model = _section_class(annotation)
    if model is None:
        return []
    return list(model.model_fields)


def _section_class(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_class(arg)
        if found is not None:
            return found
    return None
