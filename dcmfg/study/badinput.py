"""Bad input, tried for real: what a user sees when a file, a folder, an argument or the disk is wrong.

Each case is a corrupted copy of a real MIRFlickr-25K folder (raw layout) or a bad argument, run through the
`dcmfg` command in a subprocess with this Python, in a temporary folder, as a user would run it. `run_cases()`
returns one row a case: the input, the command, its exit code, how many lines it wrote to stderr, the line the user
reads (the last stderr line; the last stdout line when the command succeeded), the seconds it took, and a note
with what the case checks besides (temporary files left, a run replaced, a file written). Nothing is typed:
the table is what the commands did on this machine, today.

    from dcmfg.study.badinput import run_cases
    table = run_cases()                                  # every case
    table = run_cases(["split-duplicates", "help"])       # a few (names: list(CASES))

Cost: one small copy of the data (the images with ids <= `ids`: 40 pairs of the mini subset), one feature extraction
of it and one 1-epoch training run with a small model, shared by the cases that need them, and a smaller copy for the
stale-feature cases; each case is then one command.

The cases are `dcmfg.study.badcases`; the workspace, the subprocess runner and the table are
`dcmfg.study.badharness`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .badcases import CASES, SPLIT_EDITS
from .badharness import COLUMNS, TIMEOUT, copy_mirflickr, find_source, run_table

__all__ = ["CASES", "COLUMNS", "SPLIT_EDITS", "copy_mirflickr", "find_source", "run_cases"]


def run_cases(cases=None, source=None, ids: int = 60, timeout: float = TIMEOUT, keep: Path | None = None) -> pd.DataFrame:
    """Run the bad-input cases (all, or the names in `cases`) and return their table (a pandas DataFrame).

    source: a raw MIRFlickr-25K folder (default: `find_source()`); ids: the copy keeps images 1..ids; keep: a folder
    to work in and leave behind (default: a temporary folder, removed at the end). The DataFrame's attrs hold the
    set-up seconds (the shared copy, extraction and run) and the total.
    """
    return run_table(CASES, cases, source=source, ids=ids, timeout=timeout, keep=keep)
