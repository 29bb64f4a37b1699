"""Frozen backbone features, extracted once and cached on disk.

- `extract`: `extract_features(dataset, config)`, from the cache or computed (single process or torchrun ranks);
  `amp_dtype` / `autocast`, the numeric precision features are computed in;
- `cache`: the cache's layout, key, manifest, lock and staleness checks (what it holds and whether it still holds);
- `images`: the DataLoader side (read, decode, preprocess one image; batches that never straddle a chunk);
- `featureset`: `FeatureSet`, the result, and how chunks become one;
- `job`: one extraction's plan (chunks and their shapes);
- `cli`: `dcmfg features extract`.
"""

from __future__ import annotations

from .cache import CHUNK_SIZE, FORMAT_VERSION, feature_root
from .cli import run_command
from .extract import amp_dtype, autocast, extract_features
from .featureset import FeatureSet

__all__ = ["CHUNK_SIZE", "FORMAT_VERSION", "FeatureSet", "amp_dtype", "autocast", "extract_features",
           "feature_root", "run_command"]
