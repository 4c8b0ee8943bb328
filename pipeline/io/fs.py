"""The one place that touches files and object stores, through fsspec.

Every path the pipeline reads or writes may be a local path, ``file://``, ``s3://``,
``gs://``, ``az://`` / ``abfs://`` or ``http(s)://`` (read-only). Other modules pass path
strings; this module finds the file system, the storage options and the credentials.

Storage options (what fsspec and ``s3fs.S3FileSystem`` take: ``endpoint_url``, ``anon``,
``profile``, ``requester_pays``, ``client_kwargs``, ``config_kwargs``, ...) come from
:class:`StorageRules`: a default for every URL and overrides per configured path (the
workflow's top-level ``storage_options`` and each section's own). A process applies a set
of rules with :func:`use_rules`; Dask tasks carry theirs and apply them on the worker.
Credentials come from the usual environment, profile or instance metadata unless the
options name them; they are never put into a message: every message goes through
:func:`redact`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import fsspec
import zarr
import zarr.storage
from fsspec.core import url_to_fs
from fsspec.spec import AbstractFileSystem

from ..errors import PipelineError, StorageError

EDGE_BYTES = 1 << 20
READ_ONLY_PROTOCOLS = ("http", "https")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "http": "http", "https": "http"}
# Ranged reads: the first 256 KiB (a TIFF's header, and its IFD when written first) are kept;
# every other read is one GET of exactly its bytes (a tile or strip), with no read-ahead.
READ_BLOCK_BYTES = 256 << 10
# Many small requests in parallel, retried, and an unreachable endpoint found in seconds.
# max_concurrency 1: s3fs otherwise sends a HEAD before every whole-object GET (to split large
# objects into parallel ranges), doubling the requests of every chunk read; the parallelism
# comes from the many tasks.
S3_DEFAULTS: dict[str, Any] = {
    "max_concurrency": 1,
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 3, "mode": "standard"},
        "max_pool_connections": 32,
    },
}
_SECRET_NAME = re.compile(r"secret|password|passwd|token|credential|sas|signature|account_key|^key$|session", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str | os.PathLike[str]) -> bool:
    """A ``scheme://`` path (``file://`` included)."""
    return bool(_URL.match(os.fspath(path)))


def protocol(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    return path.split("://", 1)[0].lower() if is_url(path) else "file"


def is_local(path: str | os.PathLike[str]) -> bool:
    return protocol(path) in ("file", "local")


def local_path(path: str | os.PathLike[str]) -> str:
    """The file-system path of a local path or ``file://`` URL."""
    path = os.fspath(path)
    return path[len("file://") :] if path.lower().startswith("file://") else path


def redact(text: str) -> str:
    """``text`` with any credentials embedded in URLs (``s3://key:secret@bucket``) masked."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def is_secret_name(name: str) -> bool:
    """Whether an option or variable name is one that holds a credential."""
    return bool(_SECRET_NAME.search(name))


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options as they may be recorded: credential values replaced by ``"***"``."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            out[name] = redact_options(value)
        elif is_secret_name(str(name)):
            out[name] = "***"
        else:
            out[name] = redact(value) if isinstance(value, str) else value
    return out


@dataclass(frozen=True)
class StorageRules:
    """Storage options for every URL (``default``) and per path prefix (longest prefix wins).

    Options are kept as JSON text so that the rules are hashable and picklable; their
    ``repr`` shows no values (they may hold credentials).
    """

    default: str = "{}"
    paths: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, default: Mapping[str, Any] | None, paths: Mapping[str, Mapping[str, Any] | None]) -> StorageRules:
        by_path = tuple(sorted((p, json.dumps(dict(o), sort_keys=True)) for p, o in paths.items() if o))
        return cls(json.dumps(dict(default or {}), sort_keys=True), by_path)

    def options_for(self, path: str) -> dict[str, Any]:
        """The options for ``path``: the default, updated by the longest matching prefix's.

        The default is for object stores (where endpoints and credentials are alike): an
        ``http(s)://`` URL gets only the options given for its own path.
        """
        options: dict[str, Any] = {} if protocol(path) in READ_ONLY_PROTOCOLS else json.loads(self.default)
        matches = [(p, o) for p, o in self.paths if path == p or path.startswith(p.rstrip("/") + "/")]
        if matches:
            _, chosen = max(matches, key=lambda m: len(m[0]))
            options = _merged(options, json.loads(chosen))
        return options

    def __repr__(self) -> str:
        return f"StorageRules(<{len(self.paths)} path rule(s)>)"


def _merged(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


_RULES = StorageRules()
_RULES_LOCK = threading.Lock()


def use_rules(rules: StorageRules) -> None:
    """Make ``rules`` this process's storage options (Dask tasks call it with theirs)."""
    global _RULES
    with _RULES_LOCK:
        _RULES = rules


@contextlib.contextmanager
def rules_applied(rules: StorageRules) -> Iterator[None]:
    """``rules`` for the duration of the block, then the previous ones again."""
    previous = active_rules()
    use_rules(rules)
    try:
        yield
    finally:
        use_rules(previous)


def active_rules() -> StorageRules:
    return _RULES


def storage_options(path: str) -> dict[str, Any]:
    """The fsspec options for ``path``: the active rules, with this module's defaults below them."""
    options = _RULES.options_for(path)
    proto = protocol(path)
    if proto in ("s3", "s3a"):
        options = _merged(S3_DEFAULTS, options)
        region = options.pop("region", None)
        if region is not None:
            options = _merged(options, {"client_kwargs": {"region_name": region}})
    return options


def filesystem(path: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec file system of ``path`` and the path within it."""
    path = os.fspath(path)
    if is_local(path):
        return fsspec.filesystem("file"), os.path.abspath(local_path(path))
    try:
        fs, inner = url_to_fs(path, **storage_options(path))
    except ImportError:
        extra = EXTRAS.get(protocol(path))
        hint = f"pip install 'gigaseg-pipeline[{extra}]'" if extra else "install the fsspec implementation for it"
        raise StorageError(f"{redact(path)}: {protocol(path)}:// needs a package that is not installed: {hint}") from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise StorageError(f"{redact(path)}: unknown protocol {protocol(path)}://; expected a path, file://, s3://, gs://, az://, http(s)://") from None
        raise
    return fs, inner


# -- queries ---------------------------------------------------------------------------


def _fresh(path: str) -> tuple[AbstractFileSystem, str]:
    """The store's answer now: workers write the same prefixes, so no listing cached earlier."""
    fs, inner = filesystem(path)
    fs.invalidate_cache(inner)
    return fs, inner


def exists(path: str) -> bool:
    path = os.fspath(path)
    if is_local(path):
        p = local_path(path)
        return os.path.exists(p) or os.path.islink(p)
    fs, inner = _fresh(path)
    return bool(fs.exists(inner))


def is_dir(path: str) -> bool:
    path = os.fspath(path)
    if is_local(path):
        return os.path.isdir(local_path(path))
    fs, inner = _fresh(path)
    return bool(fs.isdir(inner))


def is_file(path: str) -> bool:
    path = os.fspath(path)
    if is_local(path):
        return os.path.isfile(local_path(path))
    fs, inner = _fresh(path)
    return bool(fs.isfile(inner))


def is_symlink(path: str) -> bool:
    path = os.fspath(path)
    return is_local(path) and os.path.islink(local_path(path))


def version_token(path: str) -> str:
    """Changes when the file at ``path`` is replaced: mtime locally, ETag (or mtime) in a store."""
    path = os.fspath(path)
    if is_local(path):
        return str(os.stat(local_path(path)).st_mtime_ns)
    fs, inner = _fresh(path)
    info = fs.info(inner)
    return str(_etag(info) or info.get("mtime") or info.get("LastModified") or info.get("size"))


def _etag(info: Mapping[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "content_md5"):
        if info.get(key):
            return str(info[key]).strip('"')
    return None


def fingerprint(path: str) -> str:
    """``sha256:<hex>`` of a file's size, version and edges, or of a folder's entries.

    A gigapixel input is not hashed whole at every start. A file's fingerprint hashes its
    size, modification time (an object's ETag) and first and last MiB; a folder's (zarr)
    the relative path, size and version of every entry. Rewriting or replacing the input
    changes it; reading it does not.
    """
    path = os.fspath(path)
    digest = hashlib.sha256()
    if is_local(path):
        p = Path(local_path(path))
        if p.is_dir():
            for folder, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    entry = Path(folder) / name
                    st = entry.stat()
                    digest.update(f"{entry.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            return f"sha256:{digest.hexdigest()}"
        st = p.stat()
        digest.update(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
        size = st.st_size
    else:
        fs, inner = _fresh(path)
        if fs.isdir(inner):
            for key, info in sorted(fs.find(inner, detail=True).items()):
                rel = PurePosixPath(key).relative_to(inner.rstrip("/"))
                digest.update(f"{rel}\0{info.get('size')}\0{_etag(info) or info.get('mtime')}\n".encode())
            return f"sha256:{digest.hexdigest()}"
        info = fs.info(inner)
        size = int(info.get("size") or 0)
        digest.update(f"{size}\0{_etag(info) or info.get('mtime') or info.get('LastModified')}\n".encode())
    with open_read(path) as f:
        digest.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return f"sha256:{digest.hexdigest()}"


def glob(pattern: str) -> list[str]:
    """Paths matching ``pattern`` (``**`` recursive), as full URLs for URL patterns, sorted."""
    pattern = os.fspath(pattern)
    if is_local(pattern):
        import glob as globlib

        return sorted(globlib.glob(local_path(pattern), recursive=True))
    fs, inner = _fresh(pattern)
    return sorted(_unstrip(pattern, fs, p) for p in fs.glob(inner))


def files_under(path: str) -> list[str]:
    """Every file under a folder or prefix, recursively, as paths or URLs."""
    path = os.fspath(path)
    if is_local(path):
        root = local_path(path)
        return sorted(str(Path(folder) / name) for folder, _, names in os.walk(root) for name in names)
    fs, inner = _fresh(path)
    return sorted(_unstrip(path, fs, p) for p in fs.find(inner))


def _unstrip(url: str, fs: AbstractFileSystem, inner: str) -> str:
    proto = protocol(url)
    return inner if proto in ("http", "https") else f"{proto}://{inner}"


@dataclass(frozen=True)
class Entry:
    """One entry under a folder or prefix: its relative key (``/``-separated)."""

    key: str
    is_dir: bool = False
    is_link: bool = False


def entries(path: str) -> list[Entry]:
    """Everything under ``path``: local folders with their sub-folders and links, store keys."""
    path = os.fspath(path)
    if is_local(path):
        root = Path(local_path(path))
        found = []
        for folder, dirs, files in os.walk(root):
            rel = Path(folder).relative_to(root)
            for name in dirs + files:
                entry = Path(folder) / name
                found.append(Entry((rel / name).as_posix(), name in dirs, entry.is_symlink()))
            dirs[:] = [d for d in dirs if not (Path(folder) / d).is_symlink()]
        return found
    fs, inner = _fresh(path)
    base = inner.rstrip("/")
    return [Entry(PurePosixPath(k).relative_to(base).as_posix()) for k in fs.find(base)]


def join(path: str, *parts: str) -> str:
    path = os.fspath(path)
    if is_url(path):
        return "/".join([path.rstrip("/"), *parts])
    return str(Path(path).joinpath(*parts))


def parent(path: str) -> str:
    path = os.fspath(path)
    if is_url(path):
        head = path.rstrip("/").rsplit("/", 1)[0]
        return head if "://" in head and head.split("://", 1)[1] else head + "/"
    return str(Path(path).parent)


def name(path: str) -> str:
    path = os.fspath(path)
    return path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else Path(path).name


def stem(path: str) -> str:
    return PurePosixPath(name(path)).stem


def suffix(path: str) -> str:
    return PurePosixPath(name(path)).suffix


def sibling(path: str, new_name: str) -> str:
    """The path of ``new_name`` in the folder (or prefix) holding ``path``."""
    path = os.fspath(path)
    return join(parent(path), new_name) if is_url(path) else str(Path(path).with_name(new_name))


def location(path: str) -> str:
    """A canonical name of ``path``'s place, without credentials: what signatures bind to.

    Local paths resolve links; a URL keeps its endpoint, so the same bucket name on two
    servers is two places.
    """
    path = os.fspath(path)
    if is_local(path):
        return os.path.realpath(local_path(path))
    options = storage_options(path)
    endpoint = options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
    url = bare_url(path)
    return f"{url} at {endpoint}" if endpoint else url


def bare_url(url: str) -> str:
    """``url`` without credentials and without a trailing ``/``: the key it names."""
    return _URL_USERINFO.sub(r"\g<scheme>", url).rstrip("/")


# -- reading ---------------------------------------------------------------------------


def open_read(path: str, block_size: int = READ_BLOCK_BYTES, cache_type: str = "first") -> IO[bytes]:
    """A seekable binary file; in a store each read is a ranged GET, the file's start is cached."""
    path = os.fspath(path)
    if is_local(path):
        return open(local_path(path), "rb")
    fs, inner = filesystem(path)
    return fs.open(inner, "rb", block_size=block_size, cache_type=cache_type)


def read_bytes(path: str) -> bytes:
    path = os.fspath(path)
    if is_local(path):
        return Path(local_path(path)).read_bytes()
    fs, inner = filesystem(path)
    return bytes(fs.cat_file(inner))


def file_sha256(path: str) -> str:
    path = os.fspath(path)
    digest = hashlib.sha256()
    with open_read(path, block_size=8 << 20, cache_type="readahead") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- writing ---------------------------------------------------------------------------


def put_bytes(path: str, data: bytes) -> None:
    """Write a whole file atomically: a reader sees the old bytes or the new, never half.

    Locally through a temporary file and a rename; in a store one PUT is atomic already.
    """
    path = os.fspath(path)
    if is_local(path):
        p = Path(local_path(path))
        p.parent.mkdir(parents=True, exist_ok=True)  # as a store would: keys need no folders
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(p)
        finally:
            tmp.unlink(missing_ok=True)
        return
    _check_writable_protocol(path)
    fs, inner = filesystem(path)
    fs.pipe_file(inner, data)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """A local file to write whole; on success it becomes ``path`` (renamed into place, or
    uploaded to a store), so a reader never sees it half-written. On failure it is removed."""
    path = os.fspath(path)
    if is_local(path):
        final = Path(local_path(path))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    else:
        _check_writable_protocol(path)
        handle, local = tempfile.mkstemp(suffix=f"-{name(path)}")
        os.close(handle)
        tmp = Path(local)
    try:
        yield str(tmp)
        if is_local(path):
            tmp.replace(final)
        else:
            fs, inner = filesystem(path)
            fs.put_file(str(tmp), inner)
    finally:
        tmp.unlink(missing_ok=True)


def remove_file(path: str) -> None:
    path = os.fspath(path)
    if is_local(path):
        Path(local_path(path)).unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(inner)


def remove_keys(path: str, keys: list[str]) -> None:
    """Delete the files ``keys`` (relative, ``/``-separated) under a folder or prefix."""
    path = os.fspath(path)
    if is_local(path):
        root = Path(local_path(path))
        for key in keys:
            (root / key).unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    base = inner.rstrip("/")
    # One DeleteObject per key, in parallel: the batch DeleteObjects call needs a Content-MD5
    # header that botocore >= 1.36 no longer sends, and S3-compatible servers (Swift, older
    # Ceph and MinIO) refuse it without one.
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: _remove_object(fs, f"{base}/{key}"), keys))


def _remove_object(fs: AbstractFileSystem, inner: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(inner)


def remove_empty_folders(path: str) -> list[str]:
    """Remove the empty folders under (and including) a local folder; returns those kept.

    A store has no folders: nothing to do there.
    """
    path = os.fspath(path)
    if not is_local(path):
        return []
    kept = []
    for folder, _, _ in os.walk(local_path(path), topdown=False):
        try:
            Path(folder).rmdir()
        except OSError:
            kept.append(folder)
    return kept


def make_parent_folders(path: str) -> None:
    path = os.fspath(path)
    if is_local(path):
        Path(local_path(path)).parent.mkdir(parents=True, exist_ok=True)


def zarr_store(path: str, read_only: bool) -> zarr.storage.StoreLike:
    """The zarr store of ``path``: a LocalStore, or an FsspecStore whose reads cost one GET per chunk."""
    path = os.fspath(path)
    if is_local(path):
        return zarr.storage.LocalStore(os.path.abspath(local_path(path)), read_only=read_only)
    if not read_only:
        _check_writable_protocol(path)
    return zarr.storage.FsspecStore.from_url(path, storage_options=storage_options(path), read_only=read_only)


def _check_writable_protocol(path: str) -> None:
    if protocol(path) in READ_ONLY_PROTOCOLS:
        raise StorageError(f"{redact(path)}: {protocol(path)}:// is read-only; expected a writable store (s3://, gs://, az://, a local path)")


def check_store_writable(path: str, field: str) -> None:
    """Up front, before anything is written: a writable protocol, a reachable bucket we may list."""
    path = os.fspath(path)
    if protocol(path) in READ_ONLY_PROTOCOLS:
        raise StorageError(
            f"{field}: {redact(path)}: {protocol(path)}:// is read-only; expected a writable "
            f"location (a local path, s3://, gs://, az://)"
        )
    fsys, inner = filesystem(path)
    bucket = inner.split("/", 1)[0]
    with storage_errors(field, path, "write"):
        try:
            if hasattr(fsys, "call_s3"):  # one request, however large the bucket
                fsys.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
            else:
                fsys.ls(bucket, detail=False)
        except FileNotFoundError:
            raise StorageError(f"{field}: {redact(path)}: cannot write: the bucket {bucket!r} does not exist") from None
        fsys.invalidate_cache()


# -- errors ----------------------------------------------------------------------------


@contextlib.contextmanager
def storage_errors(field: str, path: str, doing: str = "read") -> Iterator[None]:
    """Turn a store's failures (credentials, bucket, key, permission, network) into one line.

    The message names the field and the URL (credentials masked) and says what to check.
    """
    try:
        yield
    except StorageError as exc:
        if str(exc).startswith(f"{field}: "):
            raise
        raise StorageError(f"{field}: {exc}") from None
    except PipelineError:
        raise
    except Exception as exc:
        problem = describe_failure(exc)
        if problem is None:
            raise
        raise StorageError(f"{field}: {redact(path)}: cannot {doing}: {problem}") from None


def describe_failure(exc: BaseException) -> str | None:
    """A short, credential-free reason for a storage failure; None if ``exc`` is not one."""
    text = redact(str(exc))
    lowered = text.lower()
    kind = type(exc).__name__
    if any(s in lowered for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "invalidclienttokenid", "invalid access key", "signature we calculated")):
        return "the credentials were refused (wrong access key or secret); check storage_options or the AWS_* environment"
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "specified bucket does not exist" in lowered:
        return "the bucket does not exist"
    if isinstance(exc, PermissionError) or "accessdenied" in lowered or "access denied" in lowered or "forbidden" in lowered:
        return "permission denied (these credentials may not access it)"
    if "nocredentials" in kind.lower() or "unable to locate credentials" in lowered:
        return "no credentials found (set them in storage_options, the AWS_* environment or a profile, or anon: true for a public bucket)"
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) or "nosuchkey" in lowered:
        return "not found"
    connect_words = ("could not connect", "connect timeout", "cannot connect", "connection refused", "name or service not known", "endpoint", "timed out", "timeout")
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError") or any(w in lowered for w in connect_words):
        return "the endpoint cannot be reached (check storage_options.endpoint_url and the network)"
    if isinstance(exc, OSError):
        return text or kind
    return None
