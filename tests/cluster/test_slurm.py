"""Real SLURM: workers are SLURM jobs, the output is byte-identical to a local run, a
cancelled worker job is replaced, and the sbatch script in cluster/slurm/ runs a workflow.

Everything goes through the ``pipeline`` command, as users run it; the jobs inherit the
test's environment (``sbatch`` exports it), so the workers import the test networks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr

from tests.helpers import REPO, box_filter_reference

PIPELINE = str(Path(sys.executable).parent / "pipeline")
WEIGHT = [[1], [-1]]
MEAN = 128  # model.normalize: class 1 where the box mean is below it, class 0 above
SHAPE, TILE = (160, 192), 32
BLOCKS = (SHAPE[0] // TILE) * (SHAPE[1] // TILE)

pytestmark = pytest.mark.usefixtures("slurm")


def _image() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, SHAPE, dtype=np.uint8)


def _reference() -> np.ndarray:
    centred = _image()[None].astype(np.int64) - MEAN  # normalised as the workflow says: both signs
    return box_filter_reference(centred, 2, np.array(WEIGHT), "reflect").argmax(0)


def _workflow(folder: Path, cluster: dict, seconds: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "img.tif", _image(), tile=(32, 32))
    doc = {
        "input": {"path": "img.tif"},
        "model": {"arch": "custom", "factory": "tests.helpers:SlowBoxFilter", "num_classes": 2, "halo": 2,
            "normalize": {"mean": MEAN, "std": 1},
                  "kwargs": {"radius": 2, "weight": WEIGHT, "seconds": seconds}},
        "tiling": {"tile": TILE},
        "output": {"path": "out/labels.zarr"},
        "cluster": cluster,
    }  # fmt: skip
    (folder / "wf.yaml").write_text(yaml.safe_dump(doc))
    return folder / "wf.yaml"


def _slurm_cluster(folder: Path, **more: object) -> dict:
    return {
        "kind": "slurm", "cores": 1, "memory": "2GB", "walltime": "00:10:00", "jobs": 2,
        "interface": "lo", "log_directory": str(folder / "logs"), "worker_timeout": "2m", **more,
    }  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _chunks(volume: Path) -> dict[str, bytes]:
    return {str(p.relative_to(volume)): p.read_bytes() for p in sorted((volume / "0" / "c").rglob("*")) if p.is_file()}


def _finished_jobs() -> str:
    log = Path("/var/log/slurm/jobcomp.log")
    return log.read_text() if log.exists() else ""


def test_workers_run_as_slurm_jobs_and_the_output_is_byte_identical(tmp_path) -> None:
    local = _workflow(tmp_path / "local", {"kind": "local", "n_workers": 2, "threads_per_worker": 1})
    slurm = _workflow(tmp_path / "slurm", _slurm_cluster(tmp_path / "slurm"))
    for wf in (local, slurm):
        proc = subprocess.run([PIPELINE, "run", str(wf)], capture_output=True, text=True, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr
    # one core per job: a thread for the forward pass and one that reads and writes
    assert "slurm: 2 worker processes x 2 threads (at most 1 forward pass at once" in proc.stdout
    a, b = tmp_path / "local" / "out" / "labels.zarr", tmp_path / "slurm" / "out" / "labels.zarr"
    assert _chunks(a) == _chunks(b) and len(_chunks(a)) == BLOCKS
    np.testing.assert_array_equal(zarr.open_group(str(b), mode="r")["0"][:], _reference())
    run = json.loads((tmp_path / "slurm" / "out" / "labels.run.json").read_text())
    assert run["cluster"]["backend"] == "slurm" and run["blocks"]["computed"] == BLOCKS
    job_ids = run["cluster"]["job_ids"]
    assert job_ids and all(re.fullmatch(r"\d+", j) for j in job_ids)
    # SLURM itself knows these jobs, ran them under the jobqueue name, and has ended them
    deadline = time.monotonic() + 60
    while not all(f"JobId={j} " in _finished_jobs() for j in job_ids) and time.monotonic() < deadline:
        time.sleep(1)
    for j in job_ids:
        line = next(ln for ln in _finished_jobs().splitlines() if f"JobId={j} " in ln)
        assert "Name=gigaseg-worker" in line
    assert list((tmp_path / "slurm" / "logs").glob("*.err"))  # the job logs went where asked


def _squeue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", "gigaseg-worker", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True)
    return out.stdout.split()


def test_a_cancelled_worker_job_is_replaced_and_the_run_completes(tmp_path) -> None:
    wf = _workflow(tmp_path, _slurm_cluster(tmp_path), seconds=1.0)
    proc = subprocess.Popen([PIPELINE, "run", str(wf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    ledger = tmp_path / "out" / "labels.zarr" / "blocks" / "c"
    deadline = time.monotonic() + 180
    while not (ledger.exists() and sum(1 for p in ledger.rglob("*") if p.is_file()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    running = _squeue()
    assert len(running) == 2, "the two worker jobs are not running"
    subprocess.run(["scancel", running[0]], check=True)
    started = time.monotonic()
    out, err = proc.communicate(timeout=300)  # bounded: completes or fails, never hangs
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 240
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["0"][:], _reference())
    run = json.loads((tmp_path / "out" / "labels.run.json").read_text())
    assert set(run["cluster"]["job_ids"]) - set(running)  # a replacement job was submitted and ran
    assert run["blocks"]["computed"] == BLOCKS


def test_the_sbatch_script_runs_a_workflow_in_one_allocation(tmp_path) -> None:
    wf = _workflow(tmp_path, {"kind": "address", "scheduler_file": "scheduler.json", "wait_for_workers": 2})
    proc = subprocess.run(
        ["sbatch", "--wait", "--parsable", f"--output={tmp_path}/job.out", "--time=00:10:00",
         str(REPO / "cluster" / "slurm" / "pipeline.sbatch"), str(wf)],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )  # fmt: skip
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{log}"
    assert "address: 2 worker processes x 2 threads" in log and "labels " in log
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["0"][:], _reference())
    assert not (tmp_path / "scheduler.json").exists()
