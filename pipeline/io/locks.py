"""One run per output at a time: an exclusive lock beside the output.

``out/slide.zarr`` is locked through ``out/.slide.zarr.lock``, held with ``flock`` by the
process that runs ``pipeline run`` from before it inspects the output until it has marked
it complete (or failed). The kernel drops the lock when that process dies, however it dies,
so a killed run never leaves a stale lock. The file names the holder (host, pid, start time,
run id) for the message a second run prints. ``flock`` works across the clients of NFSv4
and of most cluster file systems (Lustre with ``flock`` mounts, GPFS); object stores get
their own scheme with the store support.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputLockedError


def lock_path(output: str) -> Path:
    p = Path(output)
    return p.with_name(f".{p.name}.lock")


@contextmanager
def output_lock(output: str, field: str = "output.path") -> Iterator[None]:
    """Hold the output's lock for the block; OutputLockedError if another run holds it."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, output, field)
    try:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        try:
            path.unlink()  # while still holding it: the next run creates a fresh file
        except OSError:
            pass
        os.close(fd)


def check_unlocked(output: str, field: str = "output.path") -> None:
    """Raise OutputLockedError if a run holds the output now (for ``validate``)."""
    path = lock_path(output)
    if not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked_error(path, output, field) from None
    finally:
        os.close(fd)


def _acquire(path: Path, output: str, field: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(path, output, field) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder unlinked it between our open and our lock: try again


def _locked_error(path: Path, output: str, field: str) -> OutputLockedError:
    try:
        holder = json.loads(path.read_text() or "{}")
        who = f" (pid {holder['pid']} on {holder['host']}, started {holder['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        who = ""
    return OutputLockedError(
        f"{field}: {output} is being written by another run{who}; wait for it to finish, "
        f"or choose another output path"
    )
