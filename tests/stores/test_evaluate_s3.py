"""`pipeline evaluate` on folders and globs in a store: the same statistics as on local files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import REPO
from tests.stores.conftest import S3Server, new_bucket, remove_bucket

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def test_evaluate_pairs_store_folders_and_globs_and_writes_reports_there(tmp_path, moto_s3: S3Server) -> None:
    rng = np.random.default_rng(2)
    for side in ("pred", "truth"):
        for name in ("a/x", "a/y", "b/z"):
            (tmp_path / side / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 3, (40, 50), dtype=np.uint8)).save(tmp_path / side / f"{name}.png")
    (tmp_path / "truth" / "notes.txt").write_text("not an image")
    bucket = new_bucket(moto_s3)
    try:
        fs = moto_s3.filesystem()
        fs.put(str(tmp_path / "pred"), f"{bucket}/pred", recursive=True)
        fs.put(str(tmp_path / "truth"), f"{bucket}/truth", recursive=True)
        options = json.dumps({"endpoint_url": moto_s3.endpoint_url, "key": moto_s3.key, "secret": moto_s3.secret})

        def evaluate(pred: str, truth: str, report: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [PIPELINE, "evaluate", pred, truth, "--num-classes", "3", "--json", report, "--storage-options", options],
                capture_output=True, text=True, cwd=REPO, timeout=300,
            )  # fmt: skip

        local = evaluate(str(tmp_path / "pred"), str(tmp_path / "truth"), str(tmp_path / "local.json"))
        assert local.returncode == 0, local.stderr
        expected = json.loads((tmp_path / "local.json").read_text())
        stored = evaluate(f"s3://{bucket}/pred", f"s3://{bucket}/truth/**/*.png", f"s3://{bucket}/reports/eval.json")
        assert stored.returncode == 0, stored.stderr
        report = json.loads(fs.cat_file(f"{bucket}/reports/eval.json"))
        assert report["pooled"] == expected["pooled"] and report["images"] == 3
        assert sorted(i["name"] for i in report["per_image"]) == ["a/x", "a/y", "b/z"]
        again = evaluate(f"s3://{bucket}/pred", f"s3://{bucket}/truth", f"s3://{bucket}/reports/eval.json")
        assert again.returncode == 2 and "--json: s3://" in again.stderr and "already exists" in again.stderr
        bad = subprocess.run(
            [PIPELINE, "evaluate", f"s3://{bucket}/pred", f"s3://{bucket}/truth", "--storage-options", "[1]"],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
        assert bad.returncode == 2 and "--storage-options: expected a JSON object, got list" in bad.stderr
    finally:
        remove_bucket(moto_s3, bucket)
