"""torch.export programs: genuine ones load exactly; crafted ones never run code.

Each crafted archive below makes a plain ``torch.export.load`` (or the first call of its
module) create a marker file: that is checked first, in a subprocess, so these tests fail
if a payload stops being dangerous. Then the pipeline must refuse every one of them, at
``pipeline validate``, with the marker still absent.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from torch.export import Dim, export

from pipeline.cli import main
from pipeline.errors import ModelError
from pipeline.models.dilated import DilatedContextNet
from pipeline.models.pt2 import load_program
from pipeline.models.unet import UNet
from tests.helpers import BoxFilterNet


class Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Keyword(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, *, extra: dict) -> torch.Tensor:
        return self.conv(x) + extra["b"]


class StringInput(torch.nn.Module):
    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return x * 2 if mode == "double" else x


def _dynamic() -> dict:
    return {"x": {2: Dim("h", min=8, max=512), 3: Dim("w", min=8, max=512)}}


def _save(program, path: Path) -> Path:
    torch.export.save(program, path)
    return path


def _multiple_of(k: int) -> dict:
    return {"x": {2: k * Dim("h", min=2, max=128), 3: k * Dim("w", min=2, max=128)}}


GENUINE = {  # network, input sizes to compare at (the first one exported), dynamic shapes
    "conv": lambda: (Conv(), (32, 40), _dynamic()),
    "unet same": lambda: (UNet(1, 2, depth=2, width=4), (32, 48), _multiple_of(4)),
    "unet valid, batch norm (fixed size)": lambda: (UNet(1, 3, depth=2, width=4, padding="valid", batch_norm=True), (92,), None),
    "dilated large": lambda: (DilatedContextNet(1, 2, 4, 1, "large"), (40, 56), _dynamic()),
    "box filter": lambda: (BoxFilterNet(2, np.array([[1], [-1]])), (32, 24), _dynamic()),
}


@pytest.mark.parametrize("name", list(GENUINE))
def test_genuine_programs_load_and_equal_torch_export_load(tmp_path, name) -> None:
    torch.manual_seed(0)
    net, sizes, dims = GENUINE[name]()
    net.eval()
    first = torch.rand(1, 1, sizes[0], sizes[0])
    path = _save(export(net, (first,), dynamic_shapes=dims), tmp_path / "m.pt2")
    ours, theirs = load_program(str(path)).module(), torch.export.load(path).module()
    for size in sizes:
        x = torch.rand(1, 1, size, sizes[-1])
        with torch.inference_mode():
            assert torch.equal(ours(x), theirs(x))
            torch.testing.assert_close(ours(x), net(x))


def test_a_program_that_only_takes_square_inputs_is_refused(tmp_path) -> None:
    from pipeline.config import ExportConfig
    from pipeline.models.loading import load_model

    side = Dim("side", min=8, max=512)
    path = _save(export(Conv(), (torch.rand(1, 1, 32, 32),), dynamic_shapes={"x": {2: side, 3: side}}), tmp_path / "sq.pt2")
    with pytest.raises(ModelError, match="height and width share one dynamic dimension"):
        load_model(ExportConfig(arch="export", path=str(path), num_classes=2, halo=1))


# --- crafted archives ---------------------------------------------------------------------


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_pickle(marker: str) -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return buf.getvalue()


def _members(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        root = names[0].split("/", 1)[0] + "/"
        return root, {n[len(root) :]: z.read(n) for n in names}


def _config(members: dict, kind: str) -> tuple[str, dict]:
    key = f"data/{kind}/model_{kind}_config.json"
    return key, json.loads(members[key])


def _craft(base: Path, marker: str, variant: str) -> dict[str, bytes] | None:
    """The members of ``base`` changed by ``variant``; None for a whole other layout."""
    root, m = _members(base)
    evil = _torch_pickle(marker)
    if variant == "weights marked use_pickle":
        key, cfg = _config(m, "weights")
        cfg["config"]["conv.weight"]["use_pickle"] = True
        m[key], m["data/weights/weight_0"] = json.dumps(cfg).encode(), evil
    elif variant == "a pickle disguised as a config file":
        key, cfg = _config(m, "weights")
        cfg["config"]["conv.bias"].update(use_pickle=True, path_name="model_weights_config.json.bak")
        m[key] = json.dumps(cfg).encode()
        m["data/weights/model_weights_config.json.bak"] = pickle.dumps(Payload(marker), protocol=2)
    elif variant in ("constant marked use_pickle", "opaque object constant"):
        key, cfg = _config(m, "constants")
        member = "tensor_0" if variant.startswith("constant") else "opaque_obj_0"
        cfg["config"]["evil"] = {"path_name": member, "is_param": False, "use_pickle": True, "tensor_meta": None}
        m[key] = json.dumps(cfg).encode()
        m[f"data/constants/{member}"] = evil if member == "tensor_0" else pickle.dumps(Payload(marker), protocol=2)
    elif variant == "sample inputs":
        m["data/sample_inputs/model.pt"] = evil
    elif variant == "legacy weights file":
        m["data/weights/model.pt"] = evil
    elif variant == "a second program":
        m["models/zz.json"] = m["models/model.json"]
        m["data/weights/zz_weights_config.json"] = m["data/weights/model_weights_config.json"]
        m["data/constants/zz_constants_config.json"] = m["data/constants/model_constants_config.json"]
        m["data/sample_inputs/zz.pt"] = evil
    elif variant == "aoti compiler command":
        flags = {"compiler": f"touch {marker}; true", "compile_only": True, "cflags": [], "definitions": [],
                 "include_dirs": [], "ldflags": [], "libraries_dirs": [], "libraries": [], "passthrough_args": []}  # fmt: skip
        folder = "data/aotinductor/model/"
        m[folder + "x.wrapper.cpp"] = b"// nothing\n"
        m[folder + "x.wrapper_metadata.json"] = json.dumps({"AOTI_DEVICE_KEY": "cpu"}).encode()
        m[folder + "x.wrapper_compile_flags.json"] = json.dumps(flags).encode()
        m[folder + "x.wrapper_linker_flags.json"] = json.dumps(dict(flags, compile_only=False)).encode()
    elif variant == "torch 2.7 layout":
        from torch._export.serde.schema import SCHEMA_VERSION

        return {
            "version": ".".join(map(str, SCHEMA_VERSION)).encode(),
            "serialized_exported_program.json": m["models/model.json"],
            "serialized_state_dict.pt": evil,
            "serialized_constants.pt": b"",
            "serialized_example_inputs.pt": b"",
        }
    elif variant == "sympy expression":
        text = m["models/model.json"].decode()
        m["models/model.json"] = _replace_expr(text, f"__import__('os').system('touch {marker}')").encode()
    elif variant == "guards code":
        program = json.loads(m["models/model.json"])
        program["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
        m["models/model.json"] = json.dumps(program).encode()
    elif variant == "parameter name in generated code":
        seg = f'q") if getattr(__import__("os"),"system")("touch {marker}") else getattr(self, "q'
        for key in ("models/model.json", "data/weights/model_weights_config.json"):
            m[key] = m[key].decode().replace('"conv.weight"', json.dumps("conv." + seg)).encode()
    elif variant == "string placeholder":
        value = f"double' if __import__('os').system('touch {marker}') == 0 else '"
        m["models/model.json"] = m["models/model.json"].decode().replace('"as_string": "double"', '"as_string": ' + json.dumps(value)).encode()
    else:
        raise ValueError(variant)
    return {root + k: v for k, v in m.items()}


def _replace_expr(text: str, code: str) -> str:
    """Put ``code`` into the first symbolic expression of the program's JSON."""
    program = json.loads(text)
    done = False

    def visit(node):
        nonlocal done
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr_str" and isinstance(v, str) and not done:
                    node[k] = f"Add({v}, 0*({code}))"
                    done = True
                else:
                    visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(program)
    assert done, "no symbolic expression to alter"
    return json.dumps(program)


VARIANTS = [
    "weights marked use_pickle",
    "a pickle disguised as a config file",
    "constant marked use_pickle",
    "opaque object constant",
    "sample inputs",
    "legacy weights file",
    "a second program",
    "aoti compiler command",
    "torch 2.7 layout",
    "sympy expression",
    "guards code",
    "parameter name in generated code",
    "string placeholder",
]


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every variant as (archive, marker); checked to run code under plain torch.export.load."""
    folder = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    conv = _save(export(Conv(), (torch.rand(1, 1, 16, 16),), dynamic_shapes=_dynamic()), folder / "conv.pt2")
    strings = _save(export(StringInput(), (torch.rand(1, 1, 8, 8), "double")), folder / "str.pt2")
    out = {}
    for i, variant in enumerate(VARIANTS):
        marker = folder / f"marker-{i}"
        members = _craft(strings if variant == "string placeholder" else conv, str(marker), variant)
        path = folder / f"crafted-{i}.pt2"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for name, data in members.items():
                z.writestr(name, data)
        out[variant] = (path, marker)
    script = (
        "import sys, torch\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        m = torch.export.load(path).module()\n"
        "        m(torch.rand(1, 1, 16, 16))\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    subprocess.run([sys.executable, "-c", script, *(str(p) for p, _ in out.values())], capture_output=True, timeout=300)
    strings_check = "import torch, sys\ntry:\n    torch.export.load(sys.argv[1]).module()(torch.rand(1, 1, 8, 8), 'double')\nexcept BaseException:\n    pass\n"
    subprocess.run([sys.executable, "-c", strings_check, str(out["string placeholder"][0])], capture_output=True, timeout=120)
    for variant, (_, marker) in out.items():
        assert marker.exists(), f"the crafted archive ({variant}) did not run code under torch.export.load"
        marker.unlink()
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_crafted_archives_are_refused_without_running_code(crafted, variant) -> None:
    path, marker = crafted[variant]
    with pytest.raises(ModelError, match="refused to load this torch.export program"):
        program = load_program(str(path))
        program.module()(torch.rand(1, 1, 16, 16))  # not reached: but would run guards and codegen
    assert not marker.exists()


def test_pipeline_validate_on_a_crafted_archive(crafted, tmp_path, capsys) -> None:
    path, marker = crafted["sample inputs"]
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((64, 64), np.uint8))
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "img.tif"},
        "model": {"arch": "export", "path": str(path), "num_classes": 2, "halo": 1},
        "output": {"path": "out.zarr"},
    }))  # fmt: skip
    assert main(["validate", str(tmp_path / "wf.yaml")]) == 2
    captured = capsys.readouterr()
    assert "refused to load this torch.export program: a pickled object that weights_only loading refuses (it calls posix.system)" in captured.err
    assert "Traceback" not in captured.err and "valid" not in captured.out
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b"not a zip at all", b""])
def test_files_that_are_not_programs(tmp_path, content) -> None:
    (tmp_path / "bad.pt2").write_bytes(content)
    with pytest.raises(ModelError, match="refused to load"):
        load_program(str(tmp_path / "bad.pt2"))
