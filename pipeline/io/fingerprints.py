"""Cheap, stable fingerprints of the files a run reads, to tell whether they changed.

A gigapixel input is not hashed whole at every start: a file's fingerprint hashes its
size, modification time and first and last MiB; a folder's (zarr) hashes the relative
path, size and modification time of every entry. Replacing, rewriting or touching the
input changes it; reading it does not. Model weights are small: they are hashed whole
(``models.loading.file_sha256``) and recorded in the model identity.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EDGE_BYTES = 1 << 20


def path_fingerprint(path: str) -> str:
    """``sha256:<hex>`` of a file's or folder's size, times and edges (see module doc)."""
    digest = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        for folder, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                entry = Path(folder) / name
                st = entry.stat()
                digest.update(f"{entry.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        st = p.stat()
        digest.update(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
        with open(p, "rb") as f:
            digest.update(f.read(EDGE_BYTES))
            if st.st_size > EDGE_BYTES:
                f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
                digest.update(f.read(EDGE_BYTES))
    return f"sha256:{digest.hexdigest()}"
