"""Shared helpers of the benchmarks: measured subprocesses, machine facts, report files.

Not run on its own. ``run_measured`` starts a command in a fresh process with the caller's
environment and samples the resident memory of its whole process tree (the process and
every descendant: Dask nannies, workers, ...) every ~50 ms; ``replace_section`` puts a
Markdown section between ``<!-- name:start -->`` / ``<!-- name:end -->`` markers.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

SAMPLE_SECONDS = 0.05
MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Measurement:
    """One measured command: wall seconds, peak summed RSS of its tree, exit status, output."""

    seconds: float
    peak_rss_bytes: int
    returncode: int
    output_tail: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of ``root`` and all its descendants (shared pages count once per process)."""
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def run_measured(
    cmd: list[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    timeout: float | None = None,
) -> Measurement:
    """Run ``cmd`` to the end; wall time and the peak RSS of its process tree.

    ``env=None`` gives the child exactly this process's environment. Output goes to
    ``log`` (or a temporary file); its last lines come back for error messages.
    """
    log = log or Path(os.devnull)
    with open(log, "w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak, timed_out = 0, False
        while proc.poll() is None:
            peak = max(peak, tree_rss(root))
            if timeout is not None and time.perf_counter() - start > timeout and not timed_out:
                timed_out = True
                _kill_tree(root)
            time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - start
    tail = "" if log == Path(os.devnull) else _tail(log)
    return Measurement(seconds, peak, proc.returncode, tail, timed_out)


def _kill_tree(root: psutil.Process) -> None:
    """Stop a command that ran past its time limit: its descendants first, then itself."""
    try:
        processes = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def pipeline_plan(volume: Path) -> dict[str, Any]:
    """The plan a ``pipeline run`` recorded in its label volume (tile, context, blocks), or {}."""
    try:
        import zarr

        attrs: Any = zarr.open_group(str(volume), mode="r").attrs
        plan = attrs["pipeline"]["plan"]
        return dict(plan) if isinstance(plan, dict) else {}
    except Exception:  # no volume, another layout: the report says "?" rather than failing
        return {}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """Cores this process may run on (the affinity mask, as the pipeline counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_facts() -> dict[str, Any]:
    """What a reader needs to compare numbers across machines, and whether this one was idle."""
    return {
        "cpu": cpu_model(),
        "cores": cores(),
        "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": package_version("torch"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def package_version(package: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def facts_line(facts: dict[str, Any]) -> str:
    load = ", ".join(f"{x:g}" for x in facts["load_average_at_start"])
    return (
        f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB, "
        f"torch {facts['torch']}, Python {facts['python']}; {facts['date']}; "
        f"load average at start {load}."
    )


def command_line(module: str, argv: list[str]) -> str:
    """The command as a reader would type it from the project root."""
    return shlex.join([".venv/bin/python", "-m", module, *argv])


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def replace_section(path: str | Path, name: str, section: str) -> None:
    """Put ``section`` between this benchmark's markers in ``path``, or append both.

    Text outside the markers is kept as it is; a file that does not exist yet is created.
    """
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker() -> Any:
    import matplotlib.ticker

    return matplotlib.ticker


def size_axis(ax: Any, sizes: list[int]) -> None:
    """A log2 x axis of image edges, ticked at the measured sizes (``4096²``)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s}²" for s in sizes])
    ax.xaxis.set_minor_locator(matplotlib_ticker().NullLocator())
    ax.set_xlabel("image size (edge², px)")
    ax.grid(True, which="both", alpha=0.3)


def python() -> str:
    """The interpreter running the benchmark (the project's venv): every child uses it."""
    return sys.executable
