"""The local cluster as users run it: loopback only, worker loss survived, Ctrl-C summarised,
workers started with the backend's environment."""

from __future__ import annotations

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

from pipeline.cluster import check_cluster, connect
from pipeline.config import LocalClusterConfig
from pipeline.errors import PipelineError
from tests.helpers import REPO, BoxFilterNet, FailOnBright, box_filter_reference

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def test_scheduler_workers_and_http_listen_on_loopback_only() -> None:
    with connect(LocalClusterConfig(n_workers=2, threads_per_worker=1)) as conn:
        client = conn.client
        me = psutil.Process()
        listening = [
            (p.pid, c.laddr.ip)
            for p in [me, *me.children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert len({pid for pid, _ in listening}) >= 3  # the driver (scheduler) and two workers
        assert {ip for _, ip in listening} == {"127.0.0.1"}
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])


def test_the_dashboard_is_served_only_where_asked() -> None:
    import urllib.request

    with connect(LocalClusterConfig(n_workers=1, dashboard="127.0.0.1:0")) as conn:
        client = conn.client
        assert conn.dashboard == client.dashboard_link
        me = psutil.Process()
        listening = {c.laddr.ip for p in [me, *me.children(recursive=True)] for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
        link = client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(link.replace("/status", "/health"), timeout=30) as response:
            assert response.status == 200


def test_pipeline_run_with_a_dashboard(tmp_path, capsys) -> None:
    from pipeline.cli import main

    wf, expected = _workflow(tmp_path, {"arch": "torchscript", "path": "box.pt"})
    torch.jit.save(torch.jit.script(BoxFilterNet(2, np.array([[1], [-1]]))), tmp_path / "box.pt")
    doc = yaml.safe_load(open(wf))
    doc["cluster"]["dashboard"] = "127.0.0.1:0"
    Path(wf).write_text(yaml.safe_dump(doc))
    assert main(["run", wf]) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")["0"][:], expected)


def test_a_dashboard_without_bokeh_is_a_validate_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bokeh", None)  # what an environment without bokeh sees
    with pytest.raises(PipelineError, match="cluster.dashboard: the Dask dashboard needs the bokeh package"):
        check_cluster(LocalClusterConfig(n_workers=1, dashboard="127.0.0.1:8787"), "cpu", 1 << 20)


def test_validate_knows_the_machine() -> None:
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(PipelineError, match=f"cluster.n_workers: {cores + 1} worker processes on a machine with {cores} core"):
        check_cluster(LocalClusterConfig(n_workers=cores + 1), "cpu", 1 << 20)
    with pytest.raises(PipelineError, match="tiling.tile: .* need more than this machine's"):
        check_cluster(LocalClusterConfig(n_workers=1, threads_per_worker=1), "cpu", 1 << 50)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="inference.device: cuda was requested, but this machine has no CUDA device"):
            check_cluster(LocalClusterConfig(n_workers=1), "cuda", 1 << 20)


def _workflow(tmp_path: Path, model: dict, overwrite: bool = False) -> tuple[str, np.ndarray]:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (130, 150), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "img.tif"},
        "model": {"num_classes": 2, "halo": 2, **model},
        "tiling": {"tile": 32},
        "inference": {"channels_last": True, "torch_threads": 1},  # nothing measured: blocks run first
        "output": {"path": "out/labels.zarr", "overwrite": overwrite},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }))  # fmt: skip
    weight = np.array([[1], [-1]])
    return str(tmp_path / "wf.yaml"), box_filter_reference(image[None], 2, weight, "reflect").argmax(0)


def _killer(tmp_path: Path, times: int) -> dict:
    return {
        "arch": "custom",
        "factory": "tests.helpers:KillWorkerOnce",
        "kwargs": {"marker": str(tmp_path / "kills"), "radius": 2, "weight": [[1], [-1]], "times": times},
    }


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # workers import the test model
    return subprocess.run([PIPELINE, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300, **kwargs)


def test_the_run_survives_sigkill_of_its_only_worker(tmp_path) -> None:
    wf, expected = _workflow(tmp_path, _killer(tmp_path, times=1))
    proc = _run(["run", wf])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "kills").read_text() == "x"  # the worker really died once
    group = zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")
    assert group.attrs["pipeline"]["status"] == "complete"
    np.testing.assert_array_equal(group["0"][:], expected)
    assert "Traceback" not in proc.stderr
    import json

    run = json.loads((tmp_path / "out" / "labels.run.json").read_text())
    assert run["blocks"]["retried"] >= 1 and run["blocks"]["computed"] == run["blocks"]["total"]
    assert "retried" in proc.stdout and "0 retried" not in proc.stdout


def test_a_block_whose_worker_always_dies_fails_in_one_line(tmp_path) -> None:
    wf, _ = _workflow(tmp_path, _killer(tmp_path, times=100))
    proc = _run(["run", wf])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the worker process running it died each time it was tried" in errors[0]
    assert "keeps its finished blocks: after the fix, rerun with --resume" in errors[0]
    group = zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")
    assert group.attrs["pipeline"]["status"] == "running"


def _slow_workflow(tmp_path: Path, overwrite: bool) -> str:
    """The demo network on a 1536 x 1536 image: a few seconds per block on two cores."""
    from pipeline.demo import write_demo_data

    write_demo_data(str(tmp_path / "data"), size=1536, seed=0)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "data/image.tif"},
        "model": {"arch": "unet", "depth": 4, "width": 16, "num_classes": 2, "normalize": {"mean": 128.0, "std": 64.0}},
        "tiling": {"tile": 512},
        "output": {"path": "out/demo.zarr", "overwrite": overwrite},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }))  # fmt: skip
    return str(tmp_path / "wf.yaml")


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.2)


def _wait_for_run_id(volume: Path, timeout: float = 120) -> str:
    """The run id of the volume being written, once its group attributes hold it (the arrays
    appear first, the attributes a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return str(zarr.open_group(str(volume), mode="r").attrs["pipeline"]["run_id"])
        except (KeyError, FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise TimeoutError(volume) from None
            time.sleep(0.2)


def test_ctrl_c_prints_one_message_not_worker_tracebacks(tmp_path) -> None:
    wf = _slow_workflow(tmp_path, overwrite=False)
    proc = subprocess.Popen(
        [PIPELINE, "run", wf], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _wait_for(tmp_path / "out" / "demo.zarr" / "0" / "zarr.json")
    time.sleep(2)  # blocks are being computed
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGINT): ")
    assert len(err.strip().splitlines()) <= 5, err
    group = zarr.open_group(str(tmp_path / "out" / "demo.zarr"), mode="r")
    assert group.attrs["pipeline"]["status"] == "running"
    assert not (tmp_path / "out" / ".demo.zarr.lock").exists()  # released on the way out


def test_two_runs_on_one_output_never_interleave(tmp_path) -> None:
    """The second run (overwrite: true) fails clearly while the first holds the output.

    The first run's blocks wait for a gate file, so it still holds the output however fast
    or loaded the machine is; the gate opens once the second run has been refused."""
    from pipeline.demo import write_demo_data

    write_demo_data(str(tmp_path / "data"), size=256, seed=0)
    gate = tmp_path / "gate"
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "data/image.tif"},
        "model": {"arch": "custom", "factory": "tests.helpers:GatedBoxFilter", "num_classes": 2, "halo": 1,
                  "normalize": {"mean": 128.0, "std": 64.0},
                  "kwargs": {"radius": 1, "weight": [[1], [-1]], "gate": str(gate)}},
        "tiling": {"tile": 128},
        "inference": {"torch_threads": 1, "channels_last": False},  # no measuring pass on a worker: it would wait too
        "output": {"path": "out/demo.zarr", "overwrite": True},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }))  # fmt: skip
    wf = str(tmp_path / "wf.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([PIPELINE, "run", wf], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        run_id = _wait_for_run_id(tmp_path / "out" / "demo.zarr")
        for command in ("validate", "run"):
            second = subprocess.run([PIPELINE, command, wf], capture_output=True, text=True, timeout=300, env=env)
            assert second.returncode == 2, second.stderr
            assert "is being written by another run (pid" in second.stderr and "Traceback" not in second.stderr
            assert first.poll() is None  # still running: the refusal was not a race won by luck
    finally:
        gate.touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    group = zarr.open_group(str(tmp_path / "out" / "demo.zarr"), mode="r")
    assert group.attrs["pipeline"]["run_id"] == run_id and group.attrs["pipeline"]["status"] == "complete"
    assert not (tmp_path / "out" / ".demo.zarr.lock").exists()
    # and once it is done, the same workflow may replace it
    again = subprocess.run([PIPELINE, "run", wf], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert zarr.open_group(str(tmp_path / "out" / "demo.zarr"), mode="r").attrs["pipeline"]["run_id"] != run_id


def test_a_failing_block_is_one_summarised_line_without_worker_logs(tmp_path) -> None:
    image = np.zeros((100, 100), np.uint16)
    image[90, 10] = 5000
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    torch.jit.save(torch.jit.script(FailOnBright()), tmp_path / "m.pt")
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "input": {"path": "img.tif"},
        "model": {"arch": "torchscript", "path": "m.pt", "num_classes": 2, "halo": 0},
        "tiling": {"tile": 50},
        "output": {"path": "out.zarr"},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
    }))  # fmt: skip
    proc = _run(["run", str(tmp_path / "wf.yaml")])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if not line.startswith("blocks ")] == [lines[-1]], proc.stderr
    assert lines[-1].startswith("error: block (1, 0) (pixels 50:100, 0:50)") and "corrupt tile" in lines[-1]
    assert "Traceback" not in proc.stderr and "Compute Failed" not in proc.stderr


def _worker_view() -> tuple[str | None, int, str | None, str | None]:
    return (
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        torch.get_num_threads(),
        os.environ.get("OMP_NUM_THREADS"),
        os.environ.get("GLIBC_TUNABLES"),
    )


def test_workers_start_with_the_environment_and_one_gpu_each() -> None:
    """Two workers on a node that shows two GPUs: each narrows to its own before CUDA starts;
    thread counts and allocator settings are in their environment from the start."""
    tunables = "glibc.malloc.mmap_threshold=4294967295"
    cfg = LocalClusterConfig(
        n_workers=2, threads_per_worker=1, environment={"CUDA_VISIBLE_DEVICES": "0,1", "GLIBC_TUNABLES": tunables}
    )
    with connect(cfg, "cpu") as conn:
        seen = conn.client.run(_worker_view)
        names = {a: w["name"] for a, w in conn.client.scheduler_info()["workers"].items()}
    by_name = {names[a]: view for a, view in seen.items()}
    assert by_name[0][0] == "0" and by_name[1][0] == "1"
    torch_threads = conn.shape.torch_threads
    assert all(v[1] == torch_threads and v[2] == str(torch_threads) and v[3] == tunables for v in seen.values())


def _allocator_at_start() -> tuple[bool | None, bool]:
    """In a worker: the check itself, and whether GLIBC_TUNABLES was in the environment the
    process was started with (what the C library read), not only set since."""
    from pipeline.cluster.allocator import allocator_tuned

    with open("/proc/self/environ", "rb") as f:
        at_start = b"GLIBC_TUNABLES=" in f.read()
    return allocator_tuned(), at_start


@pytest.mark.parametrize("allocator", ["tuned", "system"])
def test_the_allocator_settings_are_in_effect_in_the_threads_that_run_blocks(allocator, monkeypatch) -> None:
    """Set where the C library reads them (before the worker process starts): a large block
    allocated by a Dask thread stays off mmap. Distributed's nanny ``env`` comes too late."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with connect(LocalClusterConfig(allocator=allocator), "cpu") as conn:
        tuned, at_start = conn.client.submit(_allocator_at_start, pure=False).result()
        described = conn.describe()
    assert tuned is (allocator == "tuned") and at_start is (allocator == "tuned")
    assert described.get("allocator_tuned_workers", 0) == (1 if allocator == "tuned" else 0)
    assert "GLIBC_TUNABLES" not in os.environ  # the driver's own environment is left as it was


def test_a_cpu_worker_has_a_thread_beyond_its_compute_slots() -> None:
    cores = len(os.sched_getaffinity(0))
    with connect(LocalClusterConfig(), "cpu") as conn:
        workers = conn.client.scheduler_info()["workers"].values()
    assert [w["nthreads"] for w in workers] == [cores + 1]
    assert conn.shape.slots == cores and conn.shape.cores_per_worker == cores


def _fragment_then_release() -> tuple[int, int, int, bool]:
    """In a worker task: 400 MB allocated and freed stay in the heap (the tuned settings);
    released once the process's memory passes a bound below it, not before."""
    from pipeline.cluster.allocator import release_heap_above

    process = psutil.Process()
    before = process.memory_info().rss
    block = np.ones(400 << 20, np.uint8)  # touched: resident
    del block
    kept = process.memory_info().rss
    untouched = release_heap_above(kept + (1 << 30))  # below the bound: nothing released
    released = release_heap_above(before + (100 << 20))
    return before, kept, process.memory_info().rss, released and not untouched


def test_a_worker_gives_back_a_heap_grown_past_its_bound() -> None:
    with connect(LocalClusterConfig(), "cpu") as conn:
        before, kept, after, released = conn.client.submit(_fragment_then_release, pure=False).result()
    assert kept - before > 300 << 20  # freed, but kept for the next pass
    assert released and kept - after > 300 << 20
