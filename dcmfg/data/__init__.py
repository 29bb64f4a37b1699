"""Dataset loaders: `load_dataset(name, root, **options)` returns a `CrossModalDataset`.

Each dataset family lives in its own module; the registry maps a name to "module:function" so that importing
dcmfg.data stays cheap and one family's optional dependencies never break another's.
"""

from __future__ import annotations

import importlib

from .base import CrossModalDataset, DatasetError, ImageReadError, LayoutError

# name -> "module:function" taking (root, **options) and returning a CrossModalDataset
LOADERS: dict[str, str] = {
    "mirflickr25k": "dcmfg.data.mirflickr:load_mirflickr",
    "nuswide": "dcmfg.data.nuswide:load_nuswide",
    "synthetic": "dcmfg.data.synthetic:load_synthetic",
    "mscoco": "dcmfg.data.mscoco:load_mscoco",
    "manifest": "dcmfg.data.manifest:load_manifest",
}


def load_dataset(name: str, root=None, **options) -> CrossModalDataset:
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(sorted(LOADERS))}")
    module, func = LOADERS[name].split(":")
    return getattr(importlib.import_module(module), func)(root, **options)


__all__ = ["CrossModalDataset", "DatasetError", "ImageReadError", "LayoutError", "LOADERS", "load_dataset"]
