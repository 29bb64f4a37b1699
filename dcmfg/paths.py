"""Where dcmfg keeps things: one place for the cache and data roots."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Converted weights, feature caches and splits made on the fly live here (never beside the data)."""
    root = os.environ.get("DCMFG_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "dcmfg"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    """The folder named by DCMFG_DATA that holds dataset folders (mirflickr25k/, nuswide/, ...), if set."""
    root = os.environ.get("DCMFG_DATA")
    return Path(root) if root else None
