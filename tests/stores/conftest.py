"""Real S3-compatible object stores for the storage tests, started by the tests.

``swift_s3`` (session): OpenStack Swift with its s3api middleware, from Debian packages,
installed and started by ``cluster/ci/s3-up.sh`` (idempotent; about 3 s from installed
packages, well under a second when already up; it stays up after the tests) on
http://127.0.0.1:18080. As root or with CI=true a failure of the script is a test error;
elsewhere the Swift tests are skipped with the script's message. The credentials come
from the file the script writes (``/run/gigaseg-s3/credentials``).

``moto_s3`` (session): moto's ``ThreadedMotoServer`` in this process, on a free loopback
port; it accepts any credentials and enforces no permissions.

``s3_server`` (function, parametrized): each test using it runs once per server, ids
``moto`` and ``swift``. ``bucket``: a fresh, uniquely named bucket on ``s3_server``,
emptied and removed afterwards.

Both session fixtures yield an ``S3Server``. Its ``storage_options()`` are what s3fs,
fsspec, zarr's ``FsspecStore.from_url`` and dask's ``to_zarr``/``from_zarr`` take.

Swift 2.30 (Debian 12) refuses DeleteObjects without a Content-MD5 header, which botocore
>= 1.36 no longer sends (it sends x-amz-checksum-crc32): every s3fs ``rm`` but
``rm_file`` fails there with ``OSError(EINVAL, "Missing required header for this request:
Content-MD5")``. ``storage_options(content_md5=True)`` passes s3fs an aiobotocore session
that adds the header (see ``content_md5_session``); the session cannot be pickled, so it
is for this process only (not for dask distributed workers).

No real AWS credentials or configuration reach the tests: the ``aws_isolated`` fixture
(session, autouse here) points AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE at
/dev/null, turns off the EC2 metadata lookup and removes the AWS_* variables that name
credentials, profiles, regions or endpoints.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO

S3_UP = REPO / "cluster" / "ci" / "s3-up.sh"
SWIFT_CREDENTIALS = Path("/run/gigaseg-s3/credentials")

# AWS_* variables that would give botocore credentials, a profile, a region or an endpoint.
_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CA_BUNDLE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


@dataclass(frozen=True)
class S3Server:
    """An S3 endpoint and two users.

    name: "swift" or "moto".
    endpoint_url: e.g. "http://127.0.0.1:18080" (path-style, no TLS, region us-east-1).
    key, secret: a user with full access (Swift: ``test:tester``, admin of account test).
    readonly_key, readonly_secret: a user that can list and read the first user's buckets
        but gets AccessDenied (s3fs: PermissionError) on any write (Swift: ``test:reader``).
        moto enforces nothing: there they equal key and secret.
    enforces_permissions: whether the readonly user really is read-only.
    """

    name: str
    endpoint_url: str
    key: str
    secret: str
    readonly_key: str
    readonly_secret: str
    enforces_permissions: bool

    def storage_options(
        self, *, readonly: bool = False, content_md5: bool = False, **extra: Any
    ) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (and fsspec/zarr/dask ``storage_options``)."""
        options: dict[str, Any] = {
            "key": self.readonly_key if readonly else self.key,
            "secret": self.readonly_secret if readonly else self.secret,
            # No region_name: with one, s3fs's mkdir sends LocationConstraint=us-east-1,
            # which moto (like AWS) refuses with InvalidLocationConstraint.
            "client_kwargs": {"endpoint_url": self.endpoint_url},
            "skip_instance_cache": True,
        }
        if content_md5:
            options["session"] = content_md5_session()
        options.update(extra)
        return options

    def filesystem(self, *, readonly: bool = False, content_md5: bool = False, **extra: Any):
        """A new ``s3fs.S3FileSystem`` (no instance cache) for this server."""
        import s3fs

        return s3fs.S3FileSystem(
            **self.storage_options(readonly=readonly, content_md5=content_md5, **extra)
        )


def _add_content_md5(params: dict[str, Any], **_: Any) -> None:
    body = params["body"]
    if isinstance(body, str):
        body = body.encode()
    params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def content_md5_session():
    """An aiobotocore session whose S3 clients send Content-MD5 with DeleteObjects."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.register("before-call.s3.DeleteObjects", _add_content_md5)
    return session


@functools.cache
def _admin_filesystem(server: S3Server):
    # One per server for creating and removing buckets: a new S3FileSystem costs about
    # 0.2 s (botocore loads the S3 service model for each new session).
    return server.filesystem()


def new_bucket(server: S3Server) -> str:
    """Creates a fresh, uniquely named bucket on ``server`` and returns its name."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    _admin_filesystem(server).mkdir(name)
    return name


def remove_bucket(server: S3Server, name: str) -> None:
    """Deletes every object in bucket ``name``, then the bucket (one request per object:
    DeleteObjects needs ``content_md5`` on Swift, and this works without it)."""
    fs = _admin_filesystem(server)
    for path in fs.find(name, refresh=True):
        fs.rm_file(path)
    fs.rmdir(name)
    fs.invalidate_cache()


@pytest.fixture(scope="session", autouse=True)
def aws_isolated() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for variable in _AWS_VARIABLES:
            mp.delenv(variable, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="session")
def swift_s3(aws_isolated) -> S3Server:
    proc = subprocess.run(
        ["bash", str(S3_UP)], capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        message = f"cluster/ci/s3-up.sh failed:\n{proc.stdout}\n{proc.stderr}"
        if os.geteuid() == 0 or os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = _read_env_file(SWIFT_CREDENTIALS)
    return S3Server(
        name="swift",
        endpoint_url=env["S3_ENDPOINT_URL"],
        key=env["S3_ACCESS_KEY_ID"],
        secret=env["S3_SECRET_ACCESS_KEY"],
        readonly_key=env["S3_READONLY_ACCESS_KEY_ID"],
        readonly_secret=env["S3_READONLY_SECRET_ACCESS_KEY"],
        enforces_permissions=True,
    )


@pytest.fixture(scope="session")
def moto_s3(aws_isolated) -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(
            name="moto",
            endpoint_url=f"http://{host}:{port}",
            key="moto-key",
            secret="moto-secret",
            readonly_key="moto-key",
            readonly_secret="moto-secret",
            enforces_permissions=False,
        )
    finally:
        server.stop()


@pytest.fixture(params=["moto", "swift"])
def s3_server(request) -> S3Server:
    """Each test that uses it runs against moto and against Swift."""
    return request.getfixturevalue(f"{request.param}_s3")


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh bucket on ``s3_server``, removed with its contents afterwards."""
    name = new_bucket(s3_server)
    yield name
    remove_bucket(s3_server, name)
