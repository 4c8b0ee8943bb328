"""A real one-node SLURM cluster for the jobqueue and sbatch tests, started by the tests.

``cluster/ci/slurm-up.sh`` installs the Debian packages when they are missing and starts
munge, slurmctld and slurmd (idempotent). As root (CI, this project's machines) a failure
is a test error; elsewhere the SLURM tests are skipped with the script's message.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="session")
def slurm() -> str:
    proc = subprocess.run(
        ["sh", str(REPO / "cluster" / "ci" / "slurm-up.sh")], capture_output=True, text=True, timeout=1200
    )
    if proc.returncode != 0:
        message = f"cluster/ci/slurm-up.sh failed:\n{proc.stdout}\n{proc.stderr}"
        if os.geteuid() == 0 or os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert shutil.which("sbatch") and shutil.which("squeue") and shutil.which("scancel")
    return proc.stdout.strip()
