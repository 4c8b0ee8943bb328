import numpy as np
import pytest
import torch

from pipeline.config import CustomConfig, DilatedConfig, ExportConfig, TorchScriptConfig, UNetConfig
from pipeline.errors import ModelError
from pipeline.models.loading import build_module, load_model
from pipeline.models.unet import UNet
from tests.helpers import BoxFilterNet


def _logits(module, x):
    with torch.inference_mode():
        return module(x)


def test_untrained_builtin_is_fixed_by_its_seed() -> None:
    cfg = UNetConfig(arch="unet", num_classes=2, depth=2, width=4, seed=3)
    a, b = load_model(cfg), load_model(cfg)
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(_logits(a.module, x), _logits(b.module, x))
    assert a.untrained and a.identity["weights"] == {"untrained": True, "seed": 3}
    other = load_model(cfg.model_copy(update={"seed": 4}))
    assert not torch.equal(_logits(other.module, x), _logits(a.module, x))


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(arch="unet", num_classes=3, depth=2, width=4, batch_norm=True),
        DilatedConfig(arch="dilated", num_classes=3, in_channels=2, front_width=4, context="large"),
    ],
)
def test_state_dict_round_trip_gives_the_eager_logits(tmp_path, cfg) -> None:
    torch.manual_seed(5)
    eager = build_module(cfg).eval()
    path = tmp_path / "weights.pt"
    torch.save(eager.state_dict(), path)
    loaded = load_model(cfg.model_copy(update={"path": str(path)}))
    x = torch.rand(2, cfg.in_channels, 48, 40)
    assert torch.equal(_logits(loaded.module, x), _logits(eager, x))
    assert not loaded.untrained
    assert len(loaded.identity["weights"]["sha256"]) == 64


def test_pickled_objects_are_refused(tmp_path) -> None:
    cfg = UNetConfig(arch="unet", num_classes=2, depth=2, width=4)
    path = tmp_path / "whole_model.pt"
    torch.save(build_module(cfg), path)  # a pickled module, not a state dict
    with pytest.raises(ModelError, match="not a plain state dict"):
        load_model(cfg.model_copy(update={"path": str(path)}))


def test_weights_of_another_architecture_are_refused(tmp_path) -> None:
    small = UNetConfig(arch="unet", num_classes=2, depth=2, width=4)
    path = tmp_path / "w.pt"
    torch.save(build_module(small).state_dict(), path)
    with pytest.raises(ModelError, match=r"does not fit arch unet .*depth"):
        load_model(small.model_copy(update={"path": str(path), "depth": 3}))


def test_missing_weights_file(tmp_path) -> None:
    cfg = UNetConfig(arch="unet", num_classes=2, path=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelError, match="model.path: file not found"):
        load_model(cfg)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_torchscript_round_trip_measures_the_trim(tmp_path, padding) -> None:
    net = BoxFilterNet(3, np.array([[1, 0], [0, 1], [1, -1]]), padding)
    path = tmp_path / "box.pt"
    torch.jit.save(torch.jit.script(net), path)
    cfg = TorchScriptConfig(arch="torchscript", path=str(path), num_classes=3, in_channels=2, halo=3)
    loaded = load_model(cfg)
    assert loaded.geometry.trim == (3 if padding == "valid" else 0)
    assert loaded.geometry.halo == 3
    x = torch.randint(0, 9, (1, 2, 30, 31)).float()
    assert torch.equal(_logits(loaded.module, x), _logits(net, x))


def test_torchscript_class_count_is_checked(tmp_path) -> None:
    path = tmp_path / "box.pt"
    torch.jit.save(torch.jit.script(BoxFilterNet(1, np.ones((2, 1)))), path)
    cfg = TorchScriptConfig(arch="torchscript", path=str(path), num_classes=5, halo=1)
    with pytest.raises(ModelError, match="model.num_classes: 5, but .* outputs 2 channels"):
        load_model(cfg)


def test_torchscript_halo_below_its_own_trim_is_refused(tmp_path) -> None:
    path = tmp_path / "box.pt"
    torch.jit.save(torch.jit.script(BoxFilterNet(4, np.ones((2, 1)), "valid")), path)
    cfg = TorchScriptConfig(arch="torchscript", path=str(path), num_classes=2, halo=2)
    with pytest.raises(ModelError, match="model.halo: 2 px is smaller than the 4 px"):
        load_model(cfg)


def test_not_a_torchscript_file(tmp_path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a zip archive")
    cfg = TorchScriptConfig(arch="torchscript", path=str(path), num_classes=2, halo=2)
    with pytest.raises(ModelError, match="is not a TorchScript file"):
        load_model(cfg)


def test_safetensors_weights_for_a_builtin(tmp_path) -> None:
    from safetensors.torch import save_file

    cfg = UNetConfig(arch="unet", num_classes=2, depth=2, width=4)
    torch.manual_seed(9)
    eager = build_module(cfg).eval()
    save_file(eager.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model(cfg.model_copy(update={"path": str(tmp_path / "w.safetensors")}))
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(_logits(loaded.module, x), _logits(eager, x))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelError, match="is not a safetensors file"):
        load_model(cfg.model_copy(update={"path": str(tmp_path / "bad.safetensors")}))


def test_torch_export_program_with_dynamic_sizes(tmp_path) -> None:
    from torch.export import Dim, export

    torch.manual_seed(2)
    eager = UNet(1, 2, depth=2, width=4, padding="same").eval()
    n = Dim("n", min=1, max=512)
    h, w = Dim("h", min=2, max=256), Dim("w", min=2, max=256)
    program = export(eager, (torch.rand(2, 1, 64, 64),), dynamic_shapes={"x": {0: n, 2: 4 * h, 3: 4 * w}})
    torch.export.save(program, tmp_path / "unet.pt2")
    cfg = ExportConfig(arch="export", path=str(tmp_path / "unet.pt2"), num_classes=2, halo=23, shift_period=4)
    loaded = load_model(cfg)
    geo = loaded.geometry
    assert (geo.size_min, geo.size_step, geo.size_max, geo.trim) == (8, 4, 1024, 0)
    x = torch.rand(3, 1, 96, 128)
    torch.testing.assert_close(_logits(loaded.module, x), _logits(eager, x))


def test_torch_export_program_with_a_fixed_shape(tmp_path) -> None:
    from torch.export import export

    eager = BoxFilterNet(2, np.array([[1], [-1]]))
    torch.export.save(export(eager, (torch.rand(1, 1, 40, 40),)), tmp_path / "fixed.pt2")
    cfg = ExportConfig(arch="export", path=str(tmp_path / "fixed.pt2"), num_classes=2, halo=2)
    loaded = load_model(cfg)
    assert (loaded.geometry.size_min, loaded.geometry.size_max) == (40, 40)
    x = torch.randint(0, 9, (3, 1, 40, 40)).float()  # 3 tiles through a batch-1 program
    assert torch.equal(_logits(loaded.module, x), _logits(eager, x))


def test_custom_factory_with_kwargs_and_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    trained = BoxFilterNet(1, np.array([[2, 0], [0, 3]]))
    save_file(trained.state_dict(), tmp_path / "box.safetensors")
    cfg = CustomConfig(
        arch="custom",
        factory="tests.helpers:BoxFilterNet",
        kwargs={"radius": 1, "weight": [[1, 0], [0, 1]]},
        path=str(tmp_path / "box.safetensors"),
        num_classes=2,
        in_channels=2,
        halo=1,
    )
    loaded = load_model(cfg)
    x = torch.randint(0, 9, (1, 2, 20, 20)).float()
    assert torch.equal(_logits(loaded.module, x), _logits(trained, x))
    with pytest.raises(ModelError, match="model.factory: cannot import 'tests.helpers:Nope'"):
        load_model(cfg.model_copy(update={"factory": "tests.helpers:Nope"}))
    with pytest.raises(ModelError, match="model.kwargs: tests.helpers:BoxFilterNet"):
        load_model(cfg.model_copy(update={"kwargs": {"radius": 1}}))


@pytest.mark.parametrize(
    ("factory", "kwargs", "reason"),
    [
        ("os:system", {"command": "touch {marker}"}, "from the Python standard library"),
        ("subprocess:run", {"args": ["touch", "{marker}"]}, "from the Python standard library"),
        ("builtins:exec", {"source": "open('{marker}', 'w')"}, "from the Python standard library"),
        ("torch:load", {"f": "{marker}"}, "from a library this pipeline uses"),
        ("numpy:savetxt", {"fname": "{marker}", "X": [1]}, "a _ArrayFunctionDispatcher; expected an nn.Module"),
        ("scipy.io:savemat", {"file_name": "{marker}", "mdict": {}}, "from a library this pipeline uses"),
        ("tests.helpers:REPO", {}, "expected an nn.Module subclass or a plain Python function"),
        ("tests.helpers:rng", {}, "expected an nn.Module subclass or a plain Python function"),
    ],
)
def test_custom_factory_runs_nothing_but_modules_and_your_functions(tmp_path, factory, kwargs, reason) -> None:
    marker = str(tmp_path / "pwned")
    filled = {k: [x.replace("{marker}", marker) for x in v] if isinstance(v, list) and v and isinstance(v[0], str)
              else (v.replace("{marker}", marker) if isinstance(v, str) else v) for k, v in kwargs.items()}  # fmt: skip
    cfg = CustomConfig(arch="custom", factory=factory, kwargs=filled, num_classes=2, halo=1)
    with pytest.raises(ModelError, match=reason):
        load_model(cfg)
    assert not (tmp_path / "pwned").exists()


def test_custom_factory_may_be_a_function_of_your_own(tmp_path) -> None:
    cfg = CustomConfig(arch="custom", factory="tests.models.test_loading:_my_factory", num_classes=2, halo=1)
    assert load_model(cfg).geometry.halo == 1


def _my_factory() -> torch.nn.Module:
    return BoxFilterNet(1, np.array([[1], [-1]]))


class _StridedResidual(torch.nn.Module):
    """Down by 4 (two stride-2 convolutions), up by 4, plus the input: other sizes raise."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, 2, 1), torch.nn.Conv2d(2, 2, 3, 2, 1))
        self.up = torch.nn.ConvTranspose2d(2, 2, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) + x


@pytest.mark.parametrize(
    ("module", "multiple", "symptom"),
    [
        (lambda: UNet(1, 2, 3, 4, "same"), 8, "output"),  # crops its skips: odd sizes come out smaller
        (_StridedResidual, 4, "fails on a 1 x 1 x"),  # other sizes raise a shape mismatch
    ],
)
def test_a_declared_model_without_its_size_rule_is_told_which_one(tmp_path, module, multiple, symptom) -> None:
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(module().eval()), path)
    with pytest.raises(ModelError) as err:
        load_model(TorchScriptConfig(arch="torchscript", path=str(path), num_classes=2, halo=40))  # probed at 83 px
    message = str(err.value)
    assert symptom in message and "sizes tried: " in message
    assert f"declare size_min: {multiple}, size_step: {multiple} and shift_period: {multiple}" in message
    fixed = TorchScriptConfig(
        arch="torchscript", path=str(path), num_classes=2, halo=40,
        size_min=multiple, size_step=multiple, shift_period=multiple,
    )  # fmt: skip
    assert load_model(fixed).geometry.size_step == multiple  # the advice works
