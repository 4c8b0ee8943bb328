"""One run per output at a time: an exclusive lock beside the output.

``out/slide.zarr`` is locked through ``out/.slide.zarr.lock``, held with ``flock`` by the
process that runs ``pipeline run`` from before it inspects the output until it has marked
it complete (or failed). The kernel drops the lock when that process dies, however it dies,
so a killed run never leaves a stale lock. The file names the holder (host, pid, start time,
run id) for the message a second run prints. ``flock`` works across the clients of NFSv4
and of most cluster file systems (Lustre with ``flock`` mounts, GPFS).

An object store has no ``flock``: there the lock is an object ``.slide.zarr.lock`` beside
the output whose holder rewrites a heartbeat time every 20 s and deletes it at the end. A
lock whose heartbeat is older than 90 s (its holder was killed) is taken over. This is
advisory (S3 offers no create-if-absent everywhere): two runs starting within the same
second could both proceed; the volume's ``run_id`` check still keeps them from mixing.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputLockedError
from . import fs

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 90.0


def lock_path(output: str) -> Path:
    p = Path(fs.local_path(output))
    return p.with_name(f".{p.name}.lock")


def store_lock_path(output: str) -> str:
    return fs.sibling(output, f".{fs.name(output)}.lock")


@contextmanager
def output_lock(output: str, field: str = "output.path") -> Iterator[None]:
    """Hold the output's lock for the block; OutputLockedError if another run holds it."""
    if not fs.is_local(output):
        with _store_lock(output, field):
            yield
        return
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
    if not fs.is_local(output):
        _check_store_lock(output, field)
        return
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


def _holder() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "heartbeat": time.time(),
    }


def _check_store_lock(output: str, field: str) -> None:
    path = store_lock_path(output)
    with fs.storage_errors(field, output):
        try:
            holder = json.loads(fs.read_bytes(path))
        except FileNotFoundError:
            return
        except ValueError:
            return  # unreadable: a torn write of a dead holder
    if not isinstance(holder, dict) or time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS:
        return
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
        return
    raise OutputLockedError(
        f"{field}: {fs.redact(output)} is being written by another run (pid {holder.get('pid')} on "
        f"{holder.get('host')}, started {holder.get('started')}); wait for it to finish, or "
        f"choose another output path"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


@contextmanager
def _store_lock(output: str, field: str) -> Iterator[None]:
    _check_store_lock(output, field)
    path = store_lock_path(output)
    holder = _holder()
    with fs.storage_errors(field, output, "write"):
        fs.put_bytes(path, json.dumps(holder).encode())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                fs.put_bytes(path, json.dumps({**holder, "heartbeat": time.time()}).encode())
            except Exception:
                pass  # the next beat tries again; a lost lock only weakens the advice

    thread = threading.Thread(target=beat, name="output-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            fs.remove_file(path)
        except Exception:
            pass
