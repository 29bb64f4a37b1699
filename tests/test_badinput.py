"""The bad-input table (dcmfg.study.badinput) end to end: real `dcmfg` subprocesses on a corrupted copy of the real subset."""

from __future__ import annotations

import os

import pytest

from dcmfg.study.badinput import CASES, SPLIT_EDITS, run_cases

CHEAP = ["query-0", "query-1.0", "missing-folder", "manifest-dotdot", "split-leak"]


def _check_one_line_errors(table, tmp_path):
    for row in table.to_dict("records"):
        assert row["exit code"] == 2, row
        assert row["stderr lines"] == 1, row  # one line, no traceback
        assert row["user sees"].startswith("dcmfg: error: "), row
        for col in ("command", "user sees", "note"):
            assert str(tmp_path) not in row[col], row  # the book shows no path of the build machine


def test_cheap_cases_are_one_line_errors(tmp_path, mirflickr_root):
    table = run_cases(CHEAP, source=mirflickr_root, keep=tmp_path)
    assert list(table["case"]) == CHEAP
    _check_one_line_errors(table, tmp_path)
    rows = table.set_index("case")
    assert rows.loc["query-0", "user sees"] == "dcmfg: error: --query 0 leaves the query part empty (a count must be >= 1)"
    assert rows.loc["query-1.0", "user sees"].startswith("dcmfg: error: --query 1.0 leaves no item for the database")
    assert rows.loc["query-0", "note"] == rows.loc["query-1.0", "note"] == "nothing written"
    assert rows.loc["missing-folder", "user sees"] == "dcmfg: error: $TMP/no-such-folder: folder not found"
    assert "manifest.jsonl:3: image '../outside.jpg' resolves to $TMP/outside.jpg, outside" in rows.loc["manifest-dotdot", "user sees"]
    assert "split-leak.json: part 'train', position " in rows.loc["split-leak", "user sees"]
    assert "is also in part 'query'" in rows.loc["split-leak", "user sees"]
    assert not (tmp_path / "runs" / "split-leak" / "report.json").exists()
    assert table.attrs["setup_seconds"] >= 0


@pytest.mark.slow
def test_every_split_edit_is_refused(tmp_path, mirflickr_root):
    names = list(SPLIT_EDITS)
    table = run_cases(names, source=mirflickr_root, keep=tmp_path)
    _check_one_line_errors(table, tmp_path)
    for row in table.to_dict("records"):
        assert f"$TMP/splits/{row['case']}.json: " in row["user sees"], row


@pytest.mark.slow  # a feature extraction and three commands (the behaviours have fast unit tests of their own)
def test_issue20_repairs_and_full_disk_are_said_in_one_line(tmp_path, mirflickr_root):
    """A damaged cache chunk is rebuilt with one warning line; a Latin-1 byte in a tag file and a full disk while
    feature chunks are written are one error line each, exit 2 (issue 20)."""
    names = ["chunk-damaged", "tags-not-utf8"] + (["disk-full-features"] if os.geteuid() == 0 else [])
    rows = run_cases(names, source=mirflickr_root, keep=tmp_path).set_index("case")
    damaged = rows.loc["chunk-damaged"]
    assert damaged["exit code"] == 0 and damaged["stderr lines"] == 1, damaged.to_dict()
    assert damaged["user sees"].startswith("WARNING dcmfg.features: $TMP/caches/chunk-damaged/")
    assert damaged["user sees"].endswith("/text-00000.safetensors: damaged (truncated: "
                                         + damaged["note"].split(" cut to ")[1].split(";")[0]
                                         + "; sha256 does not match the manifest); extracting it again")
    assert damaged["note"].endswith("extracted again: the same bytes as before")
    errors = rows.drop(index="chunk-damaged").reset_index()
    _check_one_line_errors(errors, tmp_path)
    assert rows.loc["tags-not-utf8", "user sees"] == (
        "dcmfg: error: $TMP/data/latin1-tags/mirflickr/meta/tags/tags2.txt:2: not UTF-8 text (byte 0xe9 at column 4); "
        "re-save the file as UTF-8")
    if "disk-full-features" in rows.index:
        full = rows.loc["disk-full-features"]
        assert full["user sees"].startswith("dcmfg: error: cannot write $TMP/disk-features/features/")
        assert full["user sees"].endswith("/image-00001.safetensors: [Errno 28] No space left on device")
        assert full["note"] == "kept image-00000.safetensors (in the manifest, bytes as recorded); no temporary file left"


@pytest.mark.slow
def test_issue20_two_writers_and_a_full_disk_under_training(tmp_path, mirflickr_root):
    """A second `dcmfg train` into a running training's folder, and a checkpoint written onto a full disk: one line
    each, exit 2; the second run names the first one's pid, the first run goes on."""
    names = ["two-writers"] + (["disk-full-checkpoint"] if os.geteuid() == 0 else [])
    table = run_cases(names, source=mirflickr_root, keep=tmp_path)
    _check_one_line_errors(table, tmp_path)
    rows = table.set_index("case")
    assert rows.loc["two-writers", "user sees"].startswith("dcmfg: error: run folder $TMP/runs/two-writers is locked by pid ")
    assert rows.loc["two-writers", "note"].startswith("names the first run's pid (")
    assert "went on training and stopped at SIGINT with exit code 130" in rows.loc["two-writers", "note"]
    if "disk-full-checkpoint" in rows.index:
        full = rows.loc["disk-full-checkpoint"]
        assert full["user sees"].startswith("dcmfg: error: cannot write $TMP/disk-run/run/")
        assert "No space left on device" in full["user sees"]
        assert full["note"].endswith("no temporary file left")


def test_unknown_case_is_named():
    with pytest.raises(KeyError, match="unknown case.*nope"):
        run_cases(["nope"])
    assert {"ctrl-c", "help", "image-replaced", "split-no-val", "lr-nan", "chunk-damaged", "tags-not-utf8",
            "disk-full-features", "two-writers", "disk-full-checkpoint"} <= set(CASES)
