import json
import shutil

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import (
    OutputExistsError,
    OutputIncompleteError,
    OutputReplacedError,
    ResumeRefusedError,
)
from pipeline.geometry import Box
from pipeline.io import ownership
from pipeline.io.labels import (
    changed_fingerprints,
    check_chunk_aligned,
    check_output_free,
    create_label_volume,
    delete_label_volume,
    done_blocks,
    foreign_entries,
    label_dtype,
    mark_block_done,
    mark_complete,
    open_label_volume,
    record_reports,
    resume_label_volume,
    write_block,
)


def _volume(path, shape=(8, 8), chunks=(8, 8), overwrite=False, reports=()) -> str:
    return create_label_volume(str(path), shape, chunks, np.dtype(np.uint8), {"model": "m"}, overwrite, reports)


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
    mark_block_done(path, run_id, (1, 1))
    with pytest.raises(OutputIncompleteError, match="3 blocks not recorded as written; the volume stays incomplete"):
        mark_complete(path, run_id, {"blocks": 4})  # never complete with a block missing
    assert done_blocks(path) == {(1, 1)}
    for index in ((0, 0), (0, 1), (1, 0)):
        mark_block_done(path, run_id, index)
    mark_complete(path, run_id, {"blocks": 4})
    labels = open_label_volume(path)
    assert labels.shape == (100, 70) and labels.chunks == (64, 64) and labels.dtype == np.uint8
    assert labels[99, 69] == 3 and labels[0, 0] == 0
    assert zarr.open_group(path, mode="r").attrs["pipeline"]["blocks"] == 4


def test_existing_output_is_never_touched_without_overwrite(tmp_path) -> None:
    path = str(tmp_path / "out.zarr")
    create_label_volume(path, (8, 8), (8, 8), np.dtype(np.uint8), {}, False)
    with pytest.raises(OutputExistsError, match="holds an interrupted run's label volume; rerun with --resume .*overwrite: true"):
        create_label_volume(path, (8, 8), (8, 8), np.dtype(np.uint8), {}, False)
    create_label_volume(path, (9, 9), (8, 8), np.dtype(np.uint8), {}, True)
    assert zarr.open_group(path, mode="r")["0"].shape == (9, 9)


def test_overwrite_refuses_folders_that_are_not_ours(tmp_path) -> None:
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("...")
    with pytest.raises(OutputExistsError, match="not a label volume this pipeline can prove it wrote"):
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


def test_a_foreign_group_with_our_attribute_survives_overwrite(tmp_path) -> None:
    """Anyone can write a `pipeline.status` attribute: it proves nothing."""
    path = tmp_path / "images.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=(8, 8), chunks=(8, 8), dtype="uint8")[:] = 7
    group.attrs["pipeline"] = {"status": "complete", "run_id": "0" * 32, "signature": "f" * 64}
    with pytest.raises(OutputExistsError, match="cannot|not a label volume this pipeline can prove"):
        _volume(path, overwrite=True)
    assert (zarr.open_group(str(path), mode="r")["0"][:] == 7).all()


def test_a_volume_signed_by_another_key_survives_overwrite(tmp_path, monkeypatch) -> None:
    path = tmp_path / "out.zarr"
    _volume(path)
    monkeypatch.setenv(ownership.KEY_ENV, str(tmp_path / "someone-else.key"))
    with pytest.raises(OutputExistsError, match="can prove it wrote"):
        _volume(path, overwrite=True)
    assert (path / "zarr.json").exists()


def test_a_copied_volume_is_not_ours_at_its_new_place(tmp_path) -> None:
    """The signature binds the record to its location: copying zarr.json elsewhere proves nothing."""
    _volume(tmp_path / "a.zarr")
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "b.zarr")
    with pytest.raises(OutputExistsError, match="can prove it wrote"):
        _volume(tmp_path / "b.zarr", overwrite=True)


def test_a_tampered_record_is_not_ours(tmp_path) -> None:
    path = tmp_path / "out.zarr"
    _volume(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["pipeline"]["model"] = "changed"
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(OutputExistsError, match="can prove it wrote"):
        _volume(path, overwrite=True)


@pytest.mark.parametrize("intruder", ["notes.txt", "0/extra.bin", "0/c/9/0", "0/c/1/0/deep", "labels/zarr.json"])
def test_foreign_files_inside_our_volume_stop_the_overwrite(tmp_path, intruder) -> None:
    path = tmp_path / "out.zarr"
    run_id = _volume(path, shape=(16, 16), chunks=(8, 8))
    write_block(str(path), run_id, Box((0, 0), (8, 8)), np.ones((8, 8), np.uint8))
    target = path / intruder
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("keep me")
    with pytest.raises(OutputExistsError, match="did not write"):
        _volume(path, shape=(16, 16), chunks=(8, 8), overwrite=True)
    assert target.read_text() == "keep me"


def test_a_symlink_inside_our_volume_is_foreign(tmp_path) -> None:
    path = tmp_path / "out.zarr"
    _volume(path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("x")
    (path / "0" / "c").mkdir(exist_ok=True)
    (path / "0" / "c" / "0").symlink_to(precious)
    assert str(path / "0" / "c" / "0") in foreign_entries(path)
    with pytest.raises(OutputExistsError):
        _volume(path, overwrite=True)
    assert (precious / "data").exists()


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    chunks=st.tuples(st.integers(1, 16), st.integers(1, 16)),
)
def test_every_chunk_we_write_is_explained_by_the_layout(tmp_path_factory, shape, chunks) -> None:
    path = tmp_path_factory.mktemp("layout") / "out.zarr"
    run_id = _volume(path, shape, chunks)
    for i in range(0, shape[0], chunks[0]):
        for j in range(0, shape[1], chunks[1]):
            box = Box((i, j), (min(chunks[0], shape[0] - i), min(chunks[1], shape[1] - j)))
            write_block(str(path), run_id, box, np.ones(box.shape, np.uint8))
    assert foreign_entries(path) == []
    _volume(path, shape, chunks, overwrite=True)
    assert foreign_entries(path) == []


def test_report_files_follow_the_volume_rule(tmp_path) -> None:
    path = tmp_path / "out.zarr"
    report = tmp_path / "out.evaluation.json"
    report.write_text("{}  # somebody else's")
    with pytest.raises(OutputExistsError, match="report file .* already exists"):
        _volume(path, reports=[report])
    assert not path.exists()
    report.unlink()

    run_id = _volume(path, reports=[report])
    report.write_text('{"ours": true}')
    record_reports(str(path), run_id, [report])
    with pytest.raises(OutputExistsError, match="holds an interrupted run"):
        check_output_free(str(path), False, [report])
    check_output_free(str(path), True, [report])  # ours, unchanged: replaceable
    report.write_text('{"edited": "by hand"}')
    with pytest.raises(OutputExistsError, match="report file .* was not written by the run"):
        _volume(path, overwrite=True, reports=[report])
    assert report.read_text() == '{"edited": "by hand"}'


def test_replacing_a_volume_removes_its_own_old_reports(tmp_path) -> None:
    path = tmp_path / "out.zarr"
    report = tmp_path / "out.evaluation.json"
    run_id = _volume(path)
    report.write_text("{}")
    record_reports(str(path), run_id, [report])
    _volume(path, overwrite=True)  # the new run writes no report
    assert not report.exists()


def test_a_replaced_volume_takes_no_more_writes_of_the_old_run(tmp_path) -> None:
    path = str(tmp_path / "out.zarr")
    old = _volume(path, shape=(16, 8), chunks=(8, 8))
    new = _volume(path, shape=(16, 8), chunks=(8, 8), overwrite=True)
    with pytest.raises(OutputReplacedError, match=f"no longer belongs to run {old[:8]}.*run {new[:8]} replaced it"):
        write_block(path, old, Box((0, 0), (8, 8)), np.ones((8, 8), np.uint8))
    with pytest.raises(OutputReplacedError):
        mark_complete(path, old, {})
    assert zarr.open_group(path, mode="r")["0"][:].max() == 0
    assert zarr.open_group(path, mode="r").attrs["pipeline"]["status"] == "running"


def test_deleting_keeps_a_file_that_appeared_after_the_check(tmp_path) -> None:
    path = tmp_path / "out.zarr"
    run_id = _volume(path, shape=(16, 8), chunks=(8, 8))
    write_block(str(path), run_id, Box((0, 0), (8, 8)), np.ones((8, 8), np.uint8))
    (path / "0" / "c" / "late.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="holds entries this pipeline did not write; they were kept"):
        delete_label_volume(str(path))
    assert (path / "0" / "c" / "late.txt").read_text() == "keep me"
    assert not (path / "0" / "c" / "0" / "0").exists() and not (path / "zarr.json").exists()


FINGERPRINTS = {"pipeline_version": "0.1.0", "input": "sha256:aa", "model_weights": "bb",
                "workflow": {"tiling": {"tile": 64, "mirror": "reflect"}}, "plan": {"block_shape": [64, 64]}}  # fmt: skip


def test_resume_takes_over_the_run_and_its_finished_blocks(tmp_path) -> None:
    path = str(tmp_path / "out.zarr")
    run_id = create_label_volume(path, (100, 70), (64, 64), np.dtype(np.uint8), {"fingerprints": FINGERPRINTS}, False)
    write_block(path, run_id, Box((0, 0), (64, 64)), np.ones((64, 64), np.uint8))
    mark_block_done(path, run_id, (0, 0))
    write_block(path, run_id, Box((64, 0), (36, 64)), np.ones((36, 64), np.uint8))  # cut off before its mark
    assert resume_label_volume(path, FINGERPRINTS) == (run_id, {(0, 0)})  # the unmarked block is redone
    changed = {**FINGERPRINTS, "workflow": {"tiling": {"tile": 32, "mirror": "reflect"}}, "input": "sha256:cc"}
    with pytest.raises(ResumeRefusedError, match=r"input changed \(sha256:aa -> sha256:cc\); workflow.tiling.tile changed \(64 -> 32\)"):
        resume_label_volume(path, changed)
    assert changed_fingerprints(FINGERPRINTS, FINGERPRINTS) == []


def test_resume_refuses_volumes_it_cannot_prove_are_its_own(tmp_path) -> None:
    with pytest.raises(ResumeRefusedError, match="there is no interrupted run to resume"):
        resume_label_volume(str(tmp_path / "none.zarr"), FINGERPRINTS)
    path = tmp_path / "out.zarr"
    _volume(path)
    info = json.loads((path / "zarr.json").read_text())
    info["attributes"]["pipeline"]["fingerprints"] = FINGERPRINTS  # forged: the signature no longer holds
    (path / "zarr.json").write_text(json.dumps(info))
    with pytest.raises(OutputExistsError, match="not a label volume this pipeline can prove it wrote"):
        resume_label_volume(str(path), FINGERPRINTS)


def test_the_ledger_is_part_of_the_layout(tmp_path) -> None:
    path = tmp_path / "out.zarr"
    run_id = _volume(path, shape=(16, 8), chunks=(8, 8))
    mark_block_done(str(path), run_id, (1, 0))
    assert (path / "blocks" / "c" / "1" / "0").is_file() and foreign_entries(path) == []
    (path / "blocks" / "c" / "2").mkdir()  # outside the 2 x 1 block grid
    assert foreign_entries(path) == [str(path / "blocks" / "c" / "2")]
    (path / "blocks" / "c" / "2").rmdir()
    delete_label_volume(str(path))
    assert not path.exists()


def _volume_v2(path, shape=(16, 16), chunks=(8, 8), overwrite=False) -> str:
    return create_label_volume(
        str(path), shape, chunks, np.dtype(np.uint8), {"fingerprints": FINGERPRINTS}, overwrite, ngff="0.4"
    )


@pytest.mark.parametrize("intruder", ["notes.txt", "0/extra.bin", "0/9/0", "0/0/deep", "0/c/0/0", "zarr.json", "blocks/5/0"])
def test_a_zarr_2_volume_explains_every_chunk_and_keeps_foreign_files(tmp_path, intruder) -> None:
    path = tmp_path / "out.zarr"
    run_id = _volume_v2(path)
    assert (path / ".zgroup").is_file() and not (path / "zarr.json").exists()
    for index in ((0, 0), (0, 1), (1, 0), (1, 1)):
        write_block(str(path), run_id, Box((8 * index[0], 8 * index[1]), (8, 8)), np.ones((8, 8), np.uint8))
        mark_block_done(str(path), run_id, index)
    assert (path / "0" / "1" / "1").is_file() and (path / "blocks" / "1" / "1").is_file()  # "/"-separated keys
    assert foreign_entries(path) == []
    assert done_blocks(str(path)) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    target = path / intruder
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("keep me")
    with pytest.raises(OutputExistsError, match="did not write"):
        _volume_v2(path, overwrite=True)
    assert target.read_text() == "keep me"


def test_a_zarr_2_volume_is_resumed_from_its_ledger_and_replaced_whole(tmp_path) -> None:
    path = str(tmp_path / "out.zarr")
    run_id = _volume_v2(path, shape=(100, 70), chunks=(64, 64))
    write_block(path, run_id, Box((0, 0), (64, 64)), np.ones((64, 64), np.uint8))
    mark_block_done(path, run_id, (0, 0))
    assert resume_label_volume(path, FINGERPRINTS) == (run_id, {(0, 0)})
    _volume_v2(path, shape=(100, 70), chunks=(64, 64), overwrite=True)
    assert done_blocks(path) == set() and foreign_entries(path) == []
    assert not (tmp_path / "out.zarr" / "0" / "0" / "0").exists()
