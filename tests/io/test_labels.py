import numpy as np
import pytest
import zarr

from pipeline.errors import OutputExistsError, OutputIncompleteError
from pipeline.geometry import Box
from pipeline.io.labels import (
    check_chunk_aligned,
    create_label_volume,
    label_dtype,
    mark_complete,
    open_label_volume,
    write_block,
)


def test_smallest_unsigned_dtype() -> None:
    assert label_dtype(2) == np.uint8 and label_dtype(256) == np.uint8
    assert label_dtype(257) == np.uint16 and label_dtype(65536) == np.uint16
    assert label_dtype(65537) == np.uint32


def test_volume_is_incomplete_until_marked(tmp_path) -> None:
    path = str(tmp_path / "out.zarr")
    run_id = create_label_volume(path, (100, 70), (64, 64), np.dtype(np.uint8), {"model": "m"}, False)
    group = zarr.open_group(path, mode="r")
    assert group.attrs["pipeline"]["status"] == "running"
    assert group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    with pytest.raises(OutputIncompleteError, match="incomplete"):
        open_label_volume(path)
    write_block(path, run_id, Box((64, 64), (36, 6)), np.full((36, 6), 3, np.uint8))
    mark_complete(path, {"blocks": 4})
    labels = open_label_volume(path)
    assert labels.shape == (100, 70) and labels.chunks == (64, 64) and labels.dtype == np.uint8
    assert labels[99, 69] == 3 and labels[0, 0] == 0
    assert zarr.open_group(path, mode="r").attrs["pipeline"]["blocks"] == 4


def test_existing_output_is_never_touched_without_overwrite(tmp_path) -> None:
    path = str(tmp_path / "out.zarr")
    create_label_volume(path, (8, 8), (8, 8), np.dtype(np.uint8), {}, False)
    with pytest.raises(OutputExistsError, match="already exists .*overwrite: true"):
        create_label_volume(path, (8, 8), (8, 8), np.dtype(np.uint8), {}, False)
    create_label_volume(path, (9, 9), (8, 8), np.dtype(np.uint8), {}, True)
    assert zarr.open_group(path, mode="r")["0"].shape == (9, 9)


def test_overwrite_refuses_folders_that_are_not_ours(tmp_path) -> None:
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("...")
    with pytest.raises(OutputExistsError, match="not a label volume written by this pipeline"):
        create_label_volume(str(precious), (8, 8), (8, 8), np.dtype(np.uint8), {}, True)
    assert (precious / "chapter1.tex").exists()


@pytest.mark.parametrize(
    ("box", "ok"),
    [
        (Box((0, 0), (64, 64)), True),
        (Box((64, 0), (36, 64)), True),  # ends at the array's edge
        (Box((0, 0), (32, 64)), False),  # ends inside a chunk
        (Box((10, 0), (54, 64)), False),  # starts inside a chunk
    ],
)
def test_writes_must_cover_whole_chunks(box, ok) -> None:
    if ok:
        check_chunk_aligned(box, (100, 70), (64, 64))
    else:
        with pytest.raises(ValueError, match="not aligned"):
            check_chunk_aligned(box, (100, 70), (64, 64))
