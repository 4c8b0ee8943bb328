"""bioimage.io model descriptions, 0.4 and 0.5, read without bioimageio.core."""

from __future__ import annotations

import hashlib
import textwrap

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import BioimageioConfig, parse_workflow
from pipeline.errors import ModelError
from pipeline.models.loading import check_declared_halo, load_model
from pipeline.models.unet import UNet, unet_geometry

ARCH_SOURCE = textwrap.dedent(
    '''
    import torch
    from torch import nn

    class TinyNet(nn.Module):
        """3x3 conv, ReLU, 3x3 conv: receptive-field radius 2."""
        def __init__(self, channels_in=1, classes=2, width=4):
            super().__init__()
            self.a = nn.Conv2d(channels_in, width, 3, padding=1)
            self.b = nn.Conv2d(width, classes, 3, padding=1)
        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    class ChannelsLastNet(TinyNet):
        """Takes (b, y, x, c) and returns (b, y, x, c)."""
        def forward(self, x):
            return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    '''
)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _v04(folder, weights: dict, axes="bcyx", out_axes="bcyx", halo=8, step=4, pre=None, post=None, channels=2) -> str:
    shape_min = {"b": 1, "c": 1, "y": 64, "x": 64}
    shape_step = {"b": 0, "c": 0, "y": step, "x": step}
    rdf = {
        "type": "model",
        "format_version": "0.4.10",
        "name": "test model",
        "description": "for tests",
        "authors": [{"name": "Tester"}],
        "license": "MIT",
        "documentation": "README.md",
        "timestamp": "2026-01-01T00:00:00Z",
        "inputs": [{
            "name": "raw", "axes": axes, "data_type": "float32",
            "shape": {"min": [shape_min[a] for a in axes], "step": [shape_step[a] for a in axes]},
            "preprocessing": pre or [],
        }],
        "outputs": [{
            "name": "out", "axes": out_axes, "data_type": "float32",
            "shape": {"reference_tensor": "raw", "scale": [0.0 if a == "c" else 1.0 for a in out_axes],
                      "offset": [channels / 2 if a == "c" else 0 for a in out_axes]},
            "halo": [halo if a in "yx" else 0 for a in out_axes],
            "postprocessing": post or [],
        }],
        "test_inputs": ["in.npy"], "test_outputs": ["out.npy"],
        "weights": weights,
    }  # fmt: skip
    path = folder / "rdf.yaml"
    path.write_text(yaml.safe_dump(rdf, sort_keys=False))
    return str(path)


def _v05(folder, weights: dict, halo=8, step=4, pre=None) -> str:
    rdf = {
        "type": "model",
        "format_version": "0.5.4",
        "name": "test model five",
        "description": "for tests",
        "authors": [{"name": "Tester"}],
        "cite": [{"text": "t", "doi": "10.1000/x"}],
        "license": "MIT",
        "documentation": "README.md",
        "inputs": [{
            "id": "raw",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]},
                     {"type": "space", "id": "y", "size": {"min": 64, "step": step}},
                     {"type": "space", "id": "x", "size": {"min": 64, "step": step}}],
            "test_tensor": {"source": "in.npy"},
            "preprocessing": pre or [],
        }],
        "outputs": [{
            "id": "out",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["a", "b"]},
                     {"type": "space", "id": "y", "size": {"tensor_id": "raw", "axis_id": "y"}, "halo": halo},
                     {"type": "space", "id": "x", "size": {"tensor_id": "raw", "axis_id": "x"}, "halo": halo}],
            "test_tensor": {"source": "out.npy"},
        }],
        "weights": weights,
    }  # fmt: skip
    path = folder / "bioimageio.yaml"
    path.write_text(yaml.safe_dump(rdf, sort_keys=False))
    return str(path)


def _logits(module, x):
    with torch.inference_mode():
        return module(x)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_torchscript_description_round_trips(tmp_path, version) -> None:
    torch.manual_seed(0)
    eager = UNet(1, 2, depth=2, width=4).eval()
    torch.jit.save(torch.jit.script(eager), tmp_path / "weights.pt")
    entry = {"torchscript": {"source": "weights.pt", "sha256": _sha(tmp_path / "weights.pt"), "pytorch_version": "2.13"}}
    pre_04 = [{"name": "scale_range", "kwargs": {"mode": "per_dataset", "axes": "yx", "min_percentile": 1, "max_percentile": 99.8}}]
    pre_05 = [{"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 1, "max_percentile": 99.8}}]
    path = _v04(tmp_path, entry, pre=pre_04) if version == "0.4" else _v05(tmp_path, entry, pre=pre_05)
    cfg = BioimageioConfig(arch="bioimageio", path=path, num_classes=2, halo=unet_geometry(2, "same").halo)
    loaded = load_model(cfg)
    geo = loaded.geometry
    assert (geo.size_min, geo.size_step, geo.shift_period, geo.trim) == (64, 4, 4, 0)
    assert geo.halo == 23  # the workflow's halo adds context to the description's 8
    assert loaded.normalize.percentiles == (1.0, 99.8)
    x = torch.rand(3, 1, 72, 96)
    assert torch.equal(_logits(loaded.module, x), _logits(eager, x))
    check_declared_halo(loaded, cfg)


def test_description_halo_too_small_for_the_network_is_caught(tmp_path) -> None:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(UNet(1, 2, depth=2, width=4).eval()), tmp_path / "weights.pt")
    path = _v04(tmp_path, {"torchscript": {"source": "weights.pt"}}, halo=8)
    cfg = BioimageioConfig(arch="bioimageio", path=path, num_classes=2)
    loaded = load_model(cfg)
    assert loaded.geometry.halo == 8
    with pytest.raises(ModelError, match=r"model.halo: 8 px is declared, but .* 23 px away"):
        check_declared_halo(loaded, cfg)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_state_dict_with_architecture_source(tmp_path, version) -> None:
    (tmp_path / "arch.py").write_text(ARCH_SOURCE)
    namespace: dict = {}
    exec(ARCH_SOURCE, namespace)
    torch.manual_seed(1)
    eager = namespace["TinyNet"](channels_in=1, classes=2, width=4).eval()
    torch.save(eager.state_dict(), tmp_path / "w.pt")
    if version == "0.4":
        entry = {"pytorch_state_dict": {"source": "w.pt", "architecture": "arch.py:TinyNet", "kwargs": {"width": 4}}}
        path = _v04(tmp_path, entry, halo=2, step=1)
    else:
        arch = {"source": "arch.py", "callable": "TinyNet", "kwargs": {"width": 4}}
        entry = {"pytorch_state_dict": {"source": "w.pt", "architecture": arch, "pytorch_version": "2.13"}}
        path = _v05(tmp_path, entry, halo=2, step=1)
    with pytest.raises(ModelError, match="its architecture is Python code shipped with the model .*trust_code: true"):
        load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2))
    loaded = load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2, trust_code=True))
    assert loaded.geometry.halo == 2 and loaded.normalize is None
    x = torch.rand(2, 1, 70, 65)
    torch.testing.assert_close(_logits(loaded.module, x), _logits(eager, x))


def test_other_axis_orders_and_one_channel_outputs(tmp_path) -> None:
    (tmp_path / "arch.py").write_text(ARCH_SOURCE)
    namespace: dict = {}
    exec(ARCH_SOURCE, namespace)
    torch.manual_seed(2)
    eager = namespace["ChannelsLastNet"](channels_in=1, classes=1, width=4).eval()
    torch.save(eager.state_dict(), tmp_path / "w.pt")
    entry = {"pytorch_state_dict": {"source": "w.pt", "architecture": "arch.py:ChannelsLastNet", "kwargs": {"classes": 1}}}
    post = [{"name": "sigmoid"}, {"name": "binarize", "kwargs": {"threshold": 0.1}}]
    path = _v04(tmp_path, entry, axes="byxc", out_axes="byxc", halo=2, step=1, post=post, channels=1)
    loaded = load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2, trust_code=True))
    x = torch.rand(2, 1, 64, 64)
    expected = (_logits(eager, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) > 0.1).long()[:, 0]
    assert torch.equal(_logits(loaded.module, x).argmax(1), expected)


def test_bad_descriptions(tmp_path) -> None:
    torch.jit.save(torch.jit.script(UNet(1, 2, depth=1, width=2).eval()), tmp_path / "weights.pt")
    path = _v04(tmp_path, {"torchscript": {"source": "weights.pt", "sha256": "0" * 64}})
    with pytest.raises(ModelError, match="has sha256 .* but the description says 0000"):
        load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2))
    path = _v04(tmp_path, {"onnx": {"source": "m.onnx"}})
    with pytest.raises(ModelError, match="none of its weights .*onnx.* can be run"):
        load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2))
    path = _v04(tmp_path, {"torchscript": {"source": "https://example.org/w.pt"}})
    with pytest.raises(ModelError, match="must be a file beside the description"):
        load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2))
    path = _v04(tmp_path, {"torchscript": {"source": "weights.pt"}}, pre=[{"name": "clip", "kwargs": {"min": 0, "max": 1}}])
    with pytest.raises(ModelError, match="preprocessing 'clip' is not supported"):
        load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2))


def test_workflow_normalisation_conflicts_with_the_description(tmp_path) -> None:
    import tifffile

    from pipeline.errors import PipelineError
    from pipeline.planning import prepare

    torch.jit.save(torch.jit.script(UNet(1, 2, depth=2, width=2).eval()), tmp_path / "weights.pt")
    pre = [{"name": "zero_mean_unit_variance", "kwargs": {"mode": "per_sample", "axes": "yx"}}]
    _v04(tmp_path, {"torchscript": {"source": "weights.pt"}}, halo=23, pre=pre)
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((80, 80), np.uint8))
    raw = {
        "input": {"path": "img.tif"},
        "model": {"arch": "bioimageio", "path": "rdf.yaml", "num_classes": 2},
        "tiling": {"tile": 64},
        "output": {"path": "o.zarr"},
    }
    prepared = prepare(parse_workflow(raw, source=tmp_path / "w.yaml"))
    assert prepared.normalize.zscore
    raw["model"]["normalize"] = {"mean": 0.0, "std": 1.0}
    with pytest.raises(PipelineError, match="declares its own preprocessing"):
        prepare(parse_workflow(raw, source=tmp_path / "w.yaml"))


HOSTILE_ARCHITECTURES = {
    "0.4 os.system": ("0.4", "os.system", {"command": "touch {marker}"}),
    "0.5 os.system": ("0.5", {"import_from": "os", "callable": "system", "kwargs": {"command": "touch {marker}"}}, None),
    "0.5 subprocess": ("0.5", {"import_from": "subprocess", "callable": "run", "kwargs": {"args": ["touch", "{marker}"]}}, None),
    "0.4 builtins.exec": ("0.4", "builtins.exec", {"source": "open({marker!r}, 'w')"}),
    "0.4 torch.load": ("0.4", "torch.load", {"f": "{marker}.pkl", "weights_only": False}),
    "0.5 a non-module class": ("0.5", {"import_from": "pathlib", "callable": "Path", "kwargs": {}}, None),
}


@pytest.mark.parametrize("case", list(HOSTILE_ARCHITECTURES), ids=list(HOSTILE_ARCHITECTURES))
def test_a_description_cannot_make_validate_run_a_command(tmp_path, capsys, case) -> None:
    """An architecture naming os.system (or any non-module callable of a library) is refused uncalled."""
    from pipeline.cli import main

    version, arch, kwargs = HOSTILE_ARCHITECTURES[case]
    marker = str(tmp_path / "pwned")

    def fill(value):
        if isinstance(value, str):
            return value.replace("{marker!r}", repr(marker)).replace("{marker}", marker)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    torch.save(UNet(1, 2, depth=1, width=2).state_dict(), tmp_path / "w.pt")
    if version == "0.4":
        entry = {"pytorch_state_dict": {"source": "w.pt", "architecture": arch, "kwargs": fill(kwargs)}}
        _v04(tmp_path, entry)
        rdf = "rdf.yaml"
    else:
        entry = {"pytorch_state_dict": {"source": "w.pt", "architecture": fill(arch), "pytorch_version": "2.13"}}
        _v05(tmp_path, entry)
        rdf = "bioimageio.yaml"
    import tifffile

    tifffile.imwrite(tmp_path / "img.tif", np.zeros((80, 80), np.uint8))
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "img.tif"},
        "model": {"arch": "bioimageio", "path": rdf, "num_classes": 2, "trust_code": True},
        "output": {"path": "o.zarr"},
    }))  # fmt: skip
    assert main(["validate", str(tmp_path / "wf.yaml")]) == 2
    err = capsys.readouterr().err
    assert "expected an nn.Module subclass" in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


def test_an_architecture_file_function_must_be_its_own(tmp_path) -> None:
    """With trust_code, a name in the shipped file must still be a module class or its own function."""
    (tmp_path / "arch.py").write_text("import os\nsystem = os.system\ndef build(width=2):\n    from torch import nn\n    return nn.Conv2d(1, 2, 3, padding=1)\n")
    torch.save({"weight": torch.zeros(2, 1, 3, 3), "bias": torch.zeros(2)}, tmp_path / "w.pt")
    entry = {"pytorch_state_dict": {"source": "w.pt", "architecture": "arch.py:system", "kwargs": {"command": "true"}}}
    path = _v04(tmp_path, entry, halo=1, step=1)
    with pytest.raises(ModelError, match="expected an nn.Module subclass or a plain Python function|not a function the architecture file defines"):
        load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2, trust_code=True))
    entry["pytorch_state_dict"]["architecture"] = "arch.py:build"
    entry["pytorch_state_dict"]["kwargs"] = {}
    path = _v04(tmp_path, entry, halo=1, step=1)
    assert load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2, trust_code=True)).geometry.halo >= 1


def test_malformed_descriptions_are_model_errors(tmp_path) -> None:
    torch.jit.save(torch.jit.script(UNet(1, 2, depth=1, width=2).eval()), tmp_path / "weights.pt")
    path = _v04(tmp_path, {"torchscript": {"source": "weights.pt"}}, pre=[{"name": "zero_mean_unit_variance", "kwargs": {"mode": "fixed", "mean": float("nan"), "std": 1.0}}])
    with pytest.raises(ModelError, match="preprocessing value nan: expected a finite number"):
        load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2))
    rdf = yaml.safe_load(open(path))
    rdf["inputs"][0]["shape"] = {"min": "many"}
    open(path, "w").write(yaml.safe_dump(rdf))
    with pytest.raises(ModelError, match="malformed model description"):
        load_model(BioimageioConfig(arch="bioimageio", path=path, num_classes=2))
