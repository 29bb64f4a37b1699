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
