"""Throughput side by side: the pipeline against MONAI, dask map_overlap and the whole image.

    python -m benchmarks.throughput [--sizes 4096 8192] [--models unet dilated] [--repeats 2]
        [--methods pipeline monai map_overlap whole io] [--json docs/benchmarks/throughput.json]
        [--plot PNG] [--out docs/benchmarks.md] [--work DIR] [--keep] [--tie 1e-3]

On one synthetic uint8 EM image per size (``pipeline.demo``, a tiled TIFF) and one TorchScript
file per model (the same weights for every method), each method runs in a fresh process
started with this process's environment, one after the other (round-robin over the methods
in every repeat), and is measured from outside: wall seconds, MPx/s, and the peak resident
memory of its whole process tree (sampled every ~50 ms, summed over the process and its
descendants). Methods (``benchmarks.throughput_methods`` holds their code):

* ``pipeline``: ``pipeline run workflow.yaml`` (arch torchscript, declared halo, tile auto,
  mirror symmetric, default local cluster); also its predict phase from ``run.json``. The first
  run of each workflow is measured apart (it fills the caches later runs find).
* ``pipeline_small``: the same with ``tile: 512``, what a user short of memory would set.
* ``monai``: ``monai.inferers.sliding_window_inference`` on the whole image in memory (roi
  512 x 512, overlap 0.25, gaussian blending, otherwise MONAI's defaults).
* ``map_overlap``: ``dask.array.map_overlap`` over 1024 px chunks, ``boundary="reflect"``
  (numpy's symmetric) with the pipeline's context as depth, threaded scheduler, ``to_zarr``.
* ``whole``: one forward pass on the symmetric-padded image: the reference labels (row
  strips, exact, where the whole pass does not fit in memory or one activation would reach
  2 GiB, where CPU convolutions fall to a slow kernel).
* ``io``: the image read in 1024 px blocks and written as a uint8 zarr: the I/O floor.
* ``roofline`` (computed): FLOPs per output pixel at this machine's fp32 matmul rate.

Labels are compared with the reference overall and outside near-ties (reference top-1 minus
top-2 logit margin below ``--tie``). ``--out FILE`` replaces the section between
``<!-- throughput:start -->`` and ``<!-- throughput:end -->`` in FILE (appending it if absent).
Measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks import throughput_methods as tm
from benchmarks.measure import (
    Measurement,
    command_line,
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

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("pipeline", "pipeline_small", "monai", "map_overlap", "whole", "io")
SMALL_TILE = 512  # pipeline_small: what a user who wants less memory sets
TITLES = {
    "pipeline": "`pipeline run` (whole command)",
    "pipeline_small": f"`pipeline run`, `tile: {SMALL_TILE}` (less memory)",
    "monai": "MONAI `sliding_window_inference`",
    "map_overlap": "dask `map_overlap` (threads)",
    "whole": "whole-image forward (reference)",
    "io": "I/O floor (read + write zarr)",
    "roofline": "roofline (FLOPs at matmul rate)",
}
MODEL_TITLES = {
    "unet": "U-Net (depth 4, width 16)",
    "dilated": "dilated context net (32 channels, dilations 1,1,2,4,8,16,1)",
}
PREDICT_LABEL = "pipeline run: predict phase"
DEFAULT_TIE = 1e-3
MARKER = "throughput"


# -- running one method -------------------------------------------------------------------------


def run_method(method: str, work: Path, size: int, name: str, timeout: float) -> dict[str, Any]:
    """Measure one method once, in a fresh process; its output from a previous run is removed."""
    folder = work / f"size-{size}"
    output = tm.labels_path(work, size, "copy" if method == "io" else name, method)
    shutil.rmtree(output, ignore_errors=True)
    log = folder / f"{method}-{name}.log"
    if method.startswith("pipeline"):
        output.with_name(f"{output.stem}.run.json").unlink(missing_ok=True)  # a new output, as a user's
        workflow = _workflow(work, size, name, method)
        measured = run_measured(
            [_pipeline_command(), "run", str(workflow)], cwd=folder, log=log, timeout=timeout
        )
        extra = _run_json(output) if measured.ok else {}
        extra["plan"] = pipeline_plan(output) if measured.ok else {}
    else:
        result = folder / f"{method}-{name}.result.json"
        result.unlink(missing_ok=True)
        measured = run_measured(
            _child(method, work, size, name, result), cwd=ROOT, log=log, timeout=timeout
        )
        extra = json.loads(result.read_text()) if measured.ok and result.exists() else {}
    return _run_record(measured, extra)


def _run_record(m: Measurement, extra: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "seconds": round(m.seconds, 3),
        "peak_rss_bytes": m.peak_rss_bytes,
        "returncode": m.returncode,
    }
    if not m.ok:
        record["error"] = _failure(m)
    return record | extra


def _failure(m: Measurement) -> str:
    if m.timed_out:
        return "stopped after --timeout seconds"
    if m.returncode < 0:
        why = "out of memory?" if m.returncode == -9 else "killed or timed out"
        return f"killed by signal {-m.returncode} ({why})"
    last = [line for line in m.output_tail.splitlines() if line.strip()]
    return f"exit status {m.returncode}: {last[-1][:200] if last else 'no output'}"


def _child(step: str, work: Path, size: int, name: str, result: Path, *extra: str) -> list[str]:
    return [
        python(), "-m", "benchmarks.throughput_methods", step, "--work", str(work),
        "--size", str(size), "--model", name, "--result", str(result), *extra,
    ]  # fmt: skip


def _pipeline_command() -> str:
    """The ``pipeline`` entry point installed beside this interpreter (what users type)."""
    script = Path(python()).parent / "pipeline"
    if not script.exists():
        raise SystemExit(f"error: {script} not found: install the project (pip install -e .) first")
    return str(script)


def _workflow(work: Path, size: int, name: str, method: str = "pipeline") -> Path:
    meta = json.loads(tm.meta_path(work, name).read_text())
    wf = {
        "input": {"path": "image.tif"},
        "model": {
            "arch": "torchscript",
            "path": str(tm.model_path(work, name)),
            "halo": meta["halo"],
            "shift_period": meta["shift_period"],
            # size_min too: with size_step alone the pipeline takes 1 + n * step as legal sizes
            "size_min": meta["size_min"],
            "size_step": meta["size_step"],
            "num_classes": meta["config"]["num_classes"],
            "normalize": {"mean": tm.MEAN, "std": tm.STD},
        },
        "tiling": {"tile": SMALL_TILE if method == "pipeline_small" else "auto", "mirror": "symmetric"},
        "output": {"path": f"{method}-{name}.zarr", "overwrite": True},
    }
    path = work / f"size-{size}" / f"workflow-{method}-{name}.yaml"
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    return path


def _run_json(output: Path) -> dict[str, Any]:
    """Predict (and, where recorded, submit) seconds, blocks and tiles from ``run.json``."""
    path = output.with_name(f"{output.stem}.run.json")
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    timings = doc.get("timings") or {}
    return {
        "core_seconds": timings.get("predict"),
        "timings": timings,
        "blocks": (doc.get("blocks") or {}).get("total"),
        "tiles": doc.get("tiles"),
        "cluster": (doc.get("cluster") or {}).get("description"),
    }


def ensure_reference(
    work: Path, size: int, name: str, runs: list[dict], timeout: float
) -> dict[str, Any] | None:
    """The reference labels for agreement: computed here if ``whole`` did not run (in strips if
    it failed). A reference that cannot be computed leaves agreement empty, the rest stands."""
    labels, margin = tm.reference_paths(work, size, name)
    if labels.exists() and margin.exists() and any(r.get("returncode") == 0 for r in runs):
        return None
    folder = work / f"size-{size}"
    result = folder / f"reference-{name}.result.json"
    strips = ("--strips",) if runs else ()
    m = run_measured(_child("whole", work, size, name, result, *strips), cwd=ROOT,
                     log=folder / f"reference-{name}.log", timeout=timeout)  # fmt: skip
    if not m.ok:
        _say(f"  the reference for {name} at {size} px failed: {_failure(m)}; no agreement")
        for path in (labels, margin):
            path.unlink(missing_ok=True)
        return _run_record(m, {})
    return _run_record(m, json.loads(result.read_text()))


# -- agreement ----------------------------------------------------------------------------------


def agreement(work: Path, size: int, name: str, method: str, tie: float) -> dict[str, Any] | None:
    """Share of pixels with the reference's label, overall and where its margin is >= ``tie``."""
    import zarr

    path = tm.labels_path(work, size, name, method)
    if method == "whole":
        return {"overall": 1.0, "outside_near_ties": 1.0, "reference": True}
    references = tm.reference_paths(work, size, name)
    if not path.exists() or not all(p.exists() for p in references):
        return None
    node: Any = zarr.open(str(path), mode="r")
    array: Any = node["0"] if isinstance(node, zarr.Group) else node  # the pipeline's: a group
    labels = np.asarray(array[...])
    ref_labels, ref_margin = (np.load(p, mmap_mode="r") for p in references)
    if labels.shape != ref_labels.shape:
        return {"error": f"shape {labels.shape}, reference {ref_labels.shape}"}
    equal = labels == ref_labels
    confident = np.asarray(ref_margin) >= tie
    n_confident = int(confident.sum())
    return {
        "overall": float(equal.mean()),
        "outside_near_ties": float(equal[confident].mean()) if n_confident else None,
        "near_tie_fraction": 1.0 - n_confident / confident.size,
        "disagreeing_pixels_outside_near_ties": int(n_confident - equal[confident].sum()),
    }


# -- summary ------------------------------------------------------------------------------------


def summarise(
    size: int, name: str, runs: dict[str, list[dict]], agree: dict, meta: dict, gflops: float
) -> dict:
    """Median seconds and peak RSS of the successful runs; MPx/s; ratios to the pipeline."""
    mpx = size * size / 1e6
    rows: dict[str, dict[str, Any]] = {}
    for method, records in runs.items():
        ok = [r for r in records if r["returncode"] == 0]
        row: dict[str, Any] = {"runs": records, "agreement": agree.get(method)}
        if ok:
            seconds = statistics.median(r["seconds"] for r in ok)
            core = [r["core_seconds"] for r in ok if r.get("core_seconds")]
            row |= {
                "seconds": seconds,
                "mpx_per_s": mpx / seconds,
                "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in ok),
                "core_seconds": statistics.median(core) if core else None,
            }
            row["core_mpx_per_s"] = mpx / row["core_seconds"] if row["core_seconds"] else None
        rows[method] = row
    rows["roofline"] = {
        "mpx_per_s": gflops * 1e3 / meta["flops_per_pixel"],
        "seconds": size * size * meta["flops_per_pixel"] / (gflops * 1e9),
    }
    base = rows.get("pipeline", {})
    for row in rows.values():
        row["mpx_per_s_ratio"] = _ratio(row.get("mpx_per_s"), base.get("mpx_per_s"))
        row["core_mpx_per_s_ratio"] = _ratio(row.get("core_mpx_per_s"), base.get("core_mpx_per_s"))
        row["rss_ratio"] = _ratio(row.get("peak_rss_bytes"), base.get("peak_rss_bytes"))
    return {"size": size, "model": name, "megapixels": mpx, "methods": rows}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# -- report -------------------------------------------------------------------------------------


def markdown(report: dict[str, Any], plot: str | None) -> str:
    """The Markdown section: command, machine, settings, one table per model and size."""
    s = report["settings"]
    mm = report["matmul"]
    lines = [
        "## Throughput side by side: pipeline, MONAI, `map_overlap`, whole image",
        "",
        f"Reproduce: `{report['command']}`",
        "",
        facts_line(report["machine"]),
        "",
        f"Each method runs in a fresh process with the benchmark's own environment (no allocator "
        f"or thread variables added), {s['repeats']} repeat(s) in alternation (round-robin over "
        f"the methods); seconds and peak RSS are medians of the runs (runs in parentheses). "
        f"Seconds: wall time of the whole process (imports, reading, model loading, inference, "
        f"writing). Core s: the pipeline's predict phase (`run.json` `timings.predict`: from "
        f"submitting the blocks to the last one written), and for the others the time from the "
        f"image and model loaded to the labels written. Peak RSS: resident memory summed over "
        f"the process tree (every Dask worker and nanny too), sampled every 50 ms; shared "
        f"pages count once per process. Agreement: share of pixels with the reference's label; "
        f"outside near-ties: only pixels whose reference top-1 minus top-2 logit margin is at "
        f"least {s['tie']:g} ({_tie_share(report)} of pixels are near-ties). Ratios: against "
        f"`pipeline run` (MPx/s: higher is faster; RSS: higher uses more).",
        "",
        *[f"* {line}" for line in _method_notes(report)],
        "",
        f"Matmul rate: {mm['gflops']:.1f} GFLOP/s (fp32 `torch.mm`, {mm['n']} x {mm['n']}, "
        f"{mm['threads']} torch threads). "
        + " ".join(
            f"{MODEL_TITLES.get(n, n)}: {m['flops_per_pixel']:,.0f} FLOPs per output pixel "
            f"(`FlopCounterMode` on a {m['flops_tile']} px tile), halo {m['halo']}, context "
            f"{m['context']}; weights: {m['init']}."
            for n, m in report["models"].items()
        ),
        "",
    ]
    for result in report["results"]:
        lines += _table(result)
    if plot:
        lines += [f"![throughput and peak RSS against image size]({plot})", ""]
    return "\n".join(lines)


def _tie_share(report: dict[str, Any]) -> str:
    shares = [
        a["near_tie_fraction"]
        for r in report["results"]
        for row in r["methods"].values()
        if (a := row.get("agreement")) and "near_tie_fraction" in a
    ]
    if not shares:
        return "n/a"
    return f"{100 * min(shares):.2f}-{100 * max(shares):.2f} %"


def _method_notes(report: dict[str, Any]) -> list[str]:
    return [
        "`pipeline run`: `arch: torchscript` with the declared halo and shift period, "
        "`tile: auto`, `mirror: symmetric`, the default local cluster (its shape, as "
        "`run.json` records it, is under each table) with whatever environment the pipeline "
        "gives its own workers.",
        f"MONAI {report['versions'].get('monai', '?')}: "
        "`sliding_window_inference(roi_size=(512, 512), "
        'overlap=0.25, mode="gaussian")` (sw_batch_size 1, constant padding: MONAI\'s defaults) '
        "on the whole normalised image as one tensor, under `torch.no_grad()`, argmax, "
        "`zarr.create_array` with 1024 px chunks; torch threads at their default.",
        "`map_overlap`: `da.from_zarr(tifffile.imread(path, aszarr=True), chunks=1024)"
        '.map_overlap(predict, depth=context, boundary="reflect", dtype=uint8)` (dask\'s '
        "reflect repeats the edge pixel, numpy's symmetric), `predict` normalises, runs the "
        "TorchScript model under `torch.no_grad()` and takes the argmax; `.to_zarr(...)` on "
        "dask's default threaded scheduler; torch and dask threads at their defaults.",
        'whole-image forward: `numpy.pad(mode="symmetric")` by the context (the end of each '
        "axis grown to a legal input size), one forward pass, crop, top-2 (labels and margin "
        "saved as `.npy`); torch threads at their default. Where the pass would not fit in the "
        "memory available (estimate: 2x the model's activation bytes per pixel), its "
        "allocation fails, or one activation would reach 2 GiB (a slow CPU kernel), the "
        "reference is computed in row strips of the same padded image, "
        "each with the full context above and below and starting at a multiple of the shift "
        "period: the same result as the whole pass, up to float rounding.",
        "I/O floor: `da.from_zarr(tifffile.imread(path, aszarr=True), chunks=1024).to_zarr(...)` "
        "(threads): reading the image and writing a uint8 zarr of its shape and chunks.",
        "roofline: FLOPs per output pixel at the fp32 matmul rate (no halo, no memory traffic).",
    ]


def _table(result: dict[str, Any]) -> list[str]:
    size, name = result["size"], result["model"]
    lines = [
        f"### {MODEL_TITLES.get(name, name)}, {size} x {size} ({result['megapixels']:.1f} MPx)",
        "",
        "| method | seconds (runs) | MPx/s | core s | core MPx/s | peak RSS | agreement "
        "| outside near-ties | MPx/s vs pipeline | core MPx/s vs pipeline | RSS vs pipeline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    pipeline = result["methods"].get("pipeline", {})
    for method, row in result["methods"].items():
        title = TITLES.get(method, method)
        if method == "roofline":
            to_predict = _ratio(row["mpx_per_s"], pipeline.get("core_mpx_per_s"))
            lines.append(
                f"| {title} | {row['seconds']:.2f} | {row['mpx_per_s']:.3g} | | | | | | "
                f"{fmt_ratio(row['mpx_per_s_ratio'])} | {fmt_ratio(to_predict)} | |"
            )
            continue
        failed = [r for r in row["runs"] if r["returncode"] != 0]
        notes += [f"{TITLES[method]}: run failed: {r['error']}" for r in failed]
        if method == "whole":
            modes = {r.get("mode") for r in row["runs"] if r.get("mode")}
            if "strips" in modes:
                reasons = sorted(
                    {r.get("reason", "") for r in row["runs"] if r.get("mode") == "strips"}
                )
                rows_ = sorted({r.get("strip_rows") for r in row["runs"] if r.get("strip_rows")})
                title = "reference in row strips (whole pass did not fit or would be slow)"
                notes.append(
                    f"reference: computed in strips of {rows_} rows ({'; '.join(reasons)})"
                )
        if "seconds" not in row:
            lines.append(f"| {title} | failed | | | | | | | | | |")
            continue
        runs = ", ".join(f"{r['seconds']:.1f}" for r in row["runs"] if r["returncode"] == 0)
        core = f"{row['core_seconds']:.2f}" if row.get("core_seconds") else ""
        core_rate = f"{row['core_mpx_per_s']:.3g}" if row.get("core_mpx_per_s") else ""
        a = row.get("agreement") or {}
        lines.append(
            f"| {title} | {row['seconds']:.2f} ({runs}) | {row['mpx_per_s']:.3g} | {core} | "
            f"{core_rate} | {fmt_bytes(row['peak_rss_bytes'])} | {_share(a.get('overall'))} | "
            f"{_share(a.get('outside_near_ties'))} | {fmt_ratio(row['mpx_per_s_ratio'])} | "
            f"{fmt_ratio(row['core_mpx_per_s_ratio'])} | {fmt_ratio(row['rss_ratio'])} |"
        )
    pipeline_runs = result["methods"].get("pipeline", {}).get("runs", [])
    shapes = {
        (
            r.get("blocks"),
            r.get("tiles"),
            (r.get("plan") or {}).get("tile", ["?"])[0],
            r.get("cluster"),
        )
        for r in pipeline_runs
        if r.get("blocks")
    }
    for b, t, edge, c in shapes:
        notes.append(f"pipeline: {b} blocks, {t} tiles of {edge} px, cluster {c}")
    first = result.get("first_pipeline_run")
    if first and first.get("returncode") == 0:
        notes.append(
            f"pipeline, first run of the workflow (empty caches: a declared model's halo probe, "
            f"the runtime measurement; not in the table): {first['seconds']:.1f} s, phases "
            f"{_pipeline_phases([first])}"
        )
    if phases := _pipeline_phases(pipeline_runs):
        notes.append(f"pipeline phases (`run.json` timings, median s): {phases}")
    if fallback := result.get("reference_fallback"):
        if fallback.get("error"):
            how = f"failed: {fallback['error']}; no agreement"
        elif fallback.get("mode") == "strips":
            how = f"in row strips: {fallback.get('reason', '')}"
        else:
            how = "one whole-image pass"
        notes.append(f"reference: computed separately, not measured ({how})")
    lines += [""] + [f"{n}." for n in notes] + ([""] if notes else [])
    return lines


def _pipeline_phases(runs: list[dict[str, Any]]) -> str:
    """Where the whole command's time went: plan (probes, tuning), predict, ... and the rest."""
    timings = [r["timings"] for r in runs if r.get("returncode") == 0 and r.get("timings")]
    keys = list(dict.fromkeys(k for t in timings for k in t))
    return ", ".join(f"{k} {statistics.median(t[k] for t in timings if k in t):.2f}" for k in keys)


def _share(x: float | None) -> str:
    """Agreement as a share; never rounded up to a 1 it is not."""
    if x is None:
        return ""
    if x == 1.0:
        return "1"
    return f"{x:.6f}" if x < 0.9999995 else f"1 - {1 - x:.1e}"


def plot(report: dict[str, Any], path: Path) -> None:
    """MPx/s (log scale) and peak RSS against image size: a line per method, a column per model."""
    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in report["results"]))
    methods = [*report["settings"]["methods"], "roofline"]
    colours = {m: f"C{i}" for i, m in enumerate([*METHODS, "roofline"])}
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    for col, name in enumerate(models):
        results = sorted(
            (r for r in report["results"] if r["model"] == name), key=lambda r: r["size"]
        )
        for method in methods:
            points = [(r["size"], r["methods"].get(method, {})) for r in results]
            points = [(size, row) for size, row in points if row.get("mpx_per_s")]
            if not points:
                continue
            xs = [size for size, _ in points]
            style = {"color": colours[method], "label": TITLES[method].replace("`", "")}
            style |= {"linestyle": "--", "marker": "x"} if method == "roofline" else {"marker": "o"}
            axes[0, col].plot(xs, [row["mpx_per_s"] for _, row in points], **style)
            if method != "roofline":
                axes[1, col].plot(xs, [row["peak_rss_bytes"] / 2**30 for _, row in points], **style)
            if method == "pipeline" and all(row.get("core_mpx_per_s") for _, row in points):
                rates = [row["core_mpx_per_s"] for _, row in points]
                axes[0, col].plot(xs, rates, color=colours[method], linestyle=":", marker=".",
                                  label=PREDICT_LABEL)  # fmt: skip
        axes[0, col].set_title(MODEL_TITLES.get(name, name), fontsize=10)
        axes[0, col].set_ylabel("throughput (MPx/s)")
        axes[0, col].set_yscale("log")
        axes[1, col].set_ylabel("peak RSS of the process tree (GiB)")
        axes[1, col].set_ylim(bottom=0)
        for ax in axes[:, col]:
            size_axis(ax, [r["size"] for r in results])
    legend: dict[str, Any] = {}  # every method once, whichever column drew it
    for ax in axes[0]:
        legend |= dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    order = [TITLES[m].replace("`", "") for m in methods] + [PREDICT_LABEL]
    labels = [label for label in order if label in legend]
    fig.legend([legend[label] for label in labels], labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{report['machine']['cpu']}, {report['machine']['cores']} cores", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[4096, 8192], help="image edges in pixels"
    )
    parser.add_argument(
        "--models", nargs="+", default=list(tm.MODELS), help=f"of {', '.join(tm.MODELS)}"
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), help=f"of {', '.join(METHODS)}"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per method, in alternation")
    parser.add_argument("--tie", type=float, default=DEFAULT_TIE, help="near-tie logit margin")
    parser.add_argument("--json", type=Path, default=Path("docs/benchmarks/throughput.json"))
    parser.add_argument(
        "--plot", type=Path, default=None, help="PNG (default: the JSON path, .png)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="Markdown file whose section to replace"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="work folder (default: a temporary one)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (images, labels, .npy)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per method run")
    args = parser.parse_args(argv)
    for what, given, allowed in (
        ("--models", args.models, tm.MODELS),
        ("--methods", args.methods, METHODS),
    ):
        unknown = [x for x in given if x not in allowed]
        if unknown:
            parser.error(
                f"{what}: unknown {', '.join(unknown)}; expected some of {', '.join(allowed)}"
            )
    if any(s < 64 for s in args.sizes):
        parser.error("--sizes: expected edges of at least 64 px")
    if args.repeats < 1:
        parser.error("--repeats: expected at least 1")
    if not args.tie >= 0:
        parser.error("--tie: expected a margin >= 0")
    args.methods = [m for m in METHODS if m in args.methods]  # a fixed order in every repeat
    args.plot = args.plot or args.json.with_suffix(".png")
    return args


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _setup_step(work: Path, step: str, *args: str) -> Any:
    result = work / f"{step}.result.json"
    cmd = [
        python(),
        "-m",
        "benchmarks.throughput_methods",
        step,
        "--work",
        str(work),
        "--result",
        str(result),
        *args,
    ]
    m = run_measured(cmd, cwd=ROOT, log=work / f"{step}.log")
    if not m.ok:
        raise SystemExit(f"error: set-up step {step} failed: {_failure(m)}\n{m.output_tail}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    work = args.work or Path(tempfile.mkdtemp(prefix="throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    os.environ["PIPELINE_CACHE_DIR"] = str(work / "cache")  # the first runs find nothing cached
    facts = machine_facts()
    if facts["load_average_at_start"][0] > 0.5 * facts["cores"]:
        _say(f"note: load average {facts['load_average_at_start'][0]} on {facts['cores']} cores: "
             f"the machine is not idle, numbers may be off")  # fmt: skip
    report: dict[str, Any] = {
        "command": command_line("benchmarks.throughput", argv),
        "machine": facts,
        "versions": {
            p: package_version(p) for p in ("torch", "monai", "dask", "zarr", "numpy", "tifffile")
        },
        "settings": {
            "sizes": args.sizes,
            "models": args.models,
            "methods": args.methods,
            "repeats": args.repeats,
            "tie": args.tie,
        },
        "results": [],
    }
    try:
        _say("matmul rate ...")
        report["matmul"] = _setup_step(work, "matmul")
        _say("models ...")
        report["models"] = _setup_step(
            work, "models", *[a for n in args.models for a in ("--model", n)]
        )
        for size in args.sizes:
            _say(f"image {size} x {size} ...")
            _setup_step(work, "image", "--size", str(size))
            for name in args.models:
                report["results"].append(_measure_size(args, work, size, name, report))
                write_json(args.json, report)
            if not (args.keep or args.work):
                shutil.rmtree(work / f"size-{size}", ignore_errors=True)
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            _say(f"work folder kept: {work}")
    write_json(args.json, report)
    plot(report, args.plot)
    link = os.path.relpath(args.plot, args.out.parent) if args.out else str(args.plot)
    section = markdown(report, link)
    print(section)
    if args.out:
        replace_section(args.out, MARKER, section)
    _say(f"json {args.json}, plot {args.plot}" + (f", section in {args.out}" if args.out else ""))
    return 0


def _measure_size(args: argparse.Namespace, work: Path, size: int, name: str, report: dict) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    first = None
    if "pipeline" in args.methods:
        # A workflow's first run fills the caches its later runs find (a declared model's halo
        # probe, the runtime measurement): measured once, apart from the timed repeats.
        first = run_method("pipeline", work, size, name, args.timeout)
        status = first.get("error") or f"{first['seconds']:.1f} s"
        _say(f"  {size} px {name} first pipeline run (empty caches): {status}")
    for repeat in range(args.repeats):
        for method in args.methods:
            record = run_method(method, work, size, name, args.timeout)
            runs[method].append(record)
            status = (
                record.get("error")
                or f"{record['seconds']:.1f} s, {fmt_bytes(record['peak_rss_bytes'])}"
            )
            _say(f"  {size} px {name} repeat {repeat + 1}/{args.repeats} {method}: {status}")
    fallback = ensure_reference(work, size, name, runs.get("whole", []), args.timeout)
    agree = {m: agreement(work, size, name, m, args.tie) for m in args.methods if m != "io"}
    result = summarise(size, name, runs, agree, report["models"][name], report["matmul"]["gflops"])
    if fallback:
        result["reference_fallback"] = fallback
    if first is not None:
        result["first_pipeline_run"] = first
    return result


if __name__ == "__main__":
    sys.exit(main())
