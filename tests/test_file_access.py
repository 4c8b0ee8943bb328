"""The one file-system layer: outside ``pipeline/io`` no module opens, lists or deletes files.

Reading and writing go through :mod:`pipeline.io.fs`, so every path may be a URL and every
failure becomes one clear message. The import contract keeps zarr, tifffile and fsspec in
``pipeline.io``; this test keeps out the rest: ``open()``, pathlib's file methods, ``os``
file calls, ``shutil``, ``glob`` and ``tempfile``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PATH_METHODS = {
    "read_bytes", "read_text", "write_bytes", "write_text", "unlink", "mkdir", "rmdir", "iterdir",
    "rglob", "glob", "exists", "is_file", "is_dir", "is_symlink", "stat", "lstat", "touch", "open",
    "samefile", "chmod", "symlink_to", "hardlink_to", "readlink",
}  # fmt: skip
OS_CALLS = {"walk", "remove", "unlink", "rename", "replace", "listdir", "scandir", "makedirs", "mkdir",
            "rmdir", "stat", "lstat", "open", "access", "statvfs", "chmod"}  # fmt: skip
OS_PATH_CALLS = {"exists", "isfile", "isdir", "islink", "getsize", "getmtime", "samefile"}
MODULES = {"shutil", "glob", "tempfile", "fcntl"}
# Calls that look like file access but are not (receiver spelled as in the code).
ALLOWED = {
    ("pipeline/models/pt2.py", "reader.read_bytes"),  # a member of the in-memory zip archive
}


def file_access(path: Path) -> list[str]:
    """``line: call`` of every file access in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: import {n}" for n in names if n.split(".")[0] in MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        call = ast.unparse(func)
        if isinstance(func, ast.Name) and func.id == "open":
            found.append(f"{node.lineno}: open()")
        elif isinstance(func, ast.Attribute) and not (isinstance(func.value, ast.Name) and func.value.id == "fs"):
            receiver = ast.unparse(func.value)
            if (
                (receiver == "os" and func.attr in OS_CALLS)
                or (receiver == "os.path" and func.attr in OS_PATH_CALLS)
                or (func.attr in PATH_METHODS and receiver not in ("os", "os.path"))
            ):
                found.append(f"{node.lineno}: {call}")
    rel = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    return [f for f in found if (rel, f.split(": ", 1)[1]) not in ALLOWED]


def test_only_pipeline_io_touches_files() -> None:
    modules = [p for p in (REPO / "pipeline").rglob("*.py") if "io" not in p.relative_to(REPO / "pipeline").parts[:1]]
    assert modules
    offenders = {str(p.relative_to(REPO)): calls for p in modules if (calls := file_access(p))}
    assert offenders == {}, "file access outside pipeline/io: go through pipeline.io.fs"


def test_the_check_finds_file_access(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import shutil\nfrom pathlib import Path\nimport os\n"
        "open('x')\nPath('x').read_text()\nos.walk('.')\nos.path.exists('x')\nfs.exists('x')\n"
    )
    assert sorted(file_access(sample)) == [
        "1: import shutil", "4: open()", "5: Path('x').read_text", "6: os.walk", "7: os.path.exists",
    ]  # fmt: skip
