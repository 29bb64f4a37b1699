"""Where the study's files are: the source checkout (configs/, notebooks/, book/), its notebooks in run order, and
paths as the published book may show them (never the build machine's absolute path)."""

from __future__ import annotations

import os
from pathlib import Path

from dcmfg.paths import data_dir


def repo_dir() -> Path:
    """The source checkout (configs/, notebooks/, book/ live here): this file is dcmfg/study/repo.py in it."""
    return Path(__file__).resolve().parents[2]


def notebook_names() -> list[str]:
    """The study's notebooks in run order (file names without .ipynb)."""
    return sorted(p.stem for p in (repo_dir() / "notebooks").glob("[0-9][0-9]*-*.ipynb"))


def shown_path(path) -> str:
    """A path as the published book may show it: under $DCMFG_DATA, $DCMFG_CACHE, the repository or ~, never the
    build machine's absolute path."""
    text = str(path)
    if not text:
        return text
    p = Path(os.path.expandvars(text)).expanduser()
    places = [("$DCMFG_DATA", data_dir()), ("$DCMFG_CACHE", Path(os.environ["DCMFG_CACHE"]) if os.environ.get("DCMFG_CACHE") else None),
              (".", repo_dir()), ("~", Path.home())]
    for name, root in places:
        if root is None:
            continue
        try:
            rel = p.resolve().relative_to(Path(root).resolve())
        except ValueError:
            continue
        return name if str(rel) == "." else f"{name}/{rel}"
    return text if not p.is_absolute() else p.name
