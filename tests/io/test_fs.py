"""The file-system layer: URLs, storage options, redaction, and the same answers locally and in a store."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import StorageError
from pipeline.io import fs
from tests.stores.conftest import S3Server, new_bucket, remove_bucket


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://user:pa55@host.org/a.tif", "https://***@host.org/a.tif"),
        ("see s3://AKIA:SECRET@bucket/k and http://u@h/x", "see s3://***@bucket/k and http://***@h/x"),
        ("s3://bucket/key@2x.tif", "s3://bucket/key@2x.tif"),  # an @ in a key is not a credential
        ("/data/slide.tif", "/data/slide.tif"),
    ],
)
def test_redact_masks_credentials_in_urls_only(text: str, expected: str) -> None:
    assert fs.redact(text) == expected


@given(user=st.text("abcXYZ019-_.%~", min_size=1, max_size=12), secret=st.text("abcXYZ019-_.%~!$&'()*+,;=", min_size=1, max_size=20))
def test_no_userinfo_survives_redaction(user: str, secret: str) -> None:
    shown = fs.redact(f"error reading https://{user}:{secret}@example.org/a.png: 403")
    assert shown == "error reading https://***@example.org/a.png: 403"


def test_redact_options_hides_credential_values_at_any_depth() -> None:
    options = {"key": "AKIA", "secret": "s", "token": "t", "anon": False, "endpoint_url": "https://u:p@h",
               "client_kwargs": {"aws_session_token": "x", "region_name": "eu"}, "account_key": "k"}  # fmt: skip
    shown = fs.redact_options(options)
    assert shown == {
        "key": "***", "secret": "***", "token": "***", "anon": False, "endpoint_url": "https://***@h",
        "client_kwargs": {"aws_session_token": "***", "region_name": "eu"}, "account_key": "***",
    }  # fmt: skip


def test_rules_merge_the_default_with_the_longest_matching_prefix() -> None:
    rules = fs.StorageRules.build(
        {"endpoint_url": "https://a", "client_kwargs": {"region_name": "x"}},
        {"s3://in/slide.tif": {"anon": True}, "s3://in": {"profile": "p"}, "s3://out/v.zarr": {"client_kwargs": {"verify": False}}},
    )  # fmt: skip
    assert rules.options_for("s3://in/slide.tif") == {"endpoint_url": "https://a", "client_kwargs": {"region_name": "x"}, "anon": True}
    assert rules.options_for("s3://in/other.tif")["profile"] == "p"
    assert rules.options_for("s3://out/v.zarr/0/c/1/2")["client_kwargs"] == {"region_name": "x", "verify": False}
    assert rules.options_for("s3://out/v.zarr2") == {"endpoint_url": "https://a", "client_kwargs": {"region_name": "x"}}
    assert rules.options_for("https://h/x.png") == {}  # the default is for object stores
    assert "https://a" not in repr(rules)  # options may hold credentials: never in a repr


def test_s3_defaults_sit_under_the_users_options_and_region_is_translated() -> None:
    with fs.rules_applied(fs.StorageRules.build({"region": "eu-west-1", "config_kwargs": {"connect_timeout": 2}}, {})):
        options = fs.storage_options("s3://b/k")
    assert options["client_kwargs"] == {"region_name": "eu-west-1"}
    assert options["config_kwargs"]["connect_timeout"] == 2
    assert options["config_kwargs"]["retries"] == fs.S3_DEFAULTS["config_kwargs"]["retries"]


@pytest.mark.parametrize(
    ("path", "parent", "name", "sibling"),
    [
        ("s3://b/out/v.zarr", "s3://b/out", "v.zarr", "s3://b/out/v.run.json"),
        ("s3://b/v.zarr/", "s3://b", "v.zarr", "s3://b/v.run.json"),
        ("/data/out/v.zarr", "/data/out", "v.zarr", "/data/out/v.run.json"),
    ],
)
def test_paths_and_urls_split_alike(path: str, parent: str, name: str, sibling: str) -> None:
    assert fs.parent(path) == parent and fs.name(path) == name and fs.stem(path) == "v"
    assert fs.sibling(path, "v.run.json") == sibling


def test_read_only_and_unknown_protocols_are_clear_errors() -> None:
    with pytest.raises(StorageError, match=r"https://\*\*\*@h/o.zarr: https:// is read-only"):
        fs.put_bytes("https://u:p@h/o.zarr", b"x")
    with pytest.raises(StorageError, match="unknown protocol nope://"):
        fs.exists("nope://b/k")
    with pytest.raises(StorageError, match=r"output.path: s3://b/k: cannot read: not found"):
        with fs.storage_errors("output.path", "s3://b/k"):
            raise FileNotFoundError("b/k")


def test_local_put_is_atomic_and_leaves_no_temporary_file(tmp_path) -> None:
    target = tmp_path / "r.json"
    fs.put_bytes(str(target), b"one")
    fs.put_bytes(str(target), b"two")
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["r.json"]


def test_a_file_url_is_a_local_path(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hi")
    url = f"file://{tmp_path}/a.txt"
    assert fs.is_local(url) and fs.exists(url) and fs.read_bytes(url) == b"hi"


@pytest.fixture
def store(moto_s3: S3Server):
    bucket = new_bucket(moto_s3)
    rules = fs.StorageRules.build({"endpoint_url": moto_s3.endpoint_url, "key": moto_s3.key, "secret": moto_s3.secret}, {})
    with fs.rules_applied(rules):
        yield f"s3://{bucket}"
    remove_bucket(moto_s3, bucket)


def test_a_store_answers_like_a_folder(tmp_path, store: str) -> None:
    for root in (str(tmp_path), store):
        fs.put_bytes(fs.join(root, "v.zarr", "zarr.json"), b"{}")
        fs.put_bytes(fs.join(root, "v.zarr", "0", "c", "1", "2"), b"x")
        fs.put_bytes(fs.join(root, "a.tif"), b"A" * (3 << 20))
        assert fs.exists(fs.join(root, "v.zarr")) and fs.is_dir(fs.join(root, "v.zarr"))
        assert fs.is_file(fs.join(root, "a.tif")) and not fs.exists(fs.join(root, "b.tif"))
        keys = sorted(e.key for e in fs.entries(fs.join(root, "v.zarr")) if not e.is_dir)
        assert keys == ["0/c/1/2", "zarr.json"]
        assert [fs.name(p) for p in fs.glob(fs.join(root, "**", "*.tif"))] == ["a.tif"]
        before = fs.fingerprint(fs.join(root, "a.tif"))
        assert before == fs.fingerprint(fs.join(root, "a.tif")) and before.startswith("sha256:")
        folder = fs.fingerprint(fs.join(root, "v.zarr"))
        fs.put_bytes(fs.join(root, "a.tif"), b"B" * (3 << 20))
        assert fs.fingerprint(fs.join(root, "a.tif")) != before
        with fs.open_read(fs.join(root, "a.tif")) as f:
            f.seek(2 << 20)
            assert f.read(4) == b"BBBB"
        fs.remove_keys(fs.join(root, "v.zarr"), ["0/c/1/2"])
        assert fs.fingerprint(fs.join(root, "v.zarr")) != folder
        assert fs.file_sha256(fs.join(root, "v.zarr", "zarr.json")) == fs.file_sha256(fs.join(root, "v.zarr", "zarr.json"))


def test_a_missing_bucket_is_named_before_anything_is_written(store: str) -> None:
    with pytest.raises(StorageError, match="output.path: s3://no-such-bucket-x/v.zarr: cannot write: the bucket 'no-such-bucket-x' does not exist"):
        fs.check_store_writable("s3://no-such-bucket-x/v.zarr", "output.path")
    fs.check_store_writable(f"{store}/v.zarr", "output.path")  # exists: fine


def test_location_binds_signatures_to_the_endpoint_and_drops_credentials(store: str) -> None:
    where = fs.location(f"{store}/v.zarr")
    assert where.startswith(f"{store}/v.zarr at http://127.0.0.1:")
    assert json.dumps(where).count("moto-secret") == 0
