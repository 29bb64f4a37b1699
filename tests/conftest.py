"""Shared test set-up: offline hub, a cache outside the repo, and the real MIRFlickr subset when present."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# One cache for the whole run (converted weights, features), never beside the data; CI passes a fresh one.
os.environ.setdefault("DCMFG_CACHE", str(Path(tempfile.gettempdir()) / "dcmfg-test-cache"))

REPO = Path(__file__).resolve().parents[1]


def _find_mirflickr_mini() -> Path | None:
    candidates = []
    if os.environ.get("DCMFG_DATA"):
        candidates.append(Path(os.environ["DCMFG_DATA"]) / "mirflickr-mini")
    candidates.append(REPO.parent / "shared" / "data" / "mirflickr-mini")
    for c in candidates:
        if (c / "mirflickr").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def mirflickr_root() -> Path:
    """The real MIRFlickr-25K subset (official raw layout), read-only."""
    root = _find_mirflickr_mini()
    if root is None:
        pytest.skip("real MIRFlickr subset not found (set DCMFG_DATA to the folder holding mirflickr-mini)")
    return root


def _data_folder() -> Path | None:
    """The folder holding dataset folders: DCMFG_DATA, else the project's shared data (CI)."""
    for c in ([Path(os.environ["DCMFG_DATA"])] if os.environ.get("DCMFG_DATA") else []) + [REPO.parent / "shared" / "data"]:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory):
    """The quick parameter set run once per test session into a temporary book, on the real subset when present:
    (StudyResult, its folder). Every book test reads this one build."""
    from dcmfg import study

    mp = pytest.MonkeyPatch()
    folder = _data_folder()
    if folder is not None:
        mp.setenv("DCMFG_DATA", str(folder))
    else:
        mp.delenv("DCMFG_DATA", raising=False)
    tmp = tmp_path_factory.mktemp("quick")
    result = study.run_study("quick", out_book=tmp / "book", log=lambda *_: None)
    yield result, tmp
    mp.undo()

