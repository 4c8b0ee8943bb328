"""The workflow file: schema, loading, and error messages a user can act on.

The schema is strict: unknown keys, wrong types and out-of-range values are errors that
name the file, the field path, what was expected and what arrived. Relative paths resolve
against the workflow file's folder; URLs (``scheme://``) are left as they are.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from .errors import WorkflowError
from .mirror import MirrorMode


def _int_or_auto(minimum: int) -> Any:
    def check(value: object) -> int | str:
        if value == "auto":
            return "auto"
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        raise ValueError(f"an integer >= {minimum} or 'auto'")

    return Annotated[int | Literal["auto"], PlainValidator(check)]


def _float_or_list(value: object) -> float | tuple[float, ...]:
    def number(v: object) -> float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise ValueError("a number or a list of numbers (one per channel)")

    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("a number or a non-empty list of numbers (one per channel)")
        return tuple(number(v) for v in value)
    return number(value)


def _declared_halo(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(
        "a halo in pixels (integer >= 0): the receptive field of a TorchScript model cannot "
        "be computed, so it must be declared"
    )


def _device(value: object) -> str:
    if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return value
    raise ValueError("one of auto, cpu, cuda, cuda:N")


FloatOrList = Annotated[float | tuple[float, ...], PlainValidator(_float_or_list)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InputConfig(Section):
    path: str = Field(description="TIFF/BigTIFF (tiled or stripped) or zarr array")
    channel_axis: int | None = Field(
        default=None, description="index of the channel axis of a multi-channel image"
    )


class NormalizeConfig(Section):
    """``x -> (x - mean) / std``, per channel when lists are given."""

    mean: FloatOrList = 0.0
    std: FloatOrList = 1.0

    @field_validator("std")
    @classmethod
    def _positive(cls, v: float | tuple[float, ...]) -> float | tuple[float, ...]:
        values = v if isinstance(v, tuple) else (v,)
        if any(s <= 0 for s in values):
            raise ValueError("positive standard deviations")
        return v


class ModelBase(Section):
    path: str | None = Field(default=None, description="weights file (or TorchScript file)")
    num_classes: int = Field(ge=2, le=65536)
    in_channels: int = Field(default=1, ge=1)
    halo: _int_or_auto(0) = "auto"  # type: ignore[valid-type]
    normalize: NormalizeConfig = NormalizeConfig()


class UNetConfig(ModelBase):
    """Ronneberger et al. 2015 U-Net; ``width`` is the first level's channel count."""

    arch: Literal["unet"]
    depth: int = Field(default=4, ge=1, le=8)
    width: int = Field(default=64, ge=1)
    padding: Literal["same", "valid"] = "same"
    batch_norm: bool = False
    seed: int = Field(default=0, ge=0, description="initialisation seed when path is null")


class DilatedConfig(ModelBase):
    """Yu & Koltun 2016 context module on a plain convolutional front end."""

    arch: Literal["dilated"]
    front_width: int = Field(default=64, ge=1)
    front_depth: int = Field(default=2, ge=1)
    context: Literal["basic", "large"] = "basic"
    padding: Literal["same", "valid"] = "same"
    seed: int = Field(default=0, ge=0, description="initialisation seed when path is null")


class TorchScriptConfig(ModelBase):
    """A user's TorchScript file; the pipeline cannot see its layers, so geometry is declared."""

    arch: Literal["torchscript"]
    path: str  # type: ignore[assignment]
    halo: Annotated[int, PlainValidator(_declared_halo)]  # type: ignore[assignment]
    shift_period: int = Field(default=1, ge=1, description="total stride of pooling layers")
    size_min: int = Field(default=1, ge=1, description="legal input sizes: min + n * step")
    size_step: int = Field(default=1, ge=1)


ModelConfig = Annotated[
    UNetConfig | DilatedConfig | TorchScriptConfig, Field(discriminator="arch")
]


class TilingConfig(Section):
    tile: _int_or_auto(1) = 1024  # type: ignore[valid-type]
    mirror: MirrorMode = "reflect"


class InferenceConfig(Section):
    device: Annotated[str, PlainValidator(_device)] = "auto"
    batch_size: int = Field(default=1, ge=1, description="tiles per forward pass and per task")


class OutputConfig(Section):
    path: str
    overwrite: bool = False


class EvaluationConfig(Section):
    ground_truth: str
    ignore_index: int | None = Field(default=None, ge=0)


class ClusterConfig(Section):
    kind: Literal["local"] = "local"
    n_workers: _int_or_auto(1) = "auto"  # type: ignore[valid-type]
    threads_per_worker: int = Field(default=1, ge=1)


class Workflow(Section):
    input: InputConfig
    model: ModelConfig
    tiling: TilingConfig = TilingConfig()
    inference: InferenceConfig = InferenceConfig()
    output: OutputConfig
    evaluation: EvaluationConfig | None = None
    cluster: ClusterConfig = ClusterConfig()
    _source: str = PrivateAttr(default="<memory>")

    @property
    def source(self) -> str:
        """The workflow file this came from, for error messages."""
        return self._source


def load_workflow(path: str | Path) -> Workflow:
    """Read, validate and resolve a workflow file; raise WorkflowError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise WorkflowError(f"{path}: workflow file not found") from None
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot read workflow file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
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
    try:
        workflow = Workflow.model_validate(raw)
    except ValidationError as exc:
        lines = [format_error(source, err) for err in exc.errors()]
        raise WorkflowError("\n".join(lines)) from None
    base = Path(source).parent if source != "<memory>" else Path.cwd()
    return _resolve_paths(workflow, base, str(source))


def _resolve_paths(wf: Workflow, base: Path, source: str) -> Workflow:
    def fix(section: BaseModel | None, key: str) -> BaseModel | None:
        if section is None or getattr(section, key) is None:
            return section
        return section.model_copy(update={key: resolve_path(getattr(section, key), base)})

    resolved = wf.model_copy(
        update={
            "input": fix(wf.input, "path"),
            "model": fix(wf.model, "path"),
            "output": fix(wf.output, "path"),
            "evaluation": fix(wf.evaluation, "ground_truth"),
        }
    )
    resolved._source = source
    return resolved


def resolve_path(value: str, base: Path) -> str:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


_UNION_TAGS = {"unet", "dilated", "torchscript"}


def format_error(source: object, err: dict[str, Any]) -> str:
    """One pydantic error as ``file: field.path: expected X, got Y``."""
    loc = [str(p) for p in err["loc"]]
    # Drop the discriminated union's tag and union-member names from the path.
    loc = [p for i, p in enumerate(loc) if not (i == 1 and loc[0] == "model" and p in _UNION_TAGS)]
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
                f"{source}: model.halo: required for arch torchscript: the receptive field of "
                f"a TorchScript model cannot be computed, so declare it in pixels"
            )
        return f"{source}: {field}: required field is missing"
    if kind == "union_tag_invalid":
        return f"{source}: {field}.arch: expected one of {err['ctx']['expected_tags']}, got {got.get('arch')!r}"
    if kind == "union_tag_not_found":
        return f"{source}: {field}.arch: required field is missing (unet, dilated or torchscript)"
    msg = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
            break
    msg = msg.replace("a valid integer", "an integer").replace("a valid ", "a ")
    return f"{source}: {field}: expected {msg}, got {got!r}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = Workflow
    for part in loc[:-1]:
        if model is None:
            break
        if part in _UNION_TAGS:
            model = {"unet": UNetConfig, "dilated": DilatedConfig, "torchscript": TorchScriptConfig}[part]
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
