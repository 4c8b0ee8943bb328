"""The child processes of ``benchmarks.throughput``: one method, or one set-up step, per process.

    python -m benchmarks.throughput_methods METHOD --work DIR [--size N] [--model NAME] ...

Run by ``benchmarks.throughput``, which measures each in a fresh process (wall time, peak
RSS of the process tree); not meant to be run by hand. Every method imports only what it
needs (MONAI's child never imports the pipeline or dask), reads the same tiled TIFF and
loads the same TorchScript file, and writes its labels to a zarr array (or, for the
reference, ``.npy`` files) in the work folder; a small JSON result says what it did.

Set-up steps: ``image`` (the synthetic EM image), ``models`` (TorchScript files and their
geometry), ``matmul`` (this machine's fp32 matmul rate, for the roofline). Methods: ``monai``,
``map_overlap``, ``whole`` (the reference), ``io``. The pipeline itself runs as its own
command (``pipeline run``), started by ``benchmarks.throughput``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "unet": {"arch": "unet", "depth": 4, "width": 16, "padding": "same", "num_classes": 2},
    # 32 channels through the context module (dilations 1, 1, 2, 4, 8, 16, 1): ~150 kFLOP/px
    "dilated": {"arch": "dilated", "front_width": 32, "context_width": 32, "num_classes": 2},
}
MEAN, STD = 128.0, 64.0  # every method normalises (x - MEAN) / STD
SEED = 0
BLOCK = 1024  # map_overlap chunks, the I/O floor's blocks, every zarr output's chunks
MONAI_ROI = (512, 512)
MONAI_OVERLAP = 0.25
MEMORY_FACTOR = 2.0  # measured peak of a whole forward is 1.4-1.6x the model's activation estimate
FALLBACK_ACTIVATION_BYTES = 600.0  # per input pixel, where the pipeline gives no estimate
STRIP_BYTES = 4 << 30  # per strip of the fallback reference: keeps each map well under 2 GiB
SLOW_TENSOR_BYTES = 1 << 31  # a single CPU activation this large falls to a slow kernel (DESIGN.md)


# -- paths shared with benchmarks.throughput ------------------------------------------------


def image_path(work: Path, size: int) -> Path:
    return work / f"size-{size}" / "image.tif"


def model_path(work: Path, name: str) -> Path:
    return work / f"model-{name}.pt"


def meta_path(work: Path, name: str) -> Path:
    return work / f"model-{name}.json"


def labels_path(work: Path, size: int, name: str, method: str) -> Path:
    return work / f"size-{size}" / f"{method}-{name}.zarr"


def reference_paths(work: Path, size: int, name: str) -> tuple[Path, Path]:
    """Reference labels (uint8) and top-1 minus top-2 logit margin (float32), ``.npy``."""
    folder = work / f"size-{size}"
    return folder / f"reference-{name}-labels.npy", folder / f"reference-{name}-margin.npy"


# -- set-up steps -----------------------------------------------------------------------------


def make_image(work: Path, size: int) -> dict[str, Any]:
    """The synthetic EM image, written as the demo writes it (tiled TIFF, 256 px tiles, zlib)."""
    import tifffile

    from pipeline.demo import TIFF_TILE, make_demo_image

    path = image_path(work, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image, _ = make_demo_image(size, seed=SEED)
    tifffile.imwrite(path, image, tile=TIFF_TILE, compression="zlib")
    return {"path": str(path), "shape": list(image.shape), "bytes": path.stat().st_size}


def make_models(work: Path, names: list[str]) -> dict[str, Any]:
    """One TorchScript file per model, and its geometry, FLOPs and initialisation, as JSON."""
    return {name: _make_model(work, name) for name in names}


def _make_model(work: Path, name: str) -> dict[str, Any]:
    import torch

    from pipeline.config import DilatedConfig, UNetConfig
    from pipeline.models.loading import load_model

    raw = MODELS[name]
    cfg = (UNetConfig if raw["arch"] == "unet" else DilatedConfig).model_validate(raw)
    loaded = load_model(cfg)
    module = loaded.module
    balance = _reinit(module, raw["arch"])
    geo = loaded.geometry
    context = block_context(geo.halo, geo.size_min, geo.size_step)
    scripted = torch.jit.script(module)
    torch.jit.save(scripted, str(model_path(work, name)))
    _check_saved(module, model_path(work, name), geo.size_step)
    tile = BLOCK + 2 * context
    live, largest = _bytes_per_pixel(scripted, tile)
    meta = {
        "name": name,
        "config": raw,
        "path": str(model_path(work, name)),
        "halo": geo.halo,
        "shift_period": geo.shift_period,
        "size_min": geo.size_min,
        "size_step": geo.size_step,
        "context": context,
        "activation_bytes_per_pixel": live,
        "largest_bytes_per_pixel": largest,
        "flops_per_pixel": _flops(module, tile) / tile**2,
        "flops_tile": tile,
        "class_1_fraction": balance,
        "init": INIT_RECIPE[raw["arch"]],
    }
    meta_path(work, name).write_text(json.dumps(meta, indent=2))
    return meta


def block_context(halo: int, size_min: int, size_step: int) -> int:
    """Smallest context >= ``halo`` that makes ``BLOCK + 2 * context`` a legal input size
    (``size_min + n * size_step``): the pipeline's context for 1024 px tiles (112 for the
    depth-4 U-Net, whose halo is 107), and the depth a ``map_overlap`` user would choose."""
    context = halo
    while BLOCK + 2 * context < size_min or (BLOCK + 2 * context - size_min) % size_step:
        context += 1
    return context


INIT_RECIPE = {
    "unet": "seed 0; every conv kaiming-normal (ReLU gain), zero bias; last bias re-centred",
    "dilated": (
        "seed 0; front convs kaiming-normal (ReLU gain), zero bias, +3 on the front's score "
        "bias (scores enter the context module's ReLUs positive, not clipped to exact ties); "
        "context module: the paper's identity init; last bias re-centred"
    ),
}


def _reinit(module: Any, arch: str) -> float:
    """Fixed-seed weights whose logits vary with the image and split it about evenly.

    The built-in untrained weights give nearly constant logits (one class almost everywhere,
    margins ~0.05), which would make label agreement meaningless. The last convolution's
    bias is then re-centred so the median logit difference on a demo crop is zero.
    Returns the fraction of class 1 on that crop.
    """
    import numpy as np
    import torch
    from torch import nn

    from pipeline.demo import make_demo_image

    torch.manual_seed(SEED)
    scope = module if arch == "unet" else module.front
    convs = [m for m in scope.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(_bias(conv))
        if arch != "unet":
            _bias(convs[-1]).add_(3.0)
        last = _bias([m for m in module.modules() if isinstance(m, nn.Conv2d)][-1])
        crop, _ = make_demo_image(512, seed=SEED + 1)
        x = torch.from_numpy((crop.astype(np.float32) - MEAN) / STD)[None, None]
        y = module(x)
        shift = float((y[:, 1] - y[:, 0]).median())
        last[1] -= shift / 2
        last[0] += shift / 2
        return float((module(x).argmax(1) == 1).float().mean())


def _bytes_per_pixel(module: Any, edge: int) -> tuple[float, float]:
    """The model's live tensors, and its largest single tensor, per input pixel of one pass
    (pipeline.models.footprint)."""
    from pipeline.models.footprint import FootprintProbe

    usage = FootprintProbe(module, 1, edge, channels_last=False)(1, edge)
    if usage is None:
        return FALLBACK_ACTIVATION_BYTES, FALLBACK_ACTIVATION_BYTES
    return usage.live / edge**2, usage.largest / edge**2


def _bias(conv: Any) -> Any:
    """A convolution's bias (every convolution of the built-in networks has one)."""
    if conv.bias is None:
        raise SystemExit(f"error: {conv} has no bias to initialise")
    return conv.bias


def _check_saved(module: Any, path: Path, step: int) -> None:
    """The saved file must compute what the module computes, at sizes other than one."""
    import torch

    loaded = torch.jit.load(str(path))
    for h, w in ((16 * step, 20 * step), (21 * step, 17 * step)):
        x = torch.randn(1, 1, h, w)
        with torch.no_grad():
            if not torch.allclose(loaded(x), module(x), atol=1e-5):
                raise SystemExit(f"error: {path} differs from its module at {h} x {w}")


def _flops(module: Any, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.zeros(1, 1, size, size))
    return float(counter.get_total_flops())


def matmul_rate(n: int = 4096, repeats: int = 3) -> dict[str, Any]:
    """fp32 GFLOP/s of ``torch.mm`` on n x n matrices, torch threads = all cores (best of runs)."""
    import torch

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {"n": n, "threads": threads, "seconds": best, "gflops": 2 * n**3 / best / 1e9}


# -- methods ------------------------------------------------------------------------------------


def run_monai(work: Path, size: int, name: str) -> dict[str, Any]:
    """MONAI's sliding window on the whole image in memory: roi 512, overlap 0.25, gaussian."""
    import numpy as np
    import tifffile
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    image = tifffile.imread(image_path(work, size))
    model = torch.jit.load(str(model_path(work, name))).eval()
    start = time.perf_counter()
    x = torch.from_numpy((image.astype(np.float32) - MEAN) / STD)[None, None]
    with torch.no_grad():
        logits: Any = sliding_window_inference(
            x, roi_size=MONAI_ROI, sw_batch_size=1, predictor=model,
            overlap=MONAI_OVERLAP, mode="gaussian",
        )  # fmt: skip
    labels = logits.argmax(1)[0].to(torch.uint8).numpy()
    zarr.create_array(
        str(labels_path(work, size, name, "monai")),
        data=labels,
        chunks=(BLOCK, BLOCK),
        overwrite=True,
    )
    return {"core_seconds": time.perf_counter() - start}


def run_map_overlap(work: Path, size: int, name: str) -> dict[str, Any]:
    """What a Dask user writes: map_overlap over 1024 px chunks, threaded scheduler, to_zarr."""
    import dask.array as da
    import numpy as np
    import tifffile
    import torch

    depth = _meta(work, name)["context"]
    model = torch.jit.load(str(model_path(work, name))).eval()

    def predict(block: np.ndarray) -> np.ndarray:
        x = torch.from_numpy((block.astype(np.float32) - MEAN) / STD)[None, None]
        with torch.no_grad():
            return model(x).argmax(1)[0].numpy().astype(np.uint8)

    start = time.perf_counter()
    image = da.from_zarr(
        tifffile.imread(image_path(work, size), aszarr=True), chunks=(BLOCK, BLOCK)
    )
    labels = image.map_overlap(predict, depth=depth, boundary="reflect", dtype=np.uint8)
    labels.to_zarr(str(labels_path(work, size, name, "map_overlap")), overwrite=True)
    return {"core_seconds": time.perf_counter() - start, "depth": depth}


def run_io(work: Path, size: int) -> dict[str, Any]:
    """The I/O floor: read the image in 1024 px blocks, write a uint8 zarr like it (threads)."""
    import dask.array as da
    import tifffile

    start = time.perf_counter()
    image = da.from_zarr(
        tifffile.imread(image_path(work, size), aszarr=True), chunks=(BLOCK, BLOCK)
    )
    image.to_zarr(str(labels_path(work, size, "copy", "io")), overwrite=True)
    return {"core_seconds": time.perf_counter() - start}


def run_whole(work: Path, size: int, name: str, force_strips: bool = False) -> dict[str, Any]:
    """The reference: one forward pass on the symmetric-padded image, cropped, top-2.

    Falls back to strips (exact: each strip has the full context above and below and starts
    at a multiple of the shift period) when the whole pass would not fit in the memory
    available, or its allocation fails.
    """
    import numpy as np
    import tifffile
    import torch

    meta = _meta(work, name)
    image = tifffile.imread(image_path(work, size))
    model = torch.jit.load(str(model_path(work, name))).eval()
    start = time.perf_counter()
    x, crop = _padded(image, meta["context"], _step(meta))
    del image
    result: dict[str, Any] = {"mode": "whole"}
    need = x.size * meta["activation_bytes_per_pixel"] * MEMORY_FACTOR
    largest = x.size * meta["largest_bytes_per_pixel"]
    available = _available_bytes()
    result["estimated_bytes"], result["available_bytes"] = need, available
    out = None
    if force_strips:
        result["reason"] = "forced"
    elif need > 0.85 * available:
        result["reason"] = f"needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
    elif largest >= SLOW_TENSOR_BYTES:
        result["reason"] = f"one activation of {largest / 2**30:.1f} GiB (slow CPU kernel from 2 GiB)"
    else:
        try:
            with _address_space_limit(available):
                out = _forward_whole(model, x, crop)
        except (RuntimeError, MemoryError) as exc:
            if "alloc" not in str(exc).lower() and not isinstance(exc, MemoryError):
                raise
            lines = [ln for ln in str(exc).splitlines() if "alloc" in ln.lower()] or ["?"]
            result["reason"] = f"allocation failed: {lines[-1].strip()[:160]}"
    if out is None:
        result["mode"] = "strips"
        out, result["strip_rows"] = _forward_strips(model, x, crop, meta)
    labels, margin = out
    labels_file, margin_file = reference_paths(work, size, name)
    np.save(labels_file, labels)
    np.save(margin_file, margin)
    result["core_seconds"] = time.perf_counter() - start
    return result


def _forward_whole(model: Any, x: Any, crop: tuple[int, int, int]) -> tuple[Any, Any]:
    import torch

    c, h, w = crop
    with torch.no_grad():
        logits = model(torch.from_numpy(x)[None, None])[0, :, c : c + h, c : c + w]
        return _top2(logits)


def _forward_strips(
    model: Any, x: Any, crop: tuple[int, int, int], meta: dict
) -> tuple[tuple[Any, Any], int]:
    """Row strips of the padded image: rows ``[y0, y0 + rows)`` of the image from an input of
    ``rows + 2 * context`` (rounded up to a legal size) cut from the same padded image."""
    import numpy as np
    import torch

    c, h, w = crop
    step = _step(meta)
    per_row = x.shape[1] * meta["activation_bytes_per_pixel"] * MEMORY_FACTOR
    budget = min(STRIP_BYTES, 0.5 * _available_bytes())
    rows = min(
        int(budget // per_row),
        int(0.9 * SLOW_TENSOR_BYTES // (x.shape[1] * meta["largest_bytes_per_pixel"])),
    )
    rows = max(step, (rows - 2 * c) // step * step)
    labels = np.empty((h, w), np.uint8)
    margin = np.empty((h, w), np.float32)
    with torch.no_grad():
        for y0 in range(0, h, rows):
            n = min(rows, h - y0)
            span = -(-(n + 2 * c) // step) * step
            logits = model(torch.from_numpy(np.ascontiguousarray(x[y0 : y0 + span]))[None, None])
            labels[y0 : y0 + n], margin[y0 : y0 + n] = _top2(logits[0, :, c : c + n, c : c + w])
    return (labels, margin), rows


def _top2(logits: Any) -> tuple[Any, Any]:
    import torch

    values, indices = torch.topk(logits, 2, dim=0)
    return indices[0].to(torch.uint8).numpy(), (values[0] - values[1]).numpy()


def _padded(image: Any, context: int, step: int) -> tuple[Any, tuple[int, int, int]]:
    """``(x - MEAN) / STD`` padded by ``context`` (numpy 'symmetric'), each axis then grown at
    its end to a legal input size; the image sits at ``[context : context + n]``."""
    import numpy as np

    pads = [(context, -(-(n + 2 * context) // step) * step - n - context) for n in image.shape]
    x = np.pad((image.astype(np.float32) - MEAN) / STD, pads, mode="symmetric")
    return x, (context, *image.shape)


def _step(meta: dict) -> int:
    """Strip origins and input sizes: multiples of the shift period and the input size step."""
    return math.lcm(meta["shift_period"], meta["size_step"])


def _available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class _address_space_limit:
    """Cap this process's address space for the whole pass, so an allocation that cannot be
    served fails here (an exception) instead of waking the kernel's OOM killer, which may
    pick another process on a shared machine."""

    def __init__(self, available: int) -> None:
        import resource

        import psutil

        self.resource = resource
        self.old = resource.getrlimit(resource.RLIMIT_AS)
        self.new = psutil.Process().memory_info().vms + int(0.9 * available)

    def __enter__(self) -> None:
        hard = self.old[1]
        limit = self.new if hard == self.resource.RLIM_INFINITY else min(self.new, hard)
        self.resource.setrlimit(self.resource.RLIMIT_AS, (limit, hard))

    def __exit__(self, *exc: object) -> None:
        self.resource.setrlimit(self.resource.RLIMIT_AS, self.old)


def _meta(work: Path, name: str) -> dict[str, Any]:
    return json.loads(meta_path(work, name).read_text())


# -- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "step", choices=["image", "models", "matmul", "monai", "map_overlap", "whole", "io"]
    )
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--model", action="append", default=[], help="model name (repeatable)")
    parser.add_argument(
        "--strips", action="store_true", help="whole: compute the reference in strips"
    )
    parser.add_argument(
        "--result", type=Path, default=None, help="write the step's JSON result here"
    )
    args = parser.parse_args(argv)
    name = args.model[0] if args.model else ""
    steps = {
        "image": lambda: make_image(args.work, args.size),
        "models": lambda: make_models(args.work, args.model),
        "matmul": matmul_rate,
        "monai": lambda: run_monai(args.work, args.size, name),
        "map_overlap": lambda: run_map_overlap(args.work, args.size, name),
        "whole": lambda: run_whole(args.work, args.size, name, args.strips),
        "io": lambda: run_io(args.work, args.size),
    }
    result = steps[args.step]()
    text = json.dumps(result, indent=2)
    if args.result:
        args.result.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

