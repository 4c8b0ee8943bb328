"""Test helpers: real data paths, fake networks with known outputs, workflow files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline.tiling import NetworkGeometry

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PIPELINE = str(Path(sys.executable).parent / "pipeline")


def pipeline_env() -> dict[str, str]:
    """The environment of a ``pipeline`` subprocess whose workers import the test networks."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_pipeline(*args: str, cwd: Path | str = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """``pipeline ARGS`` as a user runs it, output captured."""
    return subprocess.run([PIPELINE, *args], capture_output=True, text=True, env=pipeline_env(), cwd=cwd, timeout=timeout)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips when absent, except in CI where it must exist."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            raise FileNotFoundError(f"CI=true but the shared data is missing: {path}")
        pytest.skip(f"shared data not present: {path}")
    return path


class BoxFilterNet(nn.Module):
    """A fake network with a known output: integer-weighted box sums of radius ``r``.

    ``logit_k = sum_c weight[k, c] * box_r(x_c)``, computed exactly in float64 (prefix
    sums of integers), zero-padded (``same``) or unpadded (``valid``). Its halo is ``r``.
    """

    def __init__(self, radius: int, weight: np.ndarray, padding: str = "same") -> None:
        super().__init__()
        self.r, self.padding = radius, padding
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.r
        x = x.double()
        if self.padding == "same":
            x = nn.functional.pad(x, (r, r, r, r))
        c = nn.functional.pad(x.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        k = 2 * r + 1
        box = c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]
        return torch.einsum("kc,bchw->bkhw", self.weight, box)

    def geometry(self) -> NetworkGeometry:
        trim = self.r if self.padding == "valid" else 0
        return NetworkGeometry(halo=self.r, trim=trim, size_min=2 * trim + 1, name="box filter")


class BoxFilterNet3D(BoxFilterNet):
    """:class:`BoxFilterNet` in three dimensions: a 3D network (halo ``r`` along z, y and x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.r
        x = x.double()
        if self.padding == "same":
            x = nn.functional.pad(x, (r,) * 6)
        c = nn.functional.pad(x.cumsum(-1).cumsum(-2).cumsum(-3), (1, 0, 1, 0, 1, 0))
        k = 2 * r + 1
        a, b = slice(k, None), slice(None, -k)
        box = (
            c[..., a, a, a] - c[..., b, a, a] - c[..., a, b, a] - c[..., a, a, b]
            + c[..., b, b, a] + c[..., b, a, b] + c[..., a, b, b] - c[..., b, b, b]
        )  # fmt: skip
        return torch.einsum("kc,bcdhw->bkdhw", self.weight, box)

    def geometry(self) -> NetworkGeometry:
        trim = self.r if self.padding == "valid" else 0
        return NetworkGeometry(halo=self.r, trim=trim, size_min=2 * trim + 1, name="3D box filter", dims=3)


def box_filter_reference(image: np.ndarray, radius: int, weight: np.ndarray, mode: str) -> np.ndarray:
    """NumPy whole-image result on the mirror-padded image: int64, no torch involved; a
    ``(C, z, y, x)`` image gets the 3D box (the reference of :class:`BoxFilterNet3D`)."""
    dims = image.ndim - 1
    padded = np.pad(image.astype(np.int64), ((0, 0),) + ((radius, radius),) * dims, mode=mode)
    k = 2 * radius + 1
    axes = tuple(range(1, dims + 1))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k,) * dims, axis=axes)
    box = windows.sum(axis=tuple(range(-dims, 0)))
    return np.einsum("kc,c...->k...", weight.astype(np.int64), box)


def write_workflow(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def empirical_dependency(
    net: nn.Module, size: int, out_index: int, in_channels: int = 1, trials: int = 2
) -> tuple[int, int, int, int]:
    """Rows and columns of the input that output pixel ``(out_index, out_index)`` depends on.

    The gradient probe: the support of d(sum of logits at the pixel)/d(input), united over
    random positive inputs. Call on a net whose weights are positive (so no ReLU is dead)
    and whose max-pooling is replaced by average pooling of the same window (so every
    element of a window passes gradient): both keep the architecture's geometry.
    """
    rows, cols = set(), set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(trials):
        x = torch.rand(1, in_channels, size, size, generator=gen, dtype=torch.float64)
        x.requires_grad_(True)
        y = net(x)
        y[0, :, out_index, out_index].sum().backward()
        support = (x.grad[0].abs().sum(0) > 0).nonzero()
        rows.update(support[:, 0].tolist())
        cols.update(support[:, 1].tolist())
    return min(rows), max(rows), min(cols), max(cols)


def make_probe_ready(net: nn.Module) -> nn.Module:
    """Positive weights, average pooling, float64: see :func:`empirical_dependency`."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.1 + 0.01)
    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(module, child_name, nn.AvgPool2d(child.kernel_size, child.stride))
    return net.double().eval()


class FailOnBright(nn.Module):
    """Raises inside the worker (a long TorchScript trace) where a tile holds a value > 1000."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 1000).any()):
            raise RuntimeError("corrupt tile")
        return torch.cat([x, -x], dim=1)


class KillWorkerOnce(BoxFilterNet):
    """A box filter whose first forward pass on a Dask worker kills that worker (SIGKILL).

    ``marker`` records that the kill happened, so the retried task succeeds: the run must
    survive the loss of its only worker. ``times`` kills that many workers in turn. Outside
    a worker (validate's probes in the driver) it is a plain box filter.
    """

    def __init__(self, marker: str, radius: int, weight: list, times: int = 1) -> None:
        super().__init__(radius, np.asarray(weight))
        self.marker, self.times = marker, times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            from distributed import get_worker

            get_worker()
        except ValueError:
            return super().forward(x)
        marker = Path(self.marker)
        kills = len(marker.read_text()) if marker.exists() else 0
        if kills < self.times:
            marker.write_text("x" * (kills + 1))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


class SlowBoxFilter(BoxFilterNet):
    """A box filter that takes ``seconds`` per forward pass on a Dask worker and logs each.

    ``log`` gets one line per forward pass of a tile run on a worker: an independent count
    of the blocks a run computed (the loader's probe pass, on zeros, is not counted). While the file ``broken_if`` exists, a tile holding a (normalised)
    value >= ``broken_above`` fails with the same error on every try (a block that fails
    deterministically).
    """

    def __init__(
        self,
        radius: int,
        weight: list,
        seconds: float = 0.0,
        log: str | None = None,
        broken_if: str | None = None,
        broken_above: float = 250.0,
    ) -> None:
        super().__init__(radius, np.asarray(weight))
        self.seconds, self.log, self.broken_if, self.broken_above = seconds, log, broken_if, broken_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            from distributed import get_worker

            get_worker()
        except ValueError:
            return super().forward(x)
        if self.broken_if and Path(self.broken_if).exists() and bool((x >= self.broken_above).any()):
            raise RuntimeError(f"corrupt tile: a value of {self.broken_above:g} or more")
        if not bool(x.any()):
            return super().forward(x)
        time.sleep(self.seconds)
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()}\n")
        return super().forward(x)


def on_dask_worker() -> bool:
    """Whether this runs in a Dask task (not in the driver's probes and checks)."""
    try:
        from distributed import get_worker

        get_worker()
    except ValueError:
        return False
    return True


class GatedBoxFilter(BoxFilterNet):
    """A box filter whose forward passes in a Dask task wait until the file ``gate`` exists
    (at most ``timeout`` seconds): a run that provably is still running while a test acts."""

    def __init__(self, radius: int, weight: list, gate: str, timeout: float = 300.0) -> None:
        super().__init__(radius, np.asarray(weight))
        self.gate, self.timeout = gate, timeout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not on_dask_worker():
            return super().forward(x)
        deadline = time.monotonic() + self.timeout
        while not Path(self.gate).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().forward(x)


class ConcurrencyLog(BoxFilterNet):
    """A box filter that sleeps ``seconds`` per forward pass in a Dask task and logs when
    each began and ended (``log``: one ``start end`` line each): how many ran at once."""

    def __init__(self, radius: int, weight: list, log: str, seconds: float = 0.3) -> None:
        super().__init__(radius, np.asarray(weight))
        self.log, self.seconds = log, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            from distributed import get_worker

            get_worker()
        except ValueError:
            return super().forward(x)
        if not bool(x.any()):  # the loader's probe pass on zeros (on the worker too)
            return super().forward(x)
        start = time.time()
        time.sleep(self.seconds)
        out = super().forward(x)
        with open(self.log, "a") as f:
            f.write(f"{start} {time.time()}\n")
        return out


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals that overlap at one time."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    current = best = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def reference_instances(class_ids: np.ndarray, classes, neighbours: int, min_size: int = 0) -> np.ndarray:
    """``scipy.ndimage.label`` of each class on the whole array (classes kept apart, ids
    never shared), objects of fewer than ``min_size`` pixels dropped: what instance labels
    must equal up to a renaming of ids."""
    from scipy import ndimage

    rank = {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}[neighbours]
    footprint = ndimage.generate_binary_structure(class_ids.ndim, rank)
    out = np.zeros(class_ids.shape, np.int64)
    top = 0
    for c in classes:
        found, n = ndimage.label(class_ids == c, structure=footprint)
        sizes = np.bincount(found.ravel(), minlength=n + 1)
        keep = (sizes >= max(min_size, 1)) & (np.arange(n + 1) > 0)
        out = np.where(keep[found], found + top, out)
        top += n
    return out


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images are equal up to a one-to-one renaming of the non-zero ids
    (0, no object, must be 0 in both)."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel().astype(np.uint64), b.ravel().astype(np.uint64)]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
