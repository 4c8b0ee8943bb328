"""Forward passes the way a CPU worker runs them: allocator settings, tile sizes, core splits.

    python -m benchmarks.worker_passes [--repeats 2] [--passes 3] [--json FILE] [--out docs/benchmarks.md]

Each measurement is a fresh process (the C library reads its allocator settings when the
process starts) running what one worker runs: ``slots`` Dask-like threads (not the main
thread: glibc gives each its own arena), each doing a warm-up pass and ``--passes`` timed
forward passes of one tile at once, with ``torch_threads`` each. Reported: MPx/s of the
write boxes (the tile less its context: the halo's cost included), minor page faults per
pass, peak RSS, and the model's live tensors per pass (counted as ``tile: auto`` counts them).
Measurements run in alternation (every configuration once per repeat) on an otherwise idle
machine. Three questions, each a table:

1. allocator: glibc's defaults (what distributed's nanny sets) vs ``cluster.allocator: tuned``
   (pipeline/cluster/environment.py), and the tuned thresholds without ``arena_max=1``;
2. tile size: throughput per image pixel against the read box (what CPU_PASS_LIMIT is from);
3. core split: two passes with one torch thread each vs one pass with two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from benchmarks.measure import command_line, facts_line, machine_facts, replace_section, write_json

MODELS: dict[str, dict[str, Any]] = {
    "unet": {"arch": "unet", "depth": 4, "width": 16, "num_classes": 2},
    "dilated": {"arch": "dilated", "front_width": 32, "context_width": 32, "num_classes": 2},
}
CONTEXT = {"unet": 112, "dilated": 35}
SIZES = {"unet": (736, 1248, 1760, 2272), "dilated": (582, 1094, 1606, 2118)}
KEEP = str(2**32 - 1)
ALLOCATORS = {
    "system": {"MALLOC_TRIM_THRESHOLD_": "65536"},  # distributed.nanny.pre-spawn-environ
    "thresholds only": {
        "GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={KEEP}:glibc.malloc.trim_threshold={KEEP}",
        "MALLOC_TRIM_THRESHOLD_": KEEP,
    },
    "tuned": None,  # pipeline.cluster.environment.allocator_environment()
}


def child(name: str, size: int, slots: int, torch_threads: int, passes: int) -> dict[str, Any]:
    """In the measured process: ``slots`` threads, one tile each, ``passes`` timed passes."""
    import torch

    from pipeline.config import DilatedConfig, UNetConfig
    from pipeline.models.footprint import FootprintProbe
    from pipeline.models.loading import load_model
    from pipeline.runtime import Runtime, forward, prepare_module

    torch.set_num_threads(torch_threads)
    raw = MODELS[name]
    cfg = (UNetConfig if raw["arch"] == "unet" else DilatedConfig).model_validate(raw)
    runtime = Runtime(channels_last=True)
    module = prepare_module(load_model(cfg).module, runtime)
    x = torch.rand(1, 1, size, size).numpy()
    barrier = threading.Barrier(slots + 1)

    def work() -> None:
        forward(module, x, runtime)
        barrier.wait()
        for _ in range(passes):
            forward(module, x, runtime)
        barrier.wait()

    threads = [threading.Thread(target=work) for _ in range(slots)]
    for t in threads:
        t.start()
    barrier.wait()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    barrier.wait()
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    for t in threads:
        t.join()
    write = (size - 2 * CONTEXT[name]) ** 2
    usage = FootprintProbe(module, 1, 256)(1, size)
    return {
        "mpx_per_s": slots * passes * write / seconds / 1e6,
        "page_faults_per_pass": faults / (slots * passes),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "live_bytes_per_pass": usage.live if usage else None,
    }


def configurations(cores: int) -> list[dict[str, Any]]:
    """Every (question, model, size, slots, torch threads, allocator) measured."""
    found = []
    for name, sizes in SIZES.items():
        best = sizes[1]  # the pipeline's tile on 2 cores (1024 px write box and its context)
        for allocator in ALLOCATORS:
            found.append({"table": "allocator", "model": name, "size": best, "slots": cores, "threads": 1, "allocator": allocator})
        for size in sizes:
            if size != best:
                found.append({"table": "size", "model": name, "size": size, "slots": cores, "threads": 1, "allocator": "tuned"})
        found.append({"table": "split", "model": name, "size": best, "slots": 1, "threads": cores, "allocator": "tuned"})
    return found


def measure(repeats: int, passes: int) -> list[dict[str, Any]]:
    from pipeline.cluster.environment import allocator_environment

    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_")}
    results = []
    configs = configurations(cores)
    for config in configs:
        config["runs"] = []
    for _ in range(repeats):
        for config in configs:
            extra = ALLOCATORS[config["allocator"]] or allocator_environment()
            argv = ["--child", config["model"], str(config["size"]), str(config["slots"]), str(config["threads"])]
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.worker_passes", *argv, "--passes", str(passes)],
                env={**base, **extra}, capture_output=True, text=True, check=True,
            )  # fmt: skip
            config["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(_line(config), file=sys.stderr, flush=True)
    for config in configs:
        runs = config["runs"]
        results.append({**config, **{k: statistics.median(r[k] for r in runs) for k in runs[0] if runs[0][k] is not None}})
    return results


def _line(config: dict[str, Any]) -> str:
    last = config["runs"][-1]
    return (
        f"{config['model']} {config['size']} px {config['slots']}x{config['threads']} "
        f"{config['allocator']}: {last['mpx_per_s']:.3f} MPx/s"
    )


def markdown(results: list[dict[str, Any]], facts: dict[str, Any], command: str) -> str:
    def rate(r: dict[str, Any]) -> str:
        runs = ", ".join(f"{x['mpx_per_s']:.2f}" for x in r["runs"])
        return f"{r['mpx_per_s']:.2f} ({runs})"

    lines = [
        "## Forward passes as a CPU worker runs them",
        "",
        f"Reproduce: `{command}`",
        "",
        facts_line(facts),
        "Write-box MPx/s (the tile less its context, so the halo's cost counts), median of the",
        "repeats with each repeat in brackets; every configuration a fresh process, in alternation.",
        "",
        "Allocator (two passes at once, one torch thread each, the pipeline's tile):",
        "",
        "| model (read box) | allocator | MPx/s | page faults per pass | peak RSS |",
        "|---|---|---:|---:|---:|",
    ]
    for r in (r for r in results if r["table"] == "allocator"):
        lines.append(
            f"| {r['model']} ({r['size']} px) | {r['allocator']} | {rate(r)} | "
            f"{r['page_faults_per_pass']:,.0f} | {r['peak_rss'] / 2**30:.2f} GiB |"
        )
    lines += ["", "Tile size (tuned allocator, two passes at once):", "",
              "| model | read box | live tensors per pass | MPx/s | peak RSS |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    sized = [r for r in results if r["table"] == "size" or (r["table"] == "allocator" and r["allocator"] == "tuned")]
    for r in sorted(sized, key=lambda r: (r["model"], r["size"])):
        lines.append(
            f"| {r['model']} | {r['size']} px | {r.get('live_bytes_per_pass', 0) / 2**20:.0f} MiB | "
            f"{rate(r)} | {r['peak_rss'] / 2**30:.2f} GiB |"
        )
    lines += ["", "Core split (tuned allocator, the pipeline's tile):", "",
              "| model | passes at once x torch threads | MPx/s |", "|---|---|---:|"]  # fmt: skip
    for r in results:
        if r["table"] == "split" or (r["table"] == "allocator" and r["allocator"] == "tuned"):
            lines.append(f"| {r['model']} | {r['slots']} x {r['threads']} | {rate(r)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default="docs/benchmarks/worker_passes.json")
    parser.add_argument("--out", default=None, help="put the Markdown section in this file")
    args = parser.parse_args(argv)
    if args.child:
        name, size, slots, threads = args.child[0], *map(int, args.child[1:4])
        print(json.dumps(child(name, size, slots, threads, args.passes)))
        return 0
    facts = machine_facts()
    results = measure(args.repeats, args.passes)
    write_json(args.json, {"facts": facts, "results": results})
    command = command_line("benchmarks.worker_passes", [a for a in (argv or sys.argv[1:])])
    text = markdown(results, facts, command)
    if args.out:
        replace_section(args.out, "worker-passes", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
