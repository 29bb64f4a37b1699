"""`dcmfg data info | split`: the commands as a user runs them (parsed by the data command's own parser)."""

from __future__ import annotations

import argparse
import re

import pytest

from dcmfg.data import cli


def run(argv: list[str]) -> int:
    """Parse and run like `dcmfg`, printing user errors as one line (as dcmfg.cli.main does)."""
    parser = argparse.ArgumentParser(prog="dcmfg")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_info_real_subset(mirflickr_root, capsys):
    assert run(["data", "info", str(mirflickr_root)]) == 0
    out = capsys.readouterr().out
    assert "mirflickr25k" in out and "layout       raw" in out
    assert "items        730" in out and "dropped_no_tag: 251" in out
    assert "words per item  mean 4.87  median 4  min 1  max 25" in out
    assert re.search(r"\n  people +262 +35\.9%\n", out)  # label frequencies over the 730 cleaned pairs
    run(["data", "info", str(mirflickr_root), "--option", "cleaned=false"])
    out = capsys.readouterr().out
    assert "items        981" in out and re.search(r"\n  people +394 ", out)


def test_split_command_is_byte_stable(tmp_path, capsys):
    argv = ["data", "split", "synthetic", "--protocol", "random", "--query", "0.2", "--val", "0.1", "--seed", "0",
            "--option", "n=120", "--option", "image_size=16"]  # fmt: skip
    run(argv + ["--out", str(tmp_path / "a.json")])
    run(argv + ["--out", str(tmp_path / "b.json")])
    run(argv[:-4] + ["--seed", "1", "--option", "n=120", "--option", "image_size=16", "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "query 24, database 96, train 86, val 10" in out
    a, b, c = ((tmp_path / f"{x}.json").read_bytes() for x in "abc")
    assert a == b != c


def test_split_command_counts_and_errors(tmp_path, mirflickr_root, capsys):
    out = tmp_path / "s.json"
    assert run(["data", "split", "mirflickr25k", "--root", str(mirflickr_root), "--query", "100", "--train", "500",
                "--val", "50", "--out", str(out)]) == 0  # fmt: skip
    assert "query 100, database 630, train 450, val 50" in capsys.readouterr().out
    from dcmfg.data import DatasetError

    with pytest.raises(DatasetError, match=r"query=2000 asked but mirflickr25k \(730 items\) has only 730"):
        run(["data", "split", "mirflickr25k", "--root", str(mirflickr_root), "--query", "2000", "--out", str(out)])
    assert out.exists()  # the earlier file is untouched


def test_info_unknown_folder(tmp_path):
    from dcmfg.data import DatasetError

    with pytest.raises(DatasetError, match="no dataset layout recognised"):
        run(["data", "info", str(tmp_path)])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--query", "0", r"--query 0 leaves the query part empty \(a count must be >= 1\)"),
        ("--query", "0.0", r"--query 0\.0 leaves the query part empty"),
        ("--query", "1.0", r"--query 1\.0 leaves no item for the database and training"),
        ("--train", "0", r"--train 0 leaves no training item"),
        ("--val", "0", r"--val 0 leaves the validation part empty"),
        ("--val", "1.0", r"--val 1\.0 takes the whole training pool"),
        ("--val", "none", r"--val none a size is required"),
    ],
)
def test_split_sizes_that_leave_a_part_empty_are_refused_before_loading(tmp_path, option, value, message):
    """Checked before the dataset is read (the root does not even exist) and before anything is written."""
    from dcmfg.data import DatasetError

    out = tmp_path / "s.json"
    with pytest.raises(DatasetError, match=message):
        run(["data", "split", "mirflickr25k", "--root", str(tmp_path / "missing"), option, value, "--out", str(out)])
    assert not out.exists()


def test_split_fraction_too_small_for_the_data_names_the_option(tmp_path, mirflickr_root):
    from dcmfg.data import DatasetError

    out = tmp_path / "s.json"
    with pytest.raises(DatasetError, match=r"val=0\.0005 gives an empty validation part \(the training pool has 584 items\)"):
        run(["data", "split", "mirflickr25k", "--root", str(mirflickr_root), "--val", "0.0005", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "info", "{missing}"],
        ["data", "info", "{missing}", "--dataset", "mirflickr25k"],
        ["data", "info", "{missing}", "--dataset", "nuswide"],
        ["data", "info", "{missing}", "--dataset", "mscoco"],
        ["data", "info", "{missing}", "--dataset", "manifest"],
        ["data", "split", "mirflickr25k", "--root", "{missing}", "--out", "{out}"],
    ],
)
def test_missing_dataset_folder_is_named_as_not_found(tmp_path, argv):
    from dcmfg.data import DatasetError

    missing = tmp_path / "no-such-folder"
    argv = [a.format(missing=missing, out=tmp_path / "s.json") for a in argv]
    with pytest.raises(DatasetError, match=rf"^{missing}: folder not found"):
        run(argv)


def test_missing_dcmfg_data_folder_is_named(monkeypatch, tmp_path):
    from dcmfg.data import DatasetError, load_dataset

    monkeypatch.setenv("DCMFG_DATA", str(tmp_path / "gone"))
    with pytest.raises(DatasetError, match=rf"mirflickr25k: no root given and DCMFG_DATA={tmp_path / 'gone'}: folder not found"):
        load_dataset("mirflickr25k")
