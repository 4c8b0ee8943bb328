"""The S3 servers of tests/stores, for the file-system layer's tests of a store."""

from tests.stores.conftest import aws_isolated, moto_s3  # noqa: F401 (fixtures)
