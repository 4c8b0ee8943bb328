"""Proof that an output was written by this pipeline, by this user: an HMAC signature.

An attribute such as ``pipeline.status`` proves nothing: anyone can write it into any zarr
group. So every record the pipeline writes into its outputs (the ``pipeline`` attributes of
a label volume, which also list the report files written beside it with their SHA-256) is
signed with HMAC-SHA256 under a secret key only this user can read, bound to the output's
resolved location. ``overwrite: true`` deletes or replaces only what verifies.

The key is 32 random bytes in ``$PIPELINE_SIGNING_KEY_FILE`` or, by default,
``~/.config/gigaseg-pipeline/signing.key`` (mode 0600), created on first use. Only the
driver process (the one running ``pipeline run``) signs and verifies; workers never need
it. On a cluster whose login and batch nodes share the home directory, the same key is seen
everywhere; elsewhere, point ``PIPELINE_SIGNING_KEY_FILE`` at the same secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

KEY_ENV = "PIPELINE_SIGNING_KEY_FILE"
SIGNATURE = "signature"
KEY_BYTES = 32


def key_path() -> Path:
    """Where the signing key lives (the environment variable wins)."""
    configured = os.environ.get(KEY_ENV)
    if configured:
        return Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "gigaseg-pipeline" / "signing.key"


def _read_key() -> bytes | None:
    try:
        key = key_path().read_bytes()
    except OSError:
        return None
    return key if len(key) >= KEY_BYTES else None


def _key_for_signing() -> bytes:
    key = _read_key()
    if key is not None:
        return key
    path = key_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(KEY_BYTES)
    try:  # O_EXCL: two first runs at once must not write two different keys
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        existing = _read_key()
        if existing is None:
            raise OSError(f"signing key {path} is unreadable or shorter than {KEY_BYTES} bytes") from None
        return existing
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def _message(record: dict[str, Any], location: str) -> bytes:
    body = {k: v for k, v in record.items() if k != SIGNATURE}
    canonical = json.dumps({"location": location, "record": body}, sort_keys=True, separators=(",", ":"))
    return canonical.encode()


def signed(record: dict[str, Any], location: str) -> dict[str, Any]:
    """``record`` with its signature for ``location`` (a resolved path or URL)."""
    mac = hmac.new(_key_for_signing(), _message(record, location), hashlib.sha256).hexdigest()
    return {**{k: v for k, v in record.items() if k != SIGNATURE}, SIGNATURE: mac}


def verifies(record: object, location: str) -> bool:
    """Whether ``record`` carries a valid signature of this user's key for ``location``."""
    if not isinstance(record, dict) or not isinstance(record.get(SIGNATURE), str):
        return False
    key = _read_key()
    if key is None:
        return False
    expected = hmac.new(key, _message(record, location), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, record[SIGNATURE])


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
