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
