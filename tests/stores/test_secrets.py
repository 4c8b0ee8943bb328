"""Credentials never leak: not into logs, messages, reports, run.json or the volume's attributes.

A run reads its image from S3 with credentials from the environment, writes its output
with credentials in ``output.storage_options``, and reads its ground truth over HTTP from
a URL with a password in it. Every line it prints and every object it writes is searched
for each secret, for a successful run, ``pipeline plan``, and a run that fails.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from tests.helpers import REPO
from tests.stores.conftest import S3Server, new_bucket, remove_bucket

PIPELINE = str(Path(sys.executable).parent / "pipeline")
ENV_SECRET = "env-secret-5b1e07c2"
OPTION_SECRET = "option-secret-93d4aa10"
URL_PASSWORD = "url-password-c7f21b"


@pytest.fixture
def http_folder(tmp_path):
    """A plain HTTP server on loopback serving ``tmp_path/http``; it ignores the URL's credentials."""
    folder = tmp_path / "http"
    folder.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, server.server_address[1]
    server.shutdown()
    server.server_close()


def test_no_secret_appears_in_any_output_line_report_record_or_attribute(
    tmp_path, moto_s3: S3Server, http_folder
) -> None:
    folder, port = http_folder
    image = np.random.default_rng(0).integers(0, 255, (96, 96), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(32, 32))
    Image.fromarray((image > 128).astype(np.uint8)).save(folder / "truth.png")
    bucket = new_bucket(moto_s3)
    try:
        moto_s3.filesystem().put_file(str(tmp_path / "img.tif"), f"{bucket}/img.tif")
        doc = {
            "storage_options": {"endpoint_url": moto_s3.endpoint_url},
            "input": {"path": f"s3://{bucket}/img.tif"},
            "model": {"arch": "unet", "depth": 1, "width": 2, "num_classes": 2},
            "tiling": {"tile": 32},
            "output": {
                "path": f"s3://{bucket}/out/labels.zarr",
                "storage_options": {"key": "option-key", "secret": OPTION_SECRET},
            },
            "evaluation": {"ground_truth": f"http://reader:{URL_PASSWORD}@127.0.0.1:{port}/truth.png"},
            "cluster": {"n_workers": 1, "threads_per_worker": 1},
        }
        (tmp_path / "wf.yaml").write_text(yaml.safe_dump(doc))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": ENV_SECRET}

        def pipeline(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [PIPELINE, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
            )

        printed = []
        plan = pipeline("plan", str(tmp_path / "wf.yaml"))
        assert plan.returncode == 0, plan.stderr
        run = pipeline("run", str(tmp_path / "wf.yaml"), "--performance-report", str(tmp_path / "dask.html"))
        assert run.returncode == 0, run.stderr
        assert "http://***@127.0.0.1" in run.stdout  # the URL is shown, its credentials are not
        doc["output"]["path"] = "s3://no-such-bucket-here/labels.zarr"
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
        failed = pipeline("run", str(tmp_path / "bad.yaml"))
        assert failed.returncode == 2
        printed = [p.stdout + p.stderr for p in (plan, run, failed)]
        objects = {key: moto_s3.filesystem().cat_file(key) for key in moto_s3.filesystem().find(bucket, refresh=True)}
        assert f"{bucket}/out/labels.run.json" in objects and f"{bucket}/out/labels.zarr/zarr.json" in objects
        assert f"{bucket}/out/labels.evaluation.json" in objects
        local = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".html", ".json")]
        for secret in (ENV_SECRET, OPTION_SECRET, URL_PASSWORD):
            for text in printed:
                assert secret not in text
            for key, data in objects.items():
                assert secret.encode() not in data, key
            for data in local:
                assert secret.encode() not in data
    finally:
        remove_bucket(moto_s3, bucket)
