"""Never lose work: interrupted runs resume, byte-identical, computing only what is missing.

Runs go through the ``pipeline`` command in a subprocess, as a batch job runs it, and are
interrupted the ways batch jobs are: the driver SIGKILLed (node lost, OOM killer),
SIGINT (Ctrl-C), SIGTERM (scancel, walltime, pod eviction), a block that fails on every
try. The reference is the NumPy box filter on the whole mirrored image; the count of
blocks computed is checked twice: from run.json and from the network's own log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile
import torch
import yaml
import zarr

from pipeline.cli import main
from tests.helpers import REPO, BoxFilterNet, box_filter_reference

PIPELINE = str(Path(sys.executable).parent / "pipeline")
WEIGHT = [[1], [-1]]
MEAN = 100  # model.normalize: class 1 where the box mean is below it, class 0 above
SHAPE, TILE = (160, 160), 32
BLOCKS = (SHAPE[0] // TILE) * (SHAPE[1] // TILE)


def _image() -> np.ndarray:
    image = np.random.default_rng(3).integers(0, 200, SHAPE, dtype=np.uint8)
    image[100, 20] = 255  # inside block (3, 0) only: the one a broken model fails on
    return image


def _reference() -> np.ndarray:
    centred = _image()[None].astype(np.int64) - MEAN  # normalised as the workflow says: both signs
    return box_filter_reference(centred, 2, np.array(WEIGHT), "reflect").argmax(0)


def _workflow(tmp_path: Path, seconds: float = 0.0, **changes: object) -> str:
    if not (tmp_path / "img.tif").exists():  # rewriting it would change the input's fingerprint
        tifffile.imwrite(tmp_path / "img.tif", _image(), tile=(32, 32))
    doc = {
        "input": {"path": "img.tif"},
        "model": {
            "arch": "custom", "factory": "tests.helpers:SlowBoxFilter", "num_classes": 2, "halo": 2,
            "normalize": {"mean": MEAN, "std": 1},
            "kwargs": {"radius": 2, "weight": WEIGHT, "seconds": seconds, "log": str(tmp_path / "forward.log"),
                       "broken_if": str(tmp_path / "broken"), "broken_above": 255 - MEAN},
        },
        "tiling": {"tile": TILE},
        "output": {"path": "out/labels.zarr"},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
    }  # fmt: skip
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        doc.setdefault(section, {})[key] = value
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(doc))
    return str(tmp_path / "wf.yaml")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}  # workers import the test network


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PIPELINE, *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PIPELINE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        start_new_session=True,
    )  # fmt: skip


def _ledger(tmp_path: Path) -> int:
    folder = tmp_path / "out" / "labels.zarr" / "blocks" / "c"
    return sum(1 for p in folder.rglob("*") if p.is_file() and "." not in p.name) if folder.exists() else 0


def _wait_for_blocks(tmp_path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _ledger(tmp_path) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run wrote no blocks in time"
        time.sleep(0.05)


def _forward_passes(tmp_path: Path) -> int:
    log = tmp_path / "forward.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _record(tmp_path: Path) -> dict:
    return dict(zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r").attrs["pipeline"])


def _labels(tmp_path: Path) -> np.ndarray:
    return zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["0"][:]


def _run_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "labels.run.json").read_text())


def _resume_and_check(tmp_path: Path, wf: str) -> dict:
    """--resume: complete, identical to the whole-image reference, only missing blocks computed."""
    done_before = _ledger(tmp_path)
    assert 0 < done_before < BLOCKS
    (tmp_path / "forward.log").unlink(missing_ok=True)
    proc = _run("run", wf, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resume     {done_before} of {BLOCKS} blocks were written by the interrupted run" in proc.stdout
    assert _record(tmp_path)["status"] == "complete"
    np.testing.assert_array_equal(_labels(tmp_path), _reference())
    counts = _run_json(tmp_path)["blocks"]
    assert counts["resumed"] == done_before and counts["computed"] == BLOCKS - done_before
    assert _forward_passes(tmp_path) == BLOCKS - done_before  # the network agrees
    return counts


def test_driver_sigkill_leaves_no_orphans_and_resume_completes(tmp_path) -> None:
    wf = _workflow(tmp_path, seconds=0.3)
    proc = _start("run", wf)
    _wait_for_blocks(tmp_path, 3, proc)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 2  # the two workers (and multiprocessing's helpers)
    proc.send_signal(signal.SIGKILL)  # the driver alone, as the OOM killer or a lost node does
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(family, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "orphaned worker processes"
    assert _record(tmp_path)["status"] == "running"
    rerun = _run("run", wf)  # without --resume: refused, saying how
    assert rerun.returncode == 2 and "holds an interrupted run's label volume; rerun with --resume" in rerun.stderr
    _resume_and_check(tmp_path, wf)


def test_sigint_exits_130_and_resume_completes(tmp_path) -> None:
    wf = _workflow(tmp_path, seconds=0.3)
    proc = _start("run", wf)
    _wait_for_blocks(tmp_path, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted (SIGINT): the run's tasks were cancelled and the cluster stopped" in err
    assert "rerun with --resume" in err
    assert _record(tmp_path)["status"] == "running" and _run_json(tmp_path)["status"] == "interrupted"
    _resume_and_check(tmp_path, wf)


def test_sigterm_exits_143_and_stops_the_workers(tmp_path) -> None:
    wf = _workflow(tmp_path, seconds=0.3)
    proc = _start("run", wf)
    _wait_for_blocks(tmp_path, 2, proc)
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)  # scancel, a walltime, a pod's termination
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert _record(tmp_path)["status"] == "running"


def test_a_deterministic_failure_keeps_finished_blocks_for_resume(tmp_path) -> None:
    wf = _workflow(tmp_path)
    (tmp_path / "broken").touch()
    proc = _run("run", wf)
    assert proc.returncode == 1
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "block (3, 0) (pixels 96:128, 0:32)" in error[0] and "corrupt tile" in error[0]
    assert "after the fix, rerun with --resume" in error[0]
    summary = _run_json(tmp_path)
    assert summary["status"] == "failed" and summary["blocks"]["failed"] == 1
    assert summary["blocks"]["retried"] >= 1  # the block was tried again before the run gave up
    (tmp_path / "broken").unlink()  # the fix
    _resume_and_check(tmp_path, wf)


def _refused(capsys, *args: str) -> str:
    """A refused resume, run in-process: it stops before any block is computed (one interpreter fewer)."""
    capsys.readouterr()
    assert main(list(args)) == 2
    return capsys.readouterr().err


def _interrupted(tmp_path: Path, **changes: object) -> str:
    wf = _workflow(tmp_path, **changes)
    (tmp_path / "broken").touch()
    assert _run("run", wf).returncode == 1
    (tmp_path / "broken").unlink()
    return wf


def test_resume_is_refused_when_a_label_deciding_field_changed(tmp_path, capsys) -> None:
    _interrupted(tmp_path)
    before = _labels(tmp_path).copy()
    for changes, named in (
        ({"tiling__mirror": "symmetric"}, "workflow.tiling.mirror changed (reflect -> symmetric)"),
        ({"inference__precision": "bf16"}, "workflow.inference.precision changed (fp32 -> bf16)"),
        ({"tiling__tile": 16}, "plan.block_shape changed"),
    ):
        err = _refused(capsys, "run", _workflow(tmp_path, **changes), "--resume")
        assert f"cannot resume {tmp_path / 'out' / 'labels.zarr'}: since the interrupted run started, " in err
        assert named in err and "set output.overwrite: true to start over" in err
    err = _refused(capsys, "run", _workflow(tmp_path, tiling__mirror="symmetric", output__overwrite=True), "--resume")
    assert "run without --resume to start over" in err, err
    np.testing.assert_array_equal(_labels(tmp_path), before)  # nothing was written
    # what only decides where and how fast it runs does not block a resume
    proc = _run("run", _workflow(tmp_path, cluster__n_workers=1, cluster__retries=0), "--resume")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(_labels(tmp_path), _reference())


def test_resume_is_refused_when_the_weights_or_the_input_changed(tmp_path, capsys) -> None:
    torch.jit.save(torch.jit.script(BoxFilterNet(2, np.array(WEIGHT))), tmp_path / "box.pt")
    tifffile.imwrite(tmp_path / "img.tif", _image(), tile=(32, 32))
    doc = {
        "input": {"path": "img.tif"},
        "model": {"arch": "torchscript", "path": "box.pt", "num_classes": 2, "halo": 2, "normalize": {"mean": MEAN, "std": 1}},
        "tiling": {"tile": TILE},
        "output": {"path": "out/labels.zarr"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }
    wf = tmp_path / "wf.yaml"
    wf.write_text(yaml.safe_dump(doc))
    proc = _start("run", str(wf))
    _wait_for_blocks(tmp_path, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if _ledger(tmp_path) == BLOCKS:
        pytest.skip("the run finished before it could be interrupted")
    torch.jit.save(torch.jit.script(BoxFilterNet(2, np.array([[2], [-1]]))), tmp_path / "box.pt")
    err = _refused(capsys, "run", str(wf), "--resume")
    assert "model_weights changed" in err, err
    torch.jit.save(torch.jit.script(BoxFilterNet(2, np.array(WEIGHT))), tmp_path / "box.pt")
    image = _image()
    image[0, 0] = 0 if image[0, 0] else 1
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    err = _refused(capsys, "run", str(wf), "--resume")
    assert "input changed" in err, err


def test_resume_starts_afresh_without_a_volume_and_does_nothing_on_a_complete_one(tmp_path) -> None:
    wf = _workflow(tmp_path)
    first = _run("run", wf, "--resume")  # what a requeued batch job runs the first time
    assert first.returncode == 0, first.stderr
    assert _run_json(tmp_path)["blocks"]["computed"] == BLOCKS
    (tmp_path / "forward.log").unlink()
    again = _run("run", wf, "--resume")
    assert again.returncode == 0, again.stderr
    assert _run_json(tmp_path)["blocks"] == {"total": BLOCKS, "resumed": BLOCKS, "computed": 0, "skipped": 0, "retried": 0, "failed": 0}
    assert _forward_passes(tmp_path) == 0
    np.testing.assert_array_equal(_labels(tmp_path), _reference())


def test_an_auto_tile_is_kept_by_resume_where_a_fresh_plan_would_choose_another(tmp_path) -> None:
    """tile: auto depends on the machine (memory, cores): a resume on another node must keep
    the interrupted run's tile, or its blocks would no longer match the ledger."""
    wf = _interrupted(tmp_path, tiling__tile="auto")
    kept = _record(tmp_path)["plan"]["tile"]
    # a machine with far less memory per task would choose a smaller tile for a fresh run
    # (a plan into the interrupted output is refused without --resume, so plan a fresh output)
    fresh = _run("plan", _workflow(tmp_path, tiling__tile="auto", tiling__memory_share=1e-6, output__path="fresh.zarr"))
    assert fresh.returncode == 0, fresh.stderr
    assert f"write box {kept[0]} x {kept[1]}," not in fresh.stdout
    starved = _workflow(tmp_path, tiling__tile="auto", tiling__memory_share=1e-6)
    proc = _run("run", starved, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "tiling.tile: auto: the choice of the interrupted run (kept for --resume)" in proc.stdout
    assert _record(tmp_path)["plan"]["tile"] == kept and _record(tmp_path)["status"] == "complete"
    np.testing.assert_array_equal(_labels(tmp_path), _reference())
    assert wf  # the interrupted run's workflow, unchanged but for how much memory a task may use
