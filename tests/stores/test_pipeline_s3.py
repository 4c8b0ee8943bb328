"""`pipeline run` on object stores, the way users run it: inputs, model, truth and output in S3.

The real server is OpenStack Swift with its s3api middleware (``swift_s3``, started by
``cluster/ci/s3-up.sh``); moto's server (``moto_s3``) serves the request-counting test,
behind a proxy that logs every request. Runs go through the ``pipeline`` command in a
subprocess, with a local cluster of worker processes; the reference is the same workflow
on local files, and the box filter on the whole mirrored image.
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
import pytest
import tifffile
import torch
import yaml
import zarr
import zarr.storage

from pipeline.config import UNetConfig
from pipeline.io import fs
from pipeline.io.images import ImageSpec, open_image
from pipeline.models.loading import load_model
from tests.helpers import REPO, box_filter_reference
from tests.stores.conftest import S3Server, new_bucket, remove_bucket
from tests.stores.proxy import CountingProxy

PIPELINE = str(Path(sys.executable).parent / "pipeline")
SHAPE, TILE = (192, 160), 32
BLOCKS = (SHAPE[0] // TILE) * (SHAPE[1] // TILE)
WEIGHT = [[1], [-1]]
MEAN = 100


def _image(shape: tuple[int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 200, shape, dtype=np.uint8)


def _reference() -> np.ndarray:
    centred = _image()[None].astype(np.int64) - MEAN
    return box_filter_reference(centred, 2, np.array(WEIGHT), "reflect").argmax(0)


def _box_model(tmp_path: Path, seconds: float = 0.0) -> dict:
    return {
        "arch": "custom", "factory": "tests.helpers:SlowBoxFilter", "num_classes": 2, "halo": 2,
        "normalize": {"mean": MEAN, "std": 1},
        "kwargs": {"radius": 2, "weight": WEIGHT, "seconds": seconds, "log": str(tmp_path / "forward.log")},
    }  # fmt: skip


def _write_workflow(tmp_path: Path, doc: dict, name: str = "wf.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PIPELINE, *args], capture_output=True, text=True, env=env or _env(), cwd=REPO, timeout=timeout
    )


def _objects(server: S3Server, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (``bucket/key``), by key relative to it."""
    fs = server.filesystem()
    return {key[len(prefix) + 1 :]: fs.cat_file(key) for key in fs.find(prefix, refresh=True)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _volume_data(entries: dict[str, bytes]) -> dict[str, bytes]:
    """The label array and ledger (metadata and chunks): all but the group's own record."""
    return {k: v for k, v in entries.items() if k != "zarr.json"}


@pytest.fixture
def swift_bucket(swift_s3: S3Server):
    name = new_bucket(swift_s3)
    yield name
    remove_bucket(swift_s3, name)


def _s3_options(server: S3Server) -> dict:
    return {"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret}


def test_run_from_s3_tiff_and_zarr_with_s3_model_truth_and_output_equals_the_local_run(
    tmp_path, swift_s3: S3Server, swift_bucket: str
) -> None:
    image = _image()
    truth = (image > 90).astype(np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32), compression="zlib")
    tifffile.imwrite(tmp_path / "truth.tif", truth)
    tifffile.imwrite(tmp_path / "mask.tif", (np.arange(SHAPE[0])[:, None] < 20).repeat(SHAPE[1], 1).astype(np.uint8))
    zarr.create_array(str(tmp_path / "img.zarr"), data=image, chunks=(64, 64))
    cfg = {"arch": "unet", "depth": 2, "width": 4, "num_classes": 2, "normalize": {"mean": MEAN, "std": 40}}
    net = load_model(UNetConfig.model_validate({**cfg, "seed": 7})).module  # weights unlike the seed-0 default
    torch.save(net.state_dict(), tmp_path / "unet.pt")
    fs = swift_s3.filesystem()
    for name in ("img.tif", "truth.tif", "mask.tif", "unet.pt"):
        fs.put_file(str(tmp_path / name), f"{swift_bucket}/in/{name}")
    fs.put(str(tmp_path / "img.zarr"), f"{swift_bucket}/in/img.zarr", recursive=True)

    def doc(image_path: str, model_path: str, truth_path: str, out: str) -> dict:
        return {
            "input": {"path": image_path},
            "model": {**cfg, "path": model_path},
            "tiling": {"tile": TILE},
            "output": {"path": out},
            "evaluation": {"ground_truth": truth_path, "ignore_mask": truth_path.replace("truth", "mask")},
            "cluster": {"n_workers": 2, "threads_per_worker": 1},
        }

    local = _run("run", _write_workflow(tmp_path, doc("img.tif", "unet.pt", "truth.tif", "out/labels.zarr"), "local.yaml"))
    assert local.returncode == 0, local.stderr
    base = f"s3://{swift_bucket}"
    for source, out in (("in/img.tif", "out/tif.zarr"), ("in/img.zarr", "out/zarr.zarr")):
        wf = {
            **doc(f"{base}/{source}", f"{base}/in/unet.pt", f"{base}/in/truth.tif", f"{base}/{out}"),
            "storage_options": _s3_options(swift_s3),
        }
        proc = _run("run", _write_workflow(tmp_path, wf, "s3.yaml"))
        assert proc.returncode == 0, proc.stderr
        stored = _objects(swift_s3, f"{swift_bucket}/{out}")
        assert _volume_data(stored) == _volume_data(_files(tmp_path / "out" / "labels.zarr"))  # byte-identical
        assert json.loads(stored["zarr.json"])["attributes"]["pipeline"]["status"] == "complete"
        stem = out.removesuffix(".zarr")
        report = json.loads(fs.cat_file(f"{swift_bucket}/{stem}.evaluation.json"))
        local_report = json.loads((tmp_path / "out" / "labels.evaluation.json").read_text())
        assert report["pooled"] == local_report["pooled"]
        assert report["pooled"]["pixels_evaluated"] == (SHAPE[0] - 20) * SHAPE[1]  # the ignore mask was read
        assert fs.exists(f"{swift_bucket}/{stem}.run.json") and fs.exists(f"{swift_bucket}/{stem}.preview.png")
        assert not fs.exists(f"{swift_bucket}/.{out.split('/')[-1]}.lock")  # the lock object is gone


def _box_workflow(
    tmp_path: Path, server: S3Server, bucket: str, seconds: float = 0.0, source: str = "img.tif", **output: object
) -> str:
    doc = {
        "input": {"path": f"s3://{bucket}/{source}"},
        "model": _box_model(tmp_path, seconds),
        "tiling": {"tile": TILE},
        "output": {"path": f"s3://{bucket}/out/labels.zarr", **output},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
        "storage_options": _s3_options(server),
    }
    return _write_workflow(tmp_path, doc)


def _upload_image(server: S3Server, bucket: str, tmp_path: Path, image: np.ndarray | None = None) -> None:
    tifffile.imwrite(tmp_path / "img.tif", _image() if image is None else image, tile=(32, 32))
    server.filesystem().put_file(str(tmp_path / "img.tif"), f"{bucket}/img.tif")


def _labels(server: S3Server, bucket: str) -> np.ndarray:
    store = zarr.storage.FsspecStore.from_url(
        f"s3://{bucket}/out/labels.zarr", storage_options=server.storage_options(), read_only=True
    )
    return zarr.open_group(store, mode="r")["0"][:]


def _ledger(server: S3Server, bucket: str) -> int:
    fs = server.filesystem()
    prefix = f"{bucket}/out/labels.zarr/blocks/c"
    return len([k for k in fs.find(prefix, refresh=True)]) if fs.exists(prefix) else 0


def test_driver_killed_on_an_s3_output_then_resume_completes_identically(
    tmp_path, swift_s3: S3Server, swift_bucket: str
) -> None:
    _upload_image(swift_s3, swift_bucket, tmp_path)
    wf = _box_workflow(tmp_path, swift_s3, swift_bucket, seconds=0.3)
    proc = subprocess.Popen(
        [PIPELINE, "run", wf], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
        cwd=REPO, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while _ledger(swift_s3, swift_bucket) < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run wrote no blocks in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # driver and workers: a lost node
    proc.wait(timeout=30)
    done = _ledger(swift_s3, swift_bucket)
    assert 0 < done < BLOCKS
    (tmp_path / "forward.log").unlink(missing_ok=True)
    resumed = _run("run", wf, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume     {done} of {BLOCKS} blocks were written by the interrupted run" in resumed.stdout
    np.testing.assert_array_equal(_labels(swift_s3, swift_bucket), _reference())
    forward = (tmp_path / "forward.log").read_text().splitlines()
    assert len(forward) == BLOCKS - done  # only the missing blocks were computed
    run = json.loads(swift_s3.filesystem().cat_file(f"{swift_bucket}/out/labels.run.json"))
    assert run["status"] == "complete" and run["blocks"]["resumed"] == done


def test_overwrite_on_a_store_deletes_only_our_volume_and_refuses_a_foreign_prefix(
    tmp_path, swift_s3: S3Server, swift_bucket: str
) -> None:
    _upload_image(swift_s3, swift_bucket, tmp_path)
    fs = swift_s3.filesystem()
    fs.pipe_file(f"{swift_bucket}/out/labels.zarr/notes.txt", b"someone else's")
    wf = _box_workflow(tmp_path, swift_s3, swift_bucket, overwrite=True)
    refused = _run("run", wf)
    assert refused.returncode == 2
    assert "exists and is not a label volume this pipeline can prove it wrote" in refused.stderr
    assert fs.cat_file(f"{swift_bucket}/out/labels.zarr/notes.txt") == b"someone else's"
    fs.rm_file(f"{swift_bucket}/out/labels.zarr/notes.txt")
    assert _run("run", wf).returncode == 0
    fs.pipe_file(f"{swift_bucket}/out/labels.zarr/0/extra", b"not ours")
    refused = _run("run", wf)
    assert refused.returncode == 2 and "this pipeline did not write" in refused.stderr
    fs.rm_file(f"{swift_bucket}/out/labels.zarr/0/extra")
    rerun = _run("run", wf)  # overwrite: our own volume goes, by listing its prefix only
    assert rerun.returncode == 0, rerun.stderr
    np.testing.assert_array_equal(_labels(swift_s3, swift_bucket), _reference())


@pytest.mark.parametrize("source", ["img.tif", "img.zarr"])
def test_a_run_reads_the_input_header_a_bounded_number_of_times_and_lists_nothing_per_block(
    source: str, tmp_path, moto_s3: S3Server
) -> None:
    """Two runs, one with 4x the blocks of the other: header reads and listings do not grow.

    The header of a TIFF is its first bytes; a zarr array's is its ``zarr.json``. Every
    block's own reads (tiles or chunks) are single GETs, never a listing.
    """
    counts = {}
    for scale in (1, 2):
        bucket = new_bucket(moto_s3)
        try:
            image = np.random.default_rng(1).integers(0, 200, (96 * scale, 96 * scale), dtype=np.uint8)
            _upload_image(moto_s3, bucket, tmp_path, image)
            if source == "img.zarr":
                zarr.create_array(str(tmp_path / "img.zarr"), data=image, chunks=(32, 32), overwrite=True)
                moto_s3.filesystem().put(str(tmp_path / "img.zarr"), f"{bucket}/img.zarr", recursive=True)
            with CountingProxy(moto_s3.endpoint_url) as proxy:
                server = S3Server(**{**moto_s3.__dict__, "endpoint_url": proxy.url})
                wf = _box_workflow(tmp_path, server, bucket, source=source)
                proc = _run("run", wf)
                assert proc.returncode == 0, proc.stderr
                requests = list(proxy.requests)
            inputs = [r for r in requests if r.path.startswith(f"/{bucket}/{source}")]
            header = [r for r in inputs if (r.path.endswith("zarr.json") if source == "img.zarr" else r.range_start in (None, 0))]
            counts[scale] = {
                "header reads": sum(1 for r in header if r.method == "GET"),
                "existence and version queries": sum(1 for r in inputs if r.method == "HEAD"),
                "listings": sum(1 for r in requests if r.method == "GET" and "list-type=2" in r.query),
                "label chunk writes": sum(
                    1 for r in requests if r.method == "PUT" and r.path.startswith(f"/{bucket}/out/labels.zarr/0/c/")
                ),
            }
        finally:
            remove_bucket(moto_s3, bucket)
    blocks = {scale: (96 * scale // TILE) ** 2 for scale in (1, 2)}
    assert counts[1]["label chunk writes"] == blocks[1] and counts[2]["label chunk writes"] == blocks[2]
    for what in ("header reads", "existence and version queries", "listings"):
        assert counts[2][what] == counts[1][what], (what, counts)  # not per block
    assert counts[2]["header reads"] <= 6, counts  # the driver and each worker process, once or twice


def test_a_region_of_a_tiff_in_a_store_is_read_with_ranged_requests_not_downloaded(tmp_path, moto_s3: S3Server) -> None:
    image = np.random.default_rng(4).integers(0, 255, (2048, 2048), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", image, tile=(256, 256), compression="zlib")
    size = (tmp_path / "big.tif").stat().st_size
    bucket = new_bucket(moto_s3)
    try:
        moto_s3.filesystem().put_file(str(tmp_path / "big.tif"), f"{bucket}/big.tif")
        with CountingProxy(moto_s3.endpoint_url) as proxy:
            options = {"endpoint_url": proxy.url, "key": moto_s3.key, "secret": moto_s3.secret, "skip_instance_cache": True}
            with fs.rules_applied(fs.StorageRules.build(options, {})):
                reader = open_image(ImageSpec(f"s3://{bucket}/big.tif"))
                region = reader.read((slice(1000, 1300), slice(500, 700)))
            np.testing.assert_array_equal(region[0], image[1000:1300, 500:700])
            got = sum(sum(r.sent) for r in proxy.requests if r.method == "GET")
        assert got < size / 4, (got, size, [(r.range_start, r.sent) for r in proxy.requests])  # the header, the offsets and the 4 tiles, not the file
    finally:
        remove_bucket(moto_s3, bucket)


def test_a_sharded_volume_its_pyramid_and_geotiff_export_land_in_the_store_whole(tmp_path, moto_s3: S3Server) -> None:
    bucket = new_bucket(moto_s3)
    try:
        _upload_image(moto_s3, bucket, tmp_path)
        proc = _run("run", _box_workflow(tmp_path, moto_s3, bucket, chunk=16, shard=True, geotiff=True))
        assert proc.returncode == 0, proc.stderr
        keys = [k for k in _objects(moto_s3, f"{bucket}/out/labels.zarr") if k.startswith("0/c/")]
        assert len(keys) == BLOCKS  # one object per block, its 16 x 16 chunks inside
        meta = json.loads(moto_s3.filesystem().cat_file(f"{bucket}/out/labels.zarr/0/zarr.json"))
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [TILE, TILE]
        assert meta["codecs"][0]["name"] == "sharding_indexed"
        assert meta["codecs"][0]["configuration"]["chunk_shape"] == [16, 16]
        np.testing.assert_array_equal(_labels(moto_s3, bucket), _reference())
        fs = moto_s3.filesystem()
        store = zarr.storage.FsspecStore.from_url(
            f"s3://{bucket}/out/labels.zarr", storage_options=moto_s3.storage_options(), read_only=True
        )
        volume = zarr.open_group(store, mode="r")
        levels = [volume[d["path"]][:] for d in volume.attrs["ome"]["multiscales"][0]["datasets"]]
        assert len(levels) > 1 and levels[1].shape == tuple(-(-n // 2) for n in levels[0].shape)
        fs.get_file(f"{bucket}/out/labels.tif", str(tmp_path / "labels.tif"))
        with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
            assert [p.asarray().tolist() for p in tif.pages] == [level.tolist() for level in levels]
        assert sorted(k for k in _objects(moto_s3, f"{bucket}/out") if not k.startswith("labels.zarr/")) == [
            "labels.run.json", "labels.tif",
        ]  # fmt: skip
    finally:
        remove_bucket(moto_s3, bucket)


def test_a_glob_of_images_in_a_store_runs_as_one_set_with_volumes_and_reports_in_the_store(
    tmp_path, moto_s3: S3Server
) -> None:
    bucket = new_bucket(moto_s3)
    store = moto_s3.filesystem()
    try:
        images = {"t1": _image((96, 64)), "t2": _image((64, 128))[::-1].copy()}
        for name, image in images.items():
            tifffile.imwrite(tmp_path / f"{name}.tif", image, tile=(32, 32))
            store.put_file(str(tmp_path / f"{name}.tif"), f"{bucket}/tiles/{name}/img.tif")
            tifffile.imwrite(tmp_path / f"{name}_truth.tif", (image > 100).astype(np.uint8))
            store.put_file(str(tmp_path / f"{name}_truth.tif"), f"{bucket}/truth/{name}.tif")
        doc = {
            "input": {"path": f"s3://{bucket}/tiles/*/img.tif"},
            "model": _box_model(tmp_path),
            "tiling": {"tile": TILE},
            "output": {"path": f"s3://{bucket}/out"},
            "evaluation": {"ground_truth": f"s3://{bucket}/truth/*.tif"},
            "cluster": {"n_workers": 2, "threads_per_worker": 1},
            "storage_options": _s3_options(moto_s3),
        }
        proc = _run("run", _write_workflow(tmp_path, doc))
        assert proc.returncode == 0, proc.stderr
        pooled = np.zeros((2, 2), np.int64)
        for name, image in images.items():
            volume = zarr.storage.FsspecStore.from_url(
                f"s3://{bucket}/out/{name}.zarr", storage_options=moto_s3.storage_options(), read_only=True
            )
            labels = zarr.open_group(volume, mode="r")["0"][:]
            centred = image[None].astype(np.int64) - MEAN
            np.testing.assert_array_equal(labels, box_filter_reference(centred, 2, np.array(WEIGHT), "reflect").argmax(0))
            truth = (image > 100).astype(np.int64)
            pooled += np.bincount(truth.ravel() * 2 + labels.ravel(), minlength=4).reshape(2, 2)
        objects = _objects(moto_s3, f"{bucket}/out")
        report = json.loads(objects["evaluation.json"])
        assert report["pooled"]["confusion_matrix"]["counts"] == pooled.tolist()
        assert json.loads(objects["run.json"])["images"].keys() == {"t1", "t2"}
        assert {k for k in objects if not k.split("/")[0].endswith(".zarr")} == {
            "evaluation.json", "evaluation.csv", "confusion.png", "preview.png", "run.json",
            "t1.run.json", "t2.run.json",
        }  # fmt: skip
    finally:
        remove_bucket(moto_s3, bucket)
