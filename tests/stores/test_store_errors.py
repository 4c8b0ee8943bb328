"""Store failures as users meet them: one line naming the field and the URL, exit 2, nothing written.

Against the real Swift S3 server: wrong credentials, a missing bucket, a missing key, a
user without write permission, an endpoint nothing listens on (within a bounded time) and
a read-only URL given as the output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from tests.helpers import REPO
from tests.stores.conftest import S3Server, new_bucket, remove_bucket

PIPELINE = str(Path(sys.executable).parent / "pipeline")
UNREACHABLE_SECONDS = 30  # connect timeout 5 s x 3 attempts, and the process start


@pytest.fixture(scope="module")
def input_bucket(swift_s3: S3Server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("store-errors")
    tifffile.imwrite(folder / "img.tif", np.zeros((64, 64), np.uint8), tile=(32, 32))
    name = new_bucket(swift_s3)
    swift_s3.filesystem().put_file(str(folder / "img.tif"), f"{name}/img.tif")
    yield name
    remove_bucket(swift_s3, name)


def _case(name: str, server: S3Server, bucket: str) -> tuple[dict, str, str]:
    """(storage_options, input URL, output URL) of one failure."""
    good = {"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret}
    image, out = f"s3://{bucket}/img.tif", f"s3://{bucket}/out/labels.zarr"
    return {
        "wrong credentials": ({**good, "secret": "not-the-secret"}, image, out),
        "missing bucket": (good, image, "s3://no-such-bucket-here/out/labels.zarr"),
        "missing key": (good, f"s3://{bucket}/no-such-image.tif", out),
        "permission denied": (
            {**good, "key": server.readonly_key, "secret": server.readonly_secret}, image, out
        ),
        "endpoint unreachable": ({**good, "endpoint_url": "http://127.0.0.1:1"}, image, out),
        "read-only output": (good, image, "https://example.org/out/labels.zarr"),
    }[name]


EXPECTED = {
    "wrong credentials": "output.path: s3://{bucket}/out/labels.zarr: cannot write: the credentials were refused",
    "missing bucket": "output.path: s3://no-such-bucket-here/out/labels.zarr: cannot write: the bucket 'no-such-bucket-here' does not exist",
    "missing key": "input.path: file not found: s3://{bucket}/no-such-image.tif",
    "permission denied": "output.path: s3://{bucket}/out/labels.zarr: cannot write: permission denied",
    "endpoint unreachable": "s3://{bucket}/",  # the first URL contacted, input or output
    "read-only output": "output.path: https://example.org/out/labels.zarr: https:// is read-only",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_store_failure_is_one_line_exit_2_and_writes_nothing(
    name: str, tmp_path, swift_s3: S3Server, input_bucket: str
) -> None:
    options, image, out = _case(name, swift_s3, input_bucket)
    doc = {
        "storage_options": options,
        "input": {"path": image},
        "model": {"arch": "unet", "depth": 1, "width": 2, "num_classes": 2},
        "tiling": {"tile": 32},
        "output": {"path": out},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(doc))
    fs = swift_s3.filesystem()
    before = fs.find(input_bucket, refresh=True)
    start = time.monotonic()
    proc = subprocess.run(
        [PIPELINE, "run", str(tmp_path / "wf.yaml")], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    seconds = time.monotonic() - start
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'wf.yaml'}: "), proc.stderr
    assert EXPECTED[name].format(bucket=input_bucket) in lines[0]
    if name == "endpoint unreachable":
        assert "the endpoint cannot be reached" in lines[0] and seconds < UNREACHABLE_SECONDS
    assert "not-the-secret" not in proc.stderr + proc.stdout and swift_s3.readonly_secret not in proc.stderr
    assert fs.find(input_bucket, refresh=True) == before  # no object created
    assert not fs.exists("no-such-bucket-here")
