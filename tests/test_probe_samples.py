"""The halo probe looks at real data too: a reach hidden from random inputs is still found."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import yaml

from pipeline.cli import main


class GatedReach(torch.nn.Module):
    """A 3 x 3 box, plus a branch reaching 20 px down that opens only above 50.

    Random probe inputs (|x| of a few units) never open the branch, so they see a reach of
    1; an image normalised to hundreds does open it, and the reach is 20.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        near = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        far = torch.nn.functional.pad(x, (0, 0, 0, 20))[:, :, 20:, :]
        gate = torch.relu(far - 50.0)
        return torch.cat([near + gate, 0.5 * near], dim=1)


def _workflow(tmp_path, image: np.ndarray, halo: int, normalize: dict) -> str:
    tifffile.imwrite(tmp_path / "img.tif", image)
    torch.jit.save(torch.jit.script(GatedReach()), tmp_path / "gated.pt")
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "img.tif"},
        "model": {"arch": "torchscript", "path": "gated.pt", "num_classes": 2, "halo": halo, "normalize": normalize},
        "tiling": {"tile": 64},
        "output": {"path": "out.zarr"},
    }))  # fmt: skip
    return str(tmp_path / "wf.yaml")


def test_random_inputs_alone_miss_the_gated_reach(tmp_path) -> None:
    from pipeline.models.probe import probe_reach
    from pipeline.tiling import NetworkGeometry

    result = probe_reach(GatedReach(), NetworkGeometry(halo=1), in_channels=1)
    assert result.reach == 1  # why random inputs are not enough


def test_validate_probes_crops_of_the_image(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(100, 200, (150, 170)).astype(np.uint8)  # bright: the branch opens
    path = _workflow(tmp_path, image, halo=1, normalize={"mean": 0.0, "std": 1.0})
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "model.halo: 1 px is declared, but the gradient probe finds" in err
    assert "20 px away (on a crop of the image centred at (75, 85)" in err
    assert "Traceback" not in err

    path = _workflow(tmp_path, image, halo=20, normalize={"mean": 0.0, "std": 1.0})
    assert main(["validate", path]) == 0


@pytest.mark.parametrize("normalize", [{"percentiles": [1, 99]}, {"zscore": True}])
def test_image_statistics_are_estimated_on_the_crops(tmp_path, capsys, normalize) -> None:
    """Normalised to about [0, 1], this image never opens the branch: no false alarm."""
    rng = np.random.default_rng(0)
    image = rng.integers(100, 200, (150, 170)).astype(np.uint8)
    assert main(["validate", _workflow(tmp_path, image, halo=1, normalize=normalize)]) == 0
