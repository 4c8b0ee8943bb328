"""The S3 test servers work, and how s3fs reports their errors.

Round trips (s3fs, zarr 3, dask) run against moto and against a real OpenStack Swift with
s3api. The error tests pin down the exception types and messages that s3fs raises, which
the pipeline maps to its own messages; where the two servers differ the test says so.
"""

from __future__ import annotations

import errno

import botocore.exceptions
import dask.array as da
import numpy as np
import pytest
import s3fs
import zarr

from tests.stores.conftest import S3Server, new_bucket, remove_bucket


def test_s3fs_round_trip(s3_server: S3Server, bucket: str) -> None:
    fs = s3_server.filesystem()
    data = bytes(range(256)) * 40
    fs.pipe(f"{bucket}/dir/a.bin", data)
    fs.pipe(f"{bucket}/top.txt", b"top")

    assert fs.cat(f"{bucket}/dir/a.bin") == data
    assert sorted(fs.ls(bucket, detail=False)) == [f"{bucket}/dir", f"{bucket}/top.txt"]
    assert fs.ls(f"{bucket}/dir", detail=False) == [f"{bucket}/dir/a.bin"]
    info = fs.info(f"{bucket}/dir/a.bin")
    assert info["type"] == "file" and info["size"] == len(data)
    assert info["ETag"].strip('"')  # both servers return an ETag and a LastModified
    assert info["LastModified"].tzinfo is not None
    # A second file system (no cache) sees the same.
    assert s3_server.filesystem().find(bucket) == [f"{bucket}/dir/a.bin", f"{bucket}/top.txt"]

    fs.rm_file(f"{bucket}/dir/a.bin")  # DeleteObject: works on both
    assert not fs.exists(f"{bucket}/dir/a.bin")
    assert s3_server.filesystem().find(bucket) == [f"{bucket}/top.txt"]


def test_multipart_upload(s3_server: S3Server, bucket: str) -> None:
    fs = s3_server.filesystem()
    data = np.random.default_rng(0).integers(0, 256, 11 * 2**20, dtype=np.uint8).tobytes()
    with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * 2**20) as f:
        for start in range(0, len(data), 2**20):
            f.write(data[start : start + 2**20])
    assert fs.info(f"{bucket}/big.bin")["size"] == len(data)
    assert s3_server.filesystem().cat(f"{bucket}/big.bin") == data


def test_bulk_delete(s3_server: S3Server, bucket: str) -> None:
    """s3fs ``rm`` (anything but ``rm_file``) sends DeleteObjects. botocore >= 1.36 sends
    it with x-amz-checksum-crc32 and without Content-MD5, which Swift 2.30 refuses; moto
    takes it. With ``content_md5=True`` (the header added by a botocore hook) both delete."""
    fs = s3_server.filesystem()
    fs.pipe({f"{bucket}/p/{i}": b"x" for i in range(3)})
    if s3_server.name == "swift":
        with pytest.raises(OSError) as caught:
            fs.rm(f"{bucket}/p", recursive=True)
        assert caught.value.errno == errno.EINVAL
        assert caught.value.strerror == "Missing required header for this request: Content-MD5"
        assert len(fs.find(bucket, refresh=True)) == 3
        fs = s3_server.filesystem(content_md5=True)
    fs.rm(f"{bucket}/p", recursive=True)
    assert s3_server.filesystem().find(bucket) == []


def test_zarr_round_trip(s3_server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/x.zarr"
    values = np.arange(60 * 70, dtype=np.uint16).reshape(60, 70)
    store = zarr.storage.FsspecStore.from_url(url, storage_options=s3_server.storage_options())
    group = zarr.open_group(store, mode="w")
    array = group.create_array("labels", shape=values.shape, chunks=(32, 32), dtype=values.dtype)
    array[:] = values
    group.attrs["note"] = "written"

    store = zarr.storage.FsspecStore.from_url(
        url, storage_options=s3_server.storage_options(), read_only=True
    )
    group = zarr.open_group(store, mode="r")
    assert group.attrs["note"] == "written"
    np.testing.assert_array_equal(group["labels"][:], values)
    assert group["labels"].chunks == (32, 32)
    keys = s3_server.filesystem().find(f"{bucket}/x.zarr")
    assert f"{bucket}/x.zarr/labels/c/1/1" in keys  # zarr 3 chunk keys, 2 x 3 chunks
    assert f"{bucket}/x.zarr/labels/c/1/2" in keys


def test_dask_round_trip(s3_server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/d.zarr"
    values = np.random.default_rng(1).random((50, 40)).astype(np.float32)
    arr = da.from_array(values, chunks=(16, 16))
    da.to_zarr(arr, url, component="probs", storage_options=s3_server.storage_options())
    back = da.from_zarr(url, component="probs", storage_options=s3_server.storage_options())
    assert back.chunks == arr.chunks
    np.testing.assert_array_equal(back.compute(), values)


def test_readonly_user(swift_s3: S3Server) -> None:
    """On Swift the read-only user lists and reads the admin's buckets, and every write
    is AccessDenied, which s3fs raises as PermissionError("Access Denied.")."""
    bucket = new_bucket(swift_s3)
    try:
        swift_s3.filesystem().pipe(f"{bucket}/k", b"admin")
        reader = swift_s3.filesystem(readonly=True)
        assert reader.ls(bucket, detail=False) == [f"{bucket}/k"]
        assert reader.cat(f"{bucket}/k") == b"admin"
        assert bucket in reader.ls("", detail=False)

        with pytest.raises(PermissionError, match=r"^Access Denied\.$") as caught:
            reader.pipe(f"{bucket}/new", b"reader")
        cause = caught.value.__cause__
        assert isinstance(cause, botocore.exceptions.ClientError)
        assert cause.response["Error"]["Code"] == "AccessDenied"
        assert cause.operation_name == "PutObject"
        with pytest.raises(PermissionError, match=r"^Access Denied\.$"):
            reader.pipe(f"{bucket}/k", b"overwrite")
        with pytest.raises(PermissionError, match=r"^Access Denied\.$"):
            reader.rm_file(f"{bucket}/k")
        with pytest.raises(PermissionError, match=r"^Access Denied\.$"):
            reader.mkdir(f"{bucket}-reader")  # CreateBucket
        assert swift_s3.filesystem().cat(f"{bucket}/k") == b"admin"
        assert swift_s3.filesystem().find(bucket) == [f"{bucket}/k"]
    finally:
        remove_bucket(swift_s3, bucket)


SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method."
)


def test_wrong_secret(s3_server: S3Server, bucket: str) -> None:
    """Swift: PermissionError. A HEAD (``info``, ``cat`` and ``exists`` start with one)
    has no body, so the message is only "Forbidden"; other requests carry the S3 error,
    SignatureDoesNotMatch. moto checks no signature: the request succeeds."""
    s3_server.filesystem().pipe(f"{bucket}/k", b"v")
    wrong = s3_server.filesystem(secret="not-the-secret")
    if not s3_server.enforces_permissions:
        assert wrong.cat(f"{bucket}/k") == b"v"
        return
    with pytest.raises(PermissionError, match=r"^Forbidden$") as caught:
        wrong.cat(f"{bucket}/k")
    assert caught.value.__cause__.response["Error"]["Code"] == "403"
    with pytest.raises(PermissionError) as caught:
        wrong.pipe(f"{bucket}/other", b"v")
    assert str(caught.value) == SIGNATURE_MISMATCH
    assert caught.value.__cause__.response["Error"]["Code"] == "SignatureDoesNotMatch"
    with pytest.raises(PermissionError) as caught:
        wrong.ls(bucket)
    assert str(caught.value) == SIGNATURE_MISMATCH
    # An unknown user (access key) reads the same as a wrong secret.
    with pytest.raises(PermissionError, match=r"^Forbidden$"):
        s3_server.filesystem(key="nobody:nobody").cat(f"{bucket}/k")


def test_missing_bucket_and_key(s3_server: S3Server, bucket: str) -> None:
    """FileNotFoundError on both: "The specified bucket does not exist." (Swift) or
    without the full stop (moto) for a missing bucket; the path for a missing key."""
    fs = s3_server.filesystem()
    missing = f"{bucket}-missing"
    for call in (
        lambda: fs.cat(f"{missing}/k"),
        lambda: fs.ls(missing),
        lambda: fs.pipe(f"{missing}/k", b""),
    ):
        with pytest.raises(
            FileNotFoundError, match=r"^The specified bucket does not exist\.?$"
        ) as caught:
            call()
        assert caught.value.__cause__.response["Error"]["Code"] == "NoSuchBucket"
    for call in (lambda: fs.cat(f"{bucket}/nokey"), lambda: fs.info(f"{bucket}/nokey")):
        with pytest.raises(FileNotFoundError) as caught:
            call()
        assert str(caught.value) == f"{bucket}/nokey"
    with pytest.raises(FileNotFoundError):
        fs.open(f"{bucket}/nokey", "rb")


def test_unreachable_endpoint(s3_server: S3Server) -> None:
    """Not an OSError: botocore's EndpointConnectionError, after botocore's retries
    (about 4 to 7 s with the defaults; one attempt here)."""
    options = s3_server.storage_options(config_kwargs={"retries": {"max_attempts": 1}})
    options["client_kwargs"] = {"endpoint_url": "http://127.0.0.1:1"}
    fs = s3fs.S3FileSystem(**options)
    with pytest.raises(botocore.exceptions.EndpointConnectionError) as caught:
        fs.cat("bucket/key")
    assert (
        str(caught.value)
        == 'Could not connect to the endpoint URL: "http://127.0.0.1:1/bucket/key"'
    )
    assert not isinstance(caught.value, OSError)


def test_conditional_put(s3_server: S3Server, bucket: str) -> None:
    """``pipe_file(mode="create")`` sends If-None-Match: *. moto honours it (the second
    write raises FileExistsError, PreconditionFailed); Swift 2.30's s3api refuses every
    conditional PUT with NotImplemented (OSError ENOSYS) and writes nothing."""
    fs = s3_server.filesystem()
    path = f"{bucket}/once"
    if s3_server.name == "moto":
        fs.pipe_file(path, b"first", mode="create")
        with pytest.raises(FileExistsError) as caught:
            fs.pipe_file(path, b"second", mode="create")
        assert caught.value.__cause__.response["Error"]["Code"] == "PreconditionFailed"
        assert fs.cat(path) == b"first"
    else:
        with pytest.raises(OSError) as caught:
            fs.pipe_file(path, b"first", mode="create")
        assert caught.value.errno == errno.ENOSYS
        assert caught.value.strerror == "Conditional object PUTs are not supported."
        assert caught.value.__cause__.response["Error"]["Code"] == "NotImplemented"
        assert not fs.exists(path)
