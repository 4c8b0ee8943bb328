from pathlib import Path

import pytest

from pipeline.config import load_workflow, parse_workflow
from pipeline.errors import WorkflowError

MINIMAL = {
    "input": {"path": "img.tif"},
    "model": {"arch": "unet", "num_classes": 2},
    "output": {"path": "out.zarr"},
}


def _with(section: str, **values):
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    raw.setdefault(section, {}).update(values)
    return raw


def test_relative_paths_resolve_against_the_workflow_folder(tmp_path) -> None:
    wf = parse_workflow(_with("evaluation", ground_truth="gt/labels.tif"), source=tmp_path / "w.yaml")
    assert wf.input.path == str(tmp_path / "img.tif")
    assert wf.evaluation.ground_truth == str(tmp_path / "gt" / "labels.tif")
    assert parse_workflow(_with("input", path="s3://bucket/img.zarr")).input.path == "s3://bucket/img.zarr"


def test_defaults() -> None:
    wf = parse_workflow(MINIMAL)
    assert wf.tiling.tile == "auto" and wf.tiling.mirror == "reflect" and wf.tiling.memory_share == 0.5
    assert wf.inference.channels_last == "auto" and wf.inference.torch_threads == "auto"
    assert wf.cluster.allocator == "tuned"
    assert wf.model.halo == "auto" and wf.cluster.kind == "local"
    assert wf.output.overwrite is False and wf.evaluation is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with("input", colour="red"), "w.yaml: input.colour: unknown key; expected one of: path, channel_axis"),
        (_with("model", num_classes="two"), "w.yaml: model.num_classes: expected an integer, got 'two'"),
        (_with("model", depth=True), "w.yaml: model.depth: expected an integer, got True"),
        (_with("model", arch="resnet"), "w.yaml: model.arch: expected one of 'unet', 'dilated', 'torchscript', 'export', 'custom', 'bioimageio', got 'resnet'"),
        (_with("model", arch="torchscript", path="m.pt"), "w.yaml: model.halo: required for this arch"),
        (_with("model", arch="torchscript", path="m.pt", halo="auto"), "w.yaml: model.halo: expected a halo in pixels"),
        (_with("tiling", tile=0), "w.yaml: tiling.tile: expected an integer >= 1 or 'auto', got 0"),
        (_with("tiling", mirror="wrap"), "w.yaml: tiling.mirror: expected 'reflect' or 'symmetric', got 'wrap'"),
        (_with("inference", device="gpu"), "w.yaml: inference.device: expected one of auto, cpu, cuda, cuda:N, got 'gpu'"),
        (_with("model", normalize={"std": 0}), "w.yaml: model.normalize.std: expected positive standard deviations"),
        ({"input": {"path": "x"}, "model": {"arch": "unet", "num_classes": 2}}, "w.yaml: output: required field is missing"),
    ],
)
def test_errors_name_file_field_expected_and_got(raw, message) -> None:
    with pytest.raises(WorkflowError) as info:
        parse_workflow(raw, source="w.yaml")
    assert message in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    raw = _with("model", num_classes=1, depth=99)
    with pytest.raises(WorkflowError) as info:
        parse_workflow(raw, source="w.yaml")
    assert "model.num_classes" in str(info.value) and "model.depth" in str(info.value)


def test_yaml_syntax_errors_give_line_and_column(tmp_path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("input:\n  path: [unclosed\n")
    with pytest.raises(WorkflowError, match=r"broken.yaml:\d+:\d+: not valid YAML"):
        load_workflow(path)
    with pytest.raises(WorkflowError, match="workflow file not found"):
        load_workflow(tmp_path / "nope.yaml")


def test_the_shipped_workflows_parse() -> None:
    from pipeline.train_command import load_train_workflow

    for path in sorted((Path(__file__).parents[1] / "workflows").glob("*.yaml")):
        if path.name.startswith("train_"):  # pipeline train workflows: model + train sections
            load_train_workflow(str(path))
        else:
            load_workflow(path)
