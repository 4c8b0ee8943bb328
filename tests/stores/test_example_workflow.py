"""`workflows/s3-demo.yaml` runs as its comments say: demo data written to the store, run, evaluated.

The workflow file is read from the store too, as a Kubernetes driver job might read it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO
from tests.stores.conftest import S3Server

PIPELINE = str(Path(sys.executable).parent / "pipeline")
BUCKET = "gigaseg-demo"  # the bucket the example names


def test_the_s3_example_workflow_runs_on_the_local_swift_server(swift_s3: S3Server) -> None:
    fs = swift_s3.filesystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    for key in fs.find(BUCKET, refresh=True):
        fs.rm_file(key)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": swift_s3.key,  # as the example says: credentials from the environment
        "AWS_SECRET_ACCESS_KEY": swift_s3.secret,
        "FSSPEC_S3_ENDPOINT_URL": swift_s3.endpoint_url,  # for demo-data, which takes no workflow
    }

    def pipeline(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PIPELINE, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)

    data = pipeline("demo-data", f"s3://{BUCKET}/demo-data", "--size", "512")  # small: the demo is 4096
    assert data.returncode == 0, data.stderr
    fs.put_file(str(REPO / "workflows" / "s3-demo.yaml"), f"{BUCKET}/s3-demo.yaml")
    run = pipeline("run", f"s3://{BUCKET}/s3-demo.yaml")
    assert run.returncode == 0, run.stderr
    assert f"labels     s3://{BUCKET}/out/demo.zarr (complete)" in run.stdout
    report = json.loads(fs.cat_file(f"{BUCKET}/out/demo.evaluation.json"))
    assert report["pooled"]["pixels_evaluated"] == 512 * 512
    assert swift_s3.secret not in run.stdout + run.stderr
