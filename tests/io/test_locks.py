import os
import subprocess
import sys

import pytest

from pipeline.errors import OutputLockedError
from pipeline.io.locks import check_unlocked, lock_path, output_lock


def test_a_second_holder_is_refused_with_the_first_named(tmp_path) -> None:
    out = str(tmp_path / "out" / "v.zarr")
    with output_lock(out):
        assert lock_path(out).exists()
        with pytest.raises(OutputLockedError, match=rf"v.zarr is being written by another run \(pid {os.getpid()} on "):
            with output_lock(out):
                pass
        with pytest.raises(OutputLockedError):
            check_unlocked(out)
    assert not lock_path(out).exists()
    check_unlocked(out)
    with output_lock(out):  # free again
        pass


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path) -> None:
    out = str(tmp_path / "v.zarr")
    code = (
        "import os, sys\n"
        "from pipeline.io.locks import output_lock\n"
        f"with output_lock({out!r}):\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9 and lock_path(out).exists()  # the file stays, the lock does not
    check_unlocked(out)
    with output_lock(out):
        pass
