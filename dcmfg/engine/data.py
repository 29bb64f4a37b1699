"""The data of a run, assembled once for training and evaluation alike: dataset, split, cached features, labels.

`load_data(cfg, run_dir)` reads the dataset the config names, the run's split and the backbone features (extracted
on first use under the config's `features` settings, then cached). A run folder keeps its own copy of the split it
was trained on (`RUN/split.json`; its sha256 goes into the checkpoint's meta.json), and every later use of the run
reads that copy: rewriting the split file the config named cannot change what an old run is scored on. The copy is
written whole or not at all (a failed write is one `WriteFailed` naming it). Splits and their protocols: docs/data.md.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcmfg.config import Config
from dcmfg.data import load_dataset
from dcmfg.data.splits import load_split, make_split, save_split, split_to_json
from dcmfg.errors import ConfigError, writing
from dcmfg.features import extract_features
from dcmfg.fileio import atomic_path, file_sha256

log = logging.getLogger(__name__)

FEATURE_KEYS = ("image_global", "image_regions", "text_global", "text_words", "text_mask")
RUN_SPLIT = "split.json"


@dataclass
class DataBundle:
    """What training and evaluation read: dataset, split, cached features and labels (all items)."""

    dataset: object
    split: object
    feats: dict  # FEATURE_KEYS -> tensors over all items (float16 on disk; converted per batch)
    labels: torch.Tensor  # (N, C) float32
    valid: torch.Tensor  # (N,) bool: items whose features could be extracted
    feature_key: str = ""
    split_sha256: str = ""  # of the split file the run uses (the run's own copy when there is a run folder)
    notes: tuple = ()  # things the user should know about how the data was resolved (one line each)

    def part(self, name: str) -> np.ndarray:
        """A split part's indices, minus items without features (a corrupt image skipped at extraction)."""
        idx = np.asarray(self.split[name], dtype=np.int64)
        return idx[self.valid.numpy()[idx]]

    @property
    def dims(self) -> tuple[int, int, int]:
        """(image feature width, text feature width, number of labels): what a model is built for."""
        return int(self.feats["image_global"].shape[1]), int(self.feats["text_global"].shape[1]), int(self.labels.shape[1])


def load_dataset_of(cfg: Config):
    """The dataset the config names (data.name, data.root, data.options)."""
    d = cfg.data
    if d.name != "synthetic" and d.root is None:
        raise ConfigError(f"data.root is not set for dataset {d.name!r}; pass --set data.root=PATH")
    return load_dataset(d.name, d.root, **(d.options or {}))


def resolve_split(cfg: Config, dataset, run_dir: Path | None = None, *, write: bool = True):
    """The split a run uses, its sha256 and notes for the user.

    - A run folder that holds its own copy: that copy (and a note if data.split now holds something else).
    - Else data.split (copied into the run folder when there is one), or a fresh seeded split per data.protocol
      and sizes (saved into the run folder).
    `write=False` (a DDP rank other than 0, a read-only use) never writes into the run folder.
    """
    d = cfg.data
    own = Path(run_dir) / RUN_SPLIT if run_dir is not None else None
    notes = []
    if own is not None and own.is_file():
        split, sha = load_split(own, dataset), file_sha256(own)
        if d.split and Path(d.split).is_file() and file_sha256(d.split) != sha:
            notes.append(f"{d.split} now holds another split than the one this run was trained on; "
                         f"using the run's own copy {own}")
        return split, sha, notes
    if d.split:
        split = load_split(d.split, dataset)
        if own is not None and write:
            with writing(own), atomic_path(own) as tmp:
                shutil.copyfile(d.split, tmp)  # the bytes as given: the sha256 then names the same file
        return split, file_sha256(d.split), notes
    split = make_split(dataset, protocol=d.protocol, query=d.query, train=d.train, val=d.val, seed=cfg.seed)
    if own is not None and write:
        with writing(own):
            save_split(split, own)
    # save_split writes exactly split_to_json: the same sha256 whether or not a file was written
    return split, hashlib.sha256(split_to_json(split).encode()).hexdigest(), notes


def load_features(cfg: Config, dataset, device="cpu"):
    """The backbone features of every item under cfg.features (from the cache, or extracted and cached)."""
    return extract_features(dataset, cfg.features, device=str(device), progress=cfg.train.progress)


def load_data(cfg: Config, run_dir: Path | None = None, *, device="cpu", write: bool = True) -> DataBundle:
    """Dataset + split (see `resolve_split`) + features + labels."""
    dataset = load_dataset_of(cfg)
    split, sha, notes = resolve_split(cfg, dataset, run_dir, write=write)
    for note in notes:
        log.warning(note)
    fs = load_features(cfg, dataset, device)
    feats = {k: torch.as_tensor(getattr(fs, k)) for k in FEATURE_KEYS}
    valid = torch.as_tensor(fs.valid).bool()
    labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.float32)
    return DataBundle(dataset, split, feats, labels, valid, str(getattr(fs, "key", "")), sha, tuple(notes))


def word_limit(feats: dict, idx) -> int:
    """Word slots actually used by items `idx` (tags are short: most of the max_words slots are padding)."""
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    used = feats["text_mask"][idx].any(0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def take(feats: dict, idx, device="cpu", words: int | None = None) -> dict:
    """Rows `idx` of every feature tensor, as float32 (masks as bool) on `device`; word slots trimmed to
    `words` (default: the last slot any of these items uses), which changes no result and saves most compute."""
    words = word_limit(feats, idx) if words is None else words
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    out = {}
    for k, v in feats.items():
        t = v[idx]
        if k in ("text_words", "text_mask"):
            t = t[:, :words]
        out[k] = t.to(device=device, dtype=torch.bool if k == "text_mask" else torch.float32)
    return out
