"""Memory and time per pixel of ``pipeline run`` against image size (0.06 to 4 gigapixels).

    python -m benchmarks.scaling [--sizes 8192 16384 32768 65536] [--chunk 1024]
        [--json docs/benchmarks/scaling.json] [--plot PNG] [--out docs/benchmarks.md]
        [--work DIR] [--keep]

For each size, a synthetic uint8 image is written as a compressed zarr array chunk by chunk
(a sum of sines of the coordinates plus seeded noise per chunk: never held in memory), then
the whole ``pipeline run workflow.yaml`` command runs on it in a fresh process with a cheap
model (the built-in U-Net of depth 1 and width 4), measured from outside: wall seconds and
the peak resident memory of its process tree (driver, scheduler, nannies, workers; sampled
every ~50 ms). ``run.json`` gives the predict phase and, where the pipeline records it, the
time spent building and submitting its tasks (``timings.submit``). Reported per size: blocks,
seconds, predict seconds, seconds per MPx, peak RSS, and each as a ratio to the smallest size
(targets: peak RSS at most 20 % and predict time per pixel at most 15 % above the smallest
size's: memory and time per pixel independent of image size). Inputs and outputs
are deleted after each size unless ``--keep``. ``--out FILE`` replaces the section between
``<!-- scaling:start -->`` and ``<!-- scaling:end -->`` in FILE (appending it if absent).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.measure import (
    GiB,
    command_line,
    cores,
    facts_line,
    fmt_bytes,
    fmt_ratio,
    machine_facts,
    package_version,
    pipeline_plan,
    pyplot,
    python,
    replace_section,
    run_measured,
    size_axis,
    write_json,
)

MODEL = {
    "arch": "unet",
    "depth": 1,
    "width": 4,
    "num_classes": 2,
    "normalize": {"mean": 128.0, "std": 64.0},
}
RSS_TARGET = 0.20  # peak RSS within 20 % of the smallest size's
TIME_TARGET = 0.15  # predict seconds per pixel within 15 % of the smallest size's
MARKER = "scaling"


# -- input --------------------------------------------------------------------------------------


def write_input(path: Path, size: int, chunk: int) -> float:
    """A ``size x size`` uint8 zarr array written chunk by chunk; returns the seconds it took."""
    import zarr

    start = time.perf_counter()
    array = zarr.create_array(
        store=str(path), shape=(size, size), chunks=(chunk, chunk), dtype="uint8", overwrite=True
    )
    n = -(-size // chunk)
    corners = [(iy * chunk, ix * chunk) for iy in range(n) for ix in range(n)]

    def write(corner: tuple[int, int]) -> None:
        y0, x0 = corner
        block = pattern(y0, x0, min(chunk, size - y0), min(chunk, size - x0), size)
        array[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]] = block

    with ThreadPoolExecutor(cores()) as pool:
        for _ in pool.map(write, corners):
            pass
    return time.perf_counter() - start


def pattern(y0: int, x0: int, h: int, w: int, size: int) -> np.ndarray:
    """Cheap deterministic texture: sines of the coordinates plus noise seeded by the corner."""
    y = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    x = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    value = 128 + 40 * np.sin(x / 37.0) + 40 * np.sin(y / 53.0) + 20 * np.sin((x + y) / 101.0)
    rng = np.random.default_rng([size, y0, x0])
    value += rng.integers(-12, 13, size=(h, w), dtype=np.int16)
    return np.clip(value, 0, 255).astype(np.uint8)


def disk_needs(sizes: list[int], keep: bool) -> int:
    """Upper bound of the bytes on disk at once: uncompressed input and labels (uint8)."""
    per_size = [2 * s * s for s in sizes]
    return sum(per_size) if keep else max(per_size)


def df_line(folder: Path) -> str:
    """``df -h`` of the work folder's file system (what is free there now)."""
    try:
        out = subprocess.run(["df", "-h", str(folder)], capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError):
        return "df: unavailable"


# -- one size -------------------------------------------------------------------------------------


def run_size(
    work: Path, size: int, chunk: int, tile: str, timeout: float, keep: bool
) -> dict[str, Any]:
    """Write the input, run the pipeline on it (measured), read its run.json, clean up."""
    folder = work / f"size-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "image.zarr"
    seconds_input = write_input(image, size, chunk)
    workflow = folder / "workflow.yaml"
    workflow.write_text(yaml.safe_dump(_workflow(tile), sort_keys=False))
    script = Path(python()).parent / "pipeline"
    cmd = (
        [str(script), "run", str(workflow)]
        if script.exists()
        else [python(), "-m", "pipeline", "run", str(workflow)]
    )
    m = run_measured(cmd, cwd=folder, log=folder / "pipeline.log", timeout=timeout)
    record: dict[str, Any] = {
        "size": size,
        "megapixels": size * size / 1e6,
        "input_seconds": round(seconds_input, 2),
        "input_bytes": _tree_bytes(image),
        "seconds": round(m.seconds, 3),
        "peak_rss_bytes": m.peak_rss_bytes,
        "returncode": m.returncode,
    }
    if m.ok:
        record |= _run_json(folder / "labels.run.json")
        plan = pipeline_plan(folder / "labels.zarr")
        record["tile"] = plan.get("tile", [None])[0]
        record["context"] = plan.get("context")
    else:
        record["error"] = (
            m.output_tail.splitlines()[-1] if m.output_tail else f"exit {m.returncode}"
        )
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return record


def _workflow(tile: str = "auto") -> dict[str, Any]:
    return {
        "input": {"path": "image.zarr"},
        "model": MODEL,
        "tiling": {"tile": tile if tile == "auto" else int(tile), "mirror": "symmetric"},
        "output": {"path": "labels.zarr", "overwrite": True},
    }


def _run_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    timings = doc.get("timings") or {}
    return {
        "blocks": (doc.get("blocks") or {}).get("total"),
        "tiles": doc.get("tiles"),
        "predict_seconds": timings.get("predict"),
        "submit_seconds": timings.get("submit"),
        "timings": timings,
        "cluster": (doc.get("cluster") or {}).get("description"),
    }


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- summary and report ---------------------------------------------------------------------------


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seconds per MPx, and every figure as a ratio to the smallest size that ran."""
    ok = [r for r in records if r["returncode"] == 0]
    for r in ok:
        r["s_per_mpx"] = r["seconds"] / r["megapixels"]
        predict = r.get("predict_seconds")
        r["predict_s_per_mpx"] = predict / r["megapixels"] if predict else None
    if not ok:
        return records
    base = min(ok, key=lambda r: r["size"])
    for r in ok:
        r["ratios"] = {
            key: (r[key] / base[key] if r.get(key) and base.get(key) else None)
            for key in (
                "seconds",
                "predict_seconds",
                "s_per_mpx",
                "predict_s_per_mpx",
                "peak_rss_bytes",
            )
        }
        rss, tpp = r["ratios"]["peak_rss_bytes"], r["ratios"]["predict_s_per_mpx"]
        # Growth is what the targets guard against: a ratio below 1 (fixed costs amortised over
        # more pixels) passes.
        r["rss_within_target"] = rss is not None and rss <= 1 + RSS_TARGET
        r["time_within_target"] = tpp is not None and tpp <= 1 + TIME_TARGET
    return records


def _noop(index: tuple[int, ...], spec: Any = None) -> tuple[int, ...]:
    return index


def graph_build(counts: tuple[int, ...] = (1_000, 10_000, 100_000)) -> list[dict[str, Any]]:
    """The driver's side of the task graph, at block counts beyond the sizes above: the plan's
    blocks listed (as the runner lists them), then one task per block plus the shared spec
    submitted to a real scheduler (as ``execute_blocks`` submits them), until the scheduler
    holds them all. The tasks do nothing: only building and submitting is timed."""
    import math

    from distributed import Client, LocalCluster

    from pipeline.tiling import NetworkGeometry, plan_tiles

    rows = []
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        for count in counts:
            side = math.isqrt(count) * 64
            start = time.perf_counter()
            plan = plan_tiles((side, side), NetworkGeometry(halo=8), tile=64, mirror="reflect")
            todo = plan.block_indices()
            keys = [f"predict-bench-{'-'.join(map(str, i))}" for i in todo]
            listed = time.perf_counter()
            shared = client.submit(lambda p: p, plan, key=f"spec-{count}", pure=False)
            futures = client.map(_noop, todo, spec=shared, key=keys, pure=False)
            while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) < len(todo):
                time.sleep(0.01)
            submitted = time.perf_counter()
            client.cancel([*futures, shared], force=True)
            del futures, shared
            while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
                time.sleep(0.05)
            rows.append({
                "blocks": len(todo),
                "list_seconds": listed - start,
                "submit_seconds": submitted - listed,
                "per_10000_blocks": (submitted - start) / len(todo) * 10_000,
            })  # fmt: skip
    return rows


def markdown(report: dict[str, Any], plot: str | None) -> str:
    """The section: command, machine, settings, one table over the sizes."""
    lines = [
        "## Memory and time per pixel against image size",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        facts_line(report["machine"]),
        "",
        f"`pipeline run` (the whole command, a fresh process with the benchmark's environment) on "
        f"synthetic uint8 zarr inputs ({report['settings']['chunk']} px chunks, zarr's default "
        f"compression, written chunk by chunk), model `{json.dumps(MODEL)}` (untrained, "
        f"fixed seed), `tiling: {{tile: {report['settings']['tile']}, mirror: symmetric}}`, "
        f"default local cluster. "
        f"Peak RSS: resident memory summed over the process tree (driver, scheduler, nannies, "
        f"workers), sampled every 50 ms. Predict: `run.json` `timings.predict`; submit: "
        f"`timings.submit` (the time to build and submit the block tasks; n/a where the "
        f"pipeline does not record it). Ratios are to the smallest size; targets: peak RSS "
        f"at most {RSS_TARGET:.0%} and predict seconds per MPx at most {TIME_TARGET:.0%} above "
        f"the smallest size's (a ratio below 1, fixed costs spread over more pixels, passes).",
        "",
        "| image | blocks (tile) | seconds | predict s | submit s | s/MPx | predict s/MPx "
        "| peak RSS | RSS ratio | predict s/MPx ratio | within targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(_row(r))
    lines.append("")
    errors = [f"{r['size']} px: {r['error']}" for r in report["results"] if r.get("error")]
    lines += [f"Failed: {e}." for e in errors] + ([""] if errors else [])
    if plot:
        lines += [f"![peak RSS and seconds per MPx against image size]({plot})", ""]
    if report.get("graph"):
        lines += [
            "Building the task graph (the driver's side, tasks that do nothing; see "
            "`graph_build` in `benchmarks/scaling.py`):",
            "",
            "| blocks | list the plan's blocks, s | submit to the scheduler, s | s per 10,000 blocks |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {g['blocks']:,} | {g['list_seconds']:.2f} | {g['submit_seconds']:.2f} | {g['per_10000_blocks']:.2f} |"
            for g in report["graph"]
        ]
        lines.append("")
    return "\n".join(lines)


def _row(r: dict[str, Any]) -> str:
    gpx = f"{r['size']}² ({r['megapixels'] / 1e3:.2f} GPx)"
    if r["returncode"] != 0:
        return f"| {gpx} | | failed | | | | | {fmt_bytes(r['peak_rss_bytes'])} | | | |"
    ratios = r.get("ratios", {})
    within = "RSS " + ("yes" if r["rss_within_target"] else "no")
    within += ", time " + ("yes" if r["time_within_target"] else "no")
    return (
        f"| {gpx} | {r.get('blocks', '')} ({r.get('tile') or '?'}) | {r['seconds']:.1f} | "
        f"{_num(r.get('predict_seconds'))} | {_num(r.get('submit_seconds'), 2)} | "
        f"{r['s_per_mpx']:.4f} | {_num(r.get('predict_s_per_mpx'), 4)} | "
        f"{fmt_bytes(r['peak_rss_bytes'])} | {fmt_ratio(ratios.get('peak_rss_bytes'))} | "
        f"{fmt_ratio(ratios.get('predict_s_per_mpx'))} | {within} |"
    )


def _num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def plot(report: dict[str, Any], path: Path) -> None:
    """Peak RSS and seconds per MPx (whole command and predict phase) against image size."""
    plt = pyplot()
    ok = [r for r in report["results"] if r["returncode"] == 0]
    sizes = [r["size"] for r in ok]
    fig, (rss, tpp) = plt.subplots(1, 2, figsize=(11, 4.2))
    rss.plot(sizes, [r["peak_rss_bytes"] / GiB for r in ok], marker="o", label="peak RSS")
    if ok:
        base = ok[0]["peak_rss_bytes"] / GiB
        rss.axhspan(
            base * (1 - RSS_TARGET), base * (1 + RSS_TARGET), alpha=0.15, label="target band"
        )
    rss.set_ylabel("peak RSS of the process tree (GiB)")
    rss.set_ylim(bottom=0)
    tpp.plot(sizes, [r["s_per_mpx"] for r in ok], marker="o", label="whole command")
    predict = [(r["size"], r["predict_s_per_mpx"]) for r in ok if r.get("predict_s_per_mpx")]
    if predict:
        xs, ys = zip(*predict, strict=True)
        tpp.plot(xs, ys, marker="o", label="predict phase")
        base = predict[0][1]
        tpp.axhspan(
            base * (1 - TIME_TARGET), base * (1 + TIME_TARGET), alpha=0.15, label="target band"
        )
    tpp.set_ylabel("seconds per MPx")
    tpp.set_ylim(bottom=0)
    for ax in (rss, tpp):
        size_axis(ax, sizes)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"pipeline run, {report['machine']['cpu']}, {report['machine']['cores']} cores", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--chunk", type=int, default=1024, help="chunk edge of the zarr inputs")
    parser.add_argument("--tile", default="auto", help="tiling.tile of the workflow (auto or px)")
    parser.add_argument("--json", type=Path, default=Path("docs/benchmarks/scaling.json"))
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG (default: the JSON path, .png)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="Markdown file whose section to replace"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="work folder (default: a temporary one)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the inputs and outputs")
    parser.add_argument(
        "--timeout", type=float, default=4 * 3600.0, help="seconds per pipeline run"
    )
    args = parser.parse_args(argv)
    if any(s < 64 for s in args.sizes):
        parser.error("--sizes: expected edges of at least 64 px")
    if args.chunk < 64:
        parser.error("--chunk: expected at least 64 px")
    if args.tile != "auto" and not (args.tile.isdigit() and int(args.tile) > 0):
        parser.error(f"--tile: expected auto or a positive number of pixels, got {args.tile!r}")
    args.sizes = sorted(set(args.sizes))
    args.plot = args.plot or args.json.with_suffix(".png")
    return args


def _describe(record: dict[str, Any]) -> str:
    text = f"{record['seconds']:.1f} s, predict {_num(record.get('predict_seconds'))} s, "
    text += f"{fmt_bytes(record['peak_rss_bytes'])} peak RSS"
    return text + (f"; failed: {record['error']}" if record.get("error") else "")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    work = (args.work or Path(tempfile.mkdtemp(prefix="scaling-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    need, free = disk_needs(args.sizes, args.keep), shutil.disk_usage(work).free
    _say(f"disk: up to {fmt_bytes(need)} at once (uncompressed input + labels; zarr compresses "
         f"both), {fmt_bytes(free)} free in {work}")  # fmt: skip
    _say(f"df: {df_line(work)}")
    if need > free:
        _say(f"error: not enough free disk in {work}: choose --work elsewhere or smaller --sizes")
        return 2
    facts = machine_facts()
    if facts["load_average_at_start"][0] > 0.5 * facts["cores"]:
        _say(f"note: load average {facts['load_average_at_start'][0]}: the machine is not idle")
    report: dict[str, Any] = {
        "command": command_line("benchmarks.scaling", argv),
        "machine": facts,
        "versions": {p: package_version(p) for p in ("torch", "dask", "distributed", "zarr")},
        "settings": {"sizes": args.sizes, "chunk": args.chunk, "tile": args.tile, "model": MODEL},
        "results": [],
    }
    try:
        for size in args.sizes:
            _say(f"{size} x {size} ...")
            record = run_size(work, size, args.chunk, args.tile, args.timeout, args.keep)
            report["results"].append(record)
            _say(f"  {_describe(record)}")
            summarise(report["results"])
            write_json(args.json, report)
        _say("task graph ...")
        try:
            report["graph"] = graph_build()
        except Exception as exc:  # the sizes' figures are worth keeping without it
            _say(f"task graph: failed: {type(exc).__name__}: {exc}")
        write_json(args.json, report)
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)
        else:
            _say(f"work folder: {work}")
    plot(report, args.plot)
    link = os.path.relpath(args.plot, args.out.parent) if args.out else str(args.plot)
    section = markdown(report, link)
    print(section)
    if args.out:
        replace_section(args.out, MARKER, section)
    _say(f"json {args.json}, plot {args.plot}" + (f", section in {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
