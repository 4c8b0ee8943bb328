"""Allocator settings in a worker's environment: one tile's forward pass, with and without.

    python -m benchmarks.allocator [--repeats 2] [--out docs/benchmarks-allocator.json]

Each measurement is a fresh process (the C library reads its allocator settings at start),
run in alternation (baseline, tuned, baseline, tuned, ...) on an otherwise idle machine:
one warm-up pass, then timed passes with one torch thread, the way a worker runs. The
baseline environment is what distributed gives its workers (``MALLOC_TRIM_THRESHOLD_=65536``);
the tuned one raises glibc's mmap and trim thresholds (``TUNED``), as DESIGN.md's "Facts"
suggest: the candidate default for every worker's environment.
Reported: seconds per pass, MPx/s of the write box, minor page faults per pass, and the
speed-up of tuned over baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = {
    "unet-w16-d4": ({"arch": "unet", "depth": 4, "width": 16, "num_classes": 2}, 1248),
    "dilated-fw32": ({"arch": "dilated", "front_width": 32, "num_classes": 2}, 1094),
}
BASELINE = {"MALLOC_TRIM_THRESHOLD_": "65536"}  # distributed.nanny.pre-spawn-environ
KEEP = str(2**32 - 1)
TUNED = {
    "GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={KEEP}:glibc.malloc.trim_threshold={KEEP}",
    "MALLOC_TRIM_THRESHOLD_": KEEP,  # else distributed's 65536 may win over the tunable
}


def child(name: str, passes: int) -> dict:
    import torch

    from pipeline.config import DilatedConfig, UNetConfig
    from pipeline.models.loading import load_model
    from pipeline.runtime import Runtime, forward, prepare_module

    torch.set_num_threads(1)
    raw, size = MODELS[name]
    cfg = (UNetConfig if raw["arch"] == "unet" else DilatedConfig).model_validate(raw)
    loaded = load_model(cfg)
    runtime = Runtime()
    module = prepare_module(loaded.module, runtime)
    batch = torch.rand(1, 1, size, size).numpy()
    forward(module, batch, runtime)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(passes):
        forward(module, batch, runtime)
    seconds = (time.perf_counter() - start) / passes
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / passes
    write = size - 2 * loaded.geometry.halo
    return {"seconds": seconds, "mpx_per_s": write * write / seconds / 1e6, "page_faults": faults}


def measure(repeats: int, passes: int) -> dict:
    tuned_env = {**BASELINE, **TUNED}
    results: dict[str, dict[str, list[dict]]] = {}
    for name in MODELS:
        results[name] = {"baseline": [], "tuned": []}
        for _ in range(repeats):
            for variant, extra in (("baseline", BASELINE), ("tuned", tuned_env)):
                env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_")}
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.allocator", "--child", name, "--passes", str(passes)],
                    env={**env, **extra}, capture_output=True, text=True, check=True,
                )  # fmt: skip
                results[name][variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"environment": tuned_env, "results": results}


def markdown(report: dict) -> str:
    lines = [
        "| model (tile) | baseline s/pass | tuned s/pass | speed-up | page faults per pass (baseline -> tuned) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in report["results"].items():
        base = statistics.median(r["seconds"] for r in runs["baseline"])
        tuned = statistics.median(r["seconds"] for r in runs["tuned"])
        faults = (statistics.median(r["page_faults"] for r in runs[v]) for v in ("baseline", "tuned"))
        lines.append(
            f"| {name} ({MODELS[name][1]} px) | {base:.3f} | {tuned:.3f} | {base / tuned:.2f} | "
            f"{' -> '.join(f'{f:,.0f}' for f in faults)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.passes)))
        return 0
    report = measure(args.repeats, args.passes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
