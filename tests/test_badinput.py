"""The bad-input table (dcmfg.study.badinput) end to end: real `dcmfg` subprocesses on a corrupted copy of the real subset."""

from __future__ import annotations

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


def test_unknown_case_is_named():
    with pytest.raises(KeyError, match="unknown case.*nope"):
        run_cases(["nope"])
    assert {"ctrl-c", "help", "image-replaced", "split-no-val", "lr-nan"} <= set(CASES)
