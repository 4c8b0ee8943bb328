"""Names of the images a path, folder, glob or list stands for: what sets pair up by."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr

from pipeline.errors import EvaluationError, PipelineError
from pipeline.io.listing import fixed_folder, glob_name, list_images, names_many


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_a_glob_names_by_what_its_wildcards_matched_so_images_and_masks_pair(tmp_path) -> None:
    parts = [f"Tile {t}/{side}/part_{k}.{ext}" for t in (1, 2) for k in (1, 2) for side, ext in (("images", "jpg"), ("masks", "png"))]
    _touch(tmp_path, *parts, "Tile 1/images/notes.txt")
    images = list_images(f"{tmp_path}/*/images/*.jpg", "input.path")
    masks = list_images(f"{tmp_path}/*/masks/*.png", "evaluation.ground_truth")
    assert sorted(images) == sorted(masks) == ["Tile 1/part_1", "Tile 1/part_2", "Tile 2/part_1", "Tile 2/part_2"]
    assert images["Tile 2/part_1"] == f"{tmp_path}/Tile 2/images/part_1.jpg"
    assert masks["Tile 2/part_1"] == f"{tmp_path}/Tile 2/masks/part_1.png"


def test_a_recursive_glob_and_a_folder_name_by_the_path_below_them(tmp_path) -> None:
    _touch(tmp_path, "a/x.tif", "a/b/y.png", "z.jpg", "readme.md")
    zarr.create_array(str(tmp_path / "a" / "v.zarr"), shape=(4, 4), dtype="uint8")
    expected = {"a/x", "a/b/y", "z", "a/v"}
    assert set(list_images(str(tmp_path), "input.path")) == expected  # a zarr folder is one image
    assert set(list_images(f"{tmp_path}/**/*.tif", "input.path")) == {"a/x"}


def test_a_list_names_by_file_name_and_by_the_path_below_its_common_folder_on_a_clash(tmp_path) -> None:
    _touch(tmp_path, "one/img.tif", "two/img.tif", "two/other.png")
    assert list_images([str(tmp_path / "one/img.tif"), str(tmp_path / "two/other.png")], "input.path") == {
        "img": str(tmp_path / "one/img.tif"),
        "other": str(tmp_path / "two/other.png"),
    }
    named = list_images([str(tmp_path / "one/img.tif"), str(tmp_path / "two/img.tif")], "input.path")
    assert sorted(named) == ["one/img", "two/img"]


def test_sets_that_cannot_be_named_are_errors_naming_the_field(tmp_path) -> None:
    _touch(tmp_path, "a/x.tif", "a/x.png")
    with pytest.raises(EvaluationError, match=r"ground truth: .*a/x.png and .*a/x.tif are both named 'a/x'"):
        list_images(f"{tmp_path}/*/x.*", "ground truth", EvaluationError)  # the suffix is not part of a name
    with pytest.raises(PipelineError, match=r"input.path: no images in .*\*.bmp"):
        list_images(f"{tmp_path}/*.bmp", "input.path")
    with pytest.raises(PipelineError, match=r"input.path: not found: .*missing.tif"):
        list_images([str(tmp_path / "a/x.tif"), str(tmp_path / "missing.tif")], "input.path")
    with pytest.raises(PipelineError, match="input.path: an empty list"):
        list_images([], "input.path")


def test_a_file_whose_name_looks_like_a_glob_is_one_image(tmp_path) -> None:
    _touch(tmp_path, "scan[1].tif")
    path = str(tmp_path / "scan[1].tif")
    assert not names_many(path)
    assert list_images(path, "input.path") == {"scan[1]": path}
    zarr.create_array(str(tmp_path / "v.zarr"), shape=(2, 2), dtype="uint8")
    assert not names_many(str(tmp_path / "v.zarr")) and names_many(str(tmp_path)) and names_many([path])


def test_glob_names_and_fixed_folders() -> None:
    assert glob_name("data/*/img_*.png", "data/t1/img_007.png") == "t1/img_007"
    assert glob_name("data/slice?.tif", "data/slice3.tif") == "slice3"
    assert glob_name("s3://b/tiles/*/labels.tif", "s3://b/tiles/17/labels.tif") == "17"
    assert fixed_folder("s3://b/tiles/*/x_*.tif") == "s3://b/tiles/"
    assert fixed_folder("out/{name}.zarr") == "out/"
    assert fixed_folder("s3://b/one.tif") == "s3://b/one.tif"
    assert fixed_folder("*.tif") == ""
