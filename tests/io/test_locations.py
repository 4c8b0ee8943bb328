import os

import pytest

from pipeline.errors import OutputExistsError, PipelineError
from pipeline.io.locations import check_not_an_input, check_writable


@pytest.fixture
def files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "img.tif").write_bytes(b"image")
    return tmp_path


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("data/img.tif", "is the input"),
        ("data/../data/./img.tif", "is the input"),
        ("link", "is the input"),  # a symbolic link to it
        ("hard", "is the input"),  # a hard link: the same file
        ("data", "contains the input"),
        (".", "contains the input"),
        ("data/img.tif/labels.zarr", "lies inside the input"),
    ],
)
def test_outputs_that_are_hold_or_lie_in_an_input(files, output, message) -> None:
    (files / "link").symlink_to(files / "data" / "img.tif")
    os.link(files / "data" / "img.tif", files / "hard")
    with pytest.raises(OutputExistsError, match=f"output.path: .* {message}"):
        check_not_an_input(str(files / output), "output.path", {"input": str(files / "data" / "img.tif")})


def test_neighbours_and_urls_are_fine(files) -> None:
    inputs = {"input": str(files / "data" / "img.tif"), "model": None, "remote": "s3://b/x.zarr"}
    check_not_an_input(str(files / "data" / "img.zarr"), "output.path", inputs)
    check_not_an_input(str(files / "data" / "img.tif.zarr"), "output.path", inputs)
    check_not_an_input("s3://b/out.zarr", "output.path", inputs)


def test_writable_locations(files) -> None:
    check_writable(str(files / "new" / "deeper" / "out.zarr"), "output.path")
    with pytest.raises(PipelineError, match="data/img.tif is a file, not a folder"):
        check_writable(str(files / "data" / "img.tif" / "out.zarr"), "output.path")
