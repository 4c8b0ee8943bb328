"""``kind: address``: a scheduler and workers started by hand (``dask scheduler``/``dask
worker``, as users do inside an allocation), joined by ``pipeline run``; and what every run
records about itself (run.json, no secrets) and reports (performance report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr

from tests.helpers import REPO, box_filter_reference

BIN = Path(sys.executable).parent
WEIGHT = [[1], [-1]]
MEAN = 128


def _image() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (96, 128), dtype=np.uint8)


def _workflow(folder: Path, cluster: dict) -> Path:
    tifffile.imwrite(folder / "img.tif", _image(), tile=(32, 32))
    doc = {
        "input": {"path": "img.tif"},
        "model": {"arch": "custom", "factory": "tests.helpers:SlowBoxFilter", "num_classes": 2, "halo": 2,
                  "normalize": {"mean": MEAN, "std": 1}, "kwargs": {"radius": 2, "weight": WEIGHT}},
        "tiling": {"tile": 32},
        "output": {"path": "out/labels.zarr"},
        "cluster": cluster,
    }  # fmt: skip
    (folder / "wf.yaml").write_text(yaml.safe_dump(doc))
    return folder / "wf.yaml"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def scheduler(tmp_path) -> Iterator[tuple[Path, list[subprocess.Popen]]]:
    """A ``dask scheduler`` and two ``dask worker`` processes, as a user starts them."""
    yield from _cluster(tmp_path, [[], []])


def _cluster(tmp_path: Path, extra_args: list[list[str]]) -> Iterator[tuple[Path, list[subprocess.Popen]]]:
    file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen(
        [str(BIN / "dask"), "scheduler", "--scheduler-file", str(file), "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )]  # fmt: skip
    deadline = time.monotonic() + 60
    while not (file.exists() and file.stat().st_size):
        assert time.monotonic() < deadline, "dask scheduler did not start"
        time.sleep(0.2)
    for slot, extra in enumerate(extra_args):
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", "--scheduler-file", str(file), "--nthreads", "1", "--no-dashboard",
             "--name", f"node-{slot}", "--preload", "pipeline.worker_preload", *extra],
            env={**{k: v for k, v in _env().items() if k != "GLIBC_TUNABLES"}, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
    yield file, procs
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=60)


def test_pipeline_run_joins_a_scheduler_started_by_hand(tmp_path, scheduler) -> None:
    file, procs = scheduler
    wf = _workflow(tmp_path, {"kind": "address", "scheduler_file": "scheduler.json", "wait_for_workers": 2,
                              "environment": {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "MALLOC_ARENA_MAX": "2"}})  # fmt: skip
    report = tmp_path / "dask-report.html"
    proc = subprocess.run(
        [str(BIN / "pipeline"), "run", str(wf), "--performance-report", str(report)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "cluster    address: 2 worker processes x 1 thread" in proc.stdout
    assert f"dask       performance report {report}" in proc.stdout
    # workers started by hand without the allocator settings: said, with what to set
    assert "note       2 of 2 workers run without the tuned allocator settings" in proc.stdout
    assert "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:" in proc.stdout
    assert "Dask Performance Report" in report.read_text()
    centred = _image()[None].astype(np.int64) - MEAN
    expected = box_filter_reference(centred, 2, np.array(WEIGHT), "reflect").argmax(0)
    volume = zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")
    np.testing.assert_array_equal(volume["0"][:], expected)
    assert all(p.poll() is None for p in procs)  # the user's cluster is left running

    run = json.loads((tmp_path / "out" / "labels.run.json").read_text())
    assert run["status"] == "complete" and run["blocks"] == {"total": 12, "resumed": 0, "computed": 12, "skipped": 0, "retried": 0, "failed": 0}
    assert run["cluster"]["backend"] == "address" and run["cluster"]["workers"] == 2
    assert set(run["timings"]) == {"plan", "normalization", "predict", "submit", "pyramid", "total"}
    assert run["workflow_sha256"] and run["versions"]["dask"] and run["versions"]["torch"]
    assert run["model"]["arch"] == "custom" and run["megapixels_per_second"] > 0
    recorded = json.dumps(run) + json.dumps(dict(volume.attrs))
    assert "s3cr3t-value" not in recorded  # credentials never reach run.json or the volume
    assert run["workflow"]["cluster"]["environment"] == {"AWS_SECRET_ACCESS_KEY": "<redacted>", "MALLOC_ARENA_MAX": "2"}
    assert volume.attrs["pipeline"]["block_counts"]["computed"] == 12


def test_a_scheduler_without_workers_stops_the_run_in_bounded_time(tmp_path) -> None:
    file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen(
        [str(BIN / "dask"), "scheduler", "--scheduler-file", str(file), "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (file.exists() and file.stat().st_size):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        wf = _workflow(tmp_path, {"kind": "address", "scheduler_file": "scheduler.json", "worker_timeout": "3s"})
        started = time.monotonic()
        proc = subprocess.run([str(BIN / "pipeline"), "run", str(wf)], capture_output=True, text=True, env=_env(), timeout=120)
        assert proc.returncode == 2 and time.monotonic() - started < 60
        assert "has 0 workers after 3s; expected at least 1 (cluster.wait_for_workers)" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=60)


def test_a_missing_scheduler_file_is_a_validate_error(tmp_path) -> None:
    wf = _workflow(tmp_path, {"kind": "address", "scheduler_file": "nowhere.json"})
    proc = subprocess.run([str(BIN / "pipeline"), "validate", str(wf)], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert f"cluster.scheduler_file: {tmp_path / 'nowhere.json'} does not exist" in proc.stderr


@pytest.fixture
def mixed(tmp_path) -> Iterator[tuple[Path, list[subprocess.Popen]]]:
    """One worker that declares the GPU resource and one that does not."""
    yield from _cluster(tmp_path, [["--resources", "GPU=1"], []])


def test_block_tasks_that_need_a_gpu_run_only_on_gpu_workers(tmp_path, mixed) -> None:
    """No GPU is needed to see the routing: the GPU-declaring worker runs every block (on
    its CPU here), the other none; the network logs the process of each forward pass."""
    _, procs = mixed
    wf = _workflow(tmp_path, {"kind": "address", "scheduler_file": "scheduler.json", "wait_for_workers": 2})
    doc = yaml.safe_load(wf.read_text())
    doc["model"]["kwargs"]["log"] = str(tmp_path / "forward.log")
    wf.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([str(BIN / "pipeline"), "run", str(wf)], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    pids = (tmp_path / "forward.log").read_text().split()
    assert len(pids) == 12
    import psutil

    gpu_worker = {str(p.pid) for p in psutil.Process(procs[1].pid).children(recursive=True)} | {str(procs[1].pid)}
    assert set(pids) <= gpu_worker
    run = json.loads((tmp_path / "out" / "labels.run.json").read_text())
    assert run["cluster"]["gpu_workers"] == 1 and run["cluster"]["workers"] == 2
