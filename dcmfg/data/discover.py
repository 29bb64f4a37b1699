"""Which datasets a folder (e.g. DCMFG_DATA) holds, found by layout detection of each sub-folder, and where a
layout may sit under a folder (`dirs_near`, `mat_files`: what the MIRFlickr and NUS-WIDE loaders search).

The study uses this to pick real data when present and fall back to `synthetic` otherwise.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from dcmfg.paths import data_dir

from .base import LayoutError

# dataset name -> (module, detection function returning a truthy layout name for a loadable folder)
DETECTORS: dict[str, tuple[str, str]] = {
    "mirflickr25k": ("dcmfg.data.mirflickr", "detect_layout"),
    "nuswide": ("dcmfg.data.nuswide", "detect_layout"),
    "mscoco": ("dcmfg.data.mscoco", "looks_like_coco"),
    "manifest": ("dcmfg.data.manifest", "looks_like_manifest"),
}
UNLOADABLE = {"features-mat"}  # detected, but cannot feed image/text encoders


def detect(root) -> list[tuple[str, str]]:
    """(dataset name, layout) for every family whose layout `root` holds."""
    found = []
    for name, (module, func) in DETECTORS.items():
        try:
            layout = getattr(importlib.import_module(module), func)(Path(root))
        except (OSError, ValueError):
            layout = None
        if layout and layout not in UNLOADABLE:
            found.append((name, layout if isinstance(layout, str) else "detected"))
    return found


def find_datasets(folder) -> list[tuple[str, Path]]:
    """(name, root) of each dataset under `folder`: each sub-folder is detected; the folder itself if none is."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out += [(name, sub) for name, _ in detect(sub)]
    if not out:
        out = [(name, folder) for name, _ in detect(folder)]
    return out


def default_root(name: str) -> Path:
    """The root of dataset `name` under DCMFG_DATA, for loaders called with root=None."""
    folder = data_dir()
    if folder is None:
        raise LayoutError(f"{name}: no root given and DCMFG_DATA is not set: pass the dataset folder")
    if not Path(folder).is_dir():
        raise LayoutError(f"{name}: no root given and DCMFG_DATA={folder}: folder not found")
    for found, root in find_datasets(folder):
        if found == name:
            return root
    raise LayoutError(f"{name}: no root given and none found under DCMFG_DATA={folder}")


def dataset_folder(name: str, root) -> Path:
    """A loader's root folder: the one given, or the dataset's folder under DCMFG_DATA when root is None."""
    root = default_root(name) if root is None else Path(root)
    check_folder(root)
    return root


def check_folder(root: Path) -> None:
    """A missing folder is a typo in a path, not a folder without a known layout: say which."""
    if not root.exists():
        raise LayoutError(f"{root}: folder not found")
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder")


PREFERENCE = ["mirflickr25k", "nuswide", "mscoco", "manifest"]


def pick_dataset(folder=None) -> tuple[str, Path | None]:
    """The dataset a run should use by default: the first real one under `folder` (default DCMFG_DATA) in the
    order of PREFERENCE, else ("synthetic", None), the procedural fallback."""
    folder = Path(folder) if folder is not None else data_dir()
    found = find_datasets(folder) if folder is not None else []
    for name in PREFERENCE:
        for found_name, root in found:
            if found_name == name:
                return name, root
    return "synthetic", None


def dirs_near(root: Path, depth: int = 2) -> list[Path]:
    """root, its sub-folders and theirs (sorted, hidden ones skipped): where a layout may sit under `root`."""
    found, frontier = [root], [root]
    for _ in range(depth):
        nxt = []
        for d in frontier:
            try:  # scandir's is_dir() uses the directory entry: no stat per file in a 25,000-image folder
                with os.scandir(d) as it:
                    nxt += sorted(Path(e.path) for e in it if not e.name.startswith(".") and e.is_dir())
            except OSError:
                continue
        found += nxt
        frontier = nxt
    return found


def mat_files(root: Path) -> dict[str, Path]:
    """Lower-cased name -> path of the .mat files in root and its sub-folders (depth 1)."""
    out = {}
    for d in dirs_near(root, depth=1):
        try:
            for p in d.iterdir():
                if p.suffix.lower() == ".mat" and p.is_file():
                    out.setdefault(p.name.lower(), p)
        except OSError:
            continue
    return out
