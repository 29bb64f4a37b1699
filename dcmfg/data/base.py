"""The one dataset type every loader returns, and the errors loaders raise.

A dataset is a list of image-text pairs with multi-hot labels. Images are either files on disk (`image_paths`) or
an in-memory uint8 array (`image_array`, N x H x W x 3, from .mat files); feature extraction streams either through
`image(i)` and `text(i)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


class DatasetError(ValueError):
    """Bad or incomplete dataset input. The message names the file and what is wrong."""


class LayoutError(DatasetError):
    """No supported layout found under a root, or a layout is missing a required file."""


class ImageReadError(DatasetError):
    """An image file is missing or cannot be decoded."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: cannot read image ({reason})")


def read_image_file(path):
    """An image file as an RGB PIL image, decoded now (a truncated file fails here, not later); ImageReadError
    naming the file when it is missing or corrupt."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or not an image: {exc}") from None


@dataclass
class CrossModalDataset:
    name: str
    root: Path
    layout: str
    ids: list[str]
    texts: list[str]
    labels: np.ndarray  # (N, C) uint8, multi-hot
    label_names: list[str]
    image_paths: list[Path] | None = None
    image_array: np.ndarray | None = None  # (N, H, W, 3) uint8, or a lazy h5py-backed array with that shape
    # Rows that share an image (several captions of one image): the same group id. None = one row per image.
    groups: np.ndarray | None = None
    # Counts of what the loader dropped and why (e.g. {"dropped_no_label": 19, "dropped_no_tag": 251}).
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.ids)
        self.labels = np.asarray(self.labels, dtype=np.uint8)
        if self.labels.ndim != 2 or self.labels.shape[0] != n:
            raise DatasetError(f"{self.root}: labels have shape {self.labels.shape}, expected ({n}, C)")
        if self.labels.shape[1] != len(self.label_names):
            raise DatasetError(
                f"{self.root}: {self.labels.shape[1]} label columns but {len(self.label_names)} label names"
            )
        if len(self.texts) != n:
            raise DatasetError(f"{self.root}: {len(self.texts)} texts for {n} items")
        if (self.image_paths is None) == (self.image_array is None):
            raise DatasetError(f"{self.root}: a dataset needs exactly one of image_paths or image_array")
        n_img = len(self.image_paths) if self.image_paths is not None else self.image_array.shape[0]
        if n_img != n:
            raise DatasetError(f"{self.root}: {n_img} images for {n} items")
        if self.groups is not None and len(self.groups) != n:
            raise DatasetError(f"{self.root}: {len(self.groups)} group ids for {n} items")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_labels(self) -> int:
        return self.labels.shape[1]

    def text(self, i: int) -> str:
        return self.texts[i]

    def image_key(self, i: int) -> str:
        """A stable name for item i's image (its path, or its row in the array): used in logs and caches."""
        if self.image_paths is not None:
            return str(self.image_paths[i])
        return f"{self.root}#image[{i}]"

    def image(self, i: int):
        """Item i's image as an RGB PIL image. Raises ImageReadError naming the file for a missing or corrupt one."""
        from PIL import Image

        if self.image_paths is not None:
            return read_image_file(self.image_paths[i])
        arr = np.asarray(self.image_array[i])
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ImageReadError(self.image_key(i), f"array item has shape {arr.shape} {arr.dtype}, expected HxWx3 uint8")
        return Image.fromarray(arr)

    def fingerprint(self) -> str:
        """SHA-256 over what defines the dataset's content: name, ids, texts, labels and label names.

        Split files and feature caches carry it, so they are never used with a different dataset.
        """
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(b"\0".join(s.encode() for s in self.ids))
        h.update(b"\1")
        h.update(b"\0".join(s.encode() for s in self.texts))
        h.update(b"\1")
        h.update(b"\0".join(s.encode() for s in self.label_names))
        h.update(np.ascontiguousarray(self.labels).tobytes())
        if self.groups is not None:
            h.update(np.asarray(self.groups, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        """Counts and per-item statistics for `dcmfg data info` and the data notebook."""

        def describe(x: np.ndarray) -> dict:
            if x.size == 0:
                return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
            return {"mean": float(x.mean()), "median": float(np.median(x)), "min": int(x.min()), "max": int(x.max())}

        words = np.fromiter((len(t.split()) for t in self.texts), dtype=np.int64, count=len(self.texts))
        freq = self.labels.sum(0, dtype=np.int64)
        return {
            "name": self.name,
            "layout": self.layout,
            "root": str(self.root),
            "items": len(self),
            "labels": self.num_labels,
            "fingerprint": self.fingerprint(),
            "stats": dict(self.stats),
            "label_frequency": {n: int(c) for n, c in zip(self.label_names, freq)},
            "labels_per_item": describe(self.labels.sum(1, dtype=np.int64)),
            "words_per_item": describe(words),
            "empty_texts": int((words == 0).sum()),
            "items_without_label": int((self.labels.sum(1) == 0).sum()),
            "groups": None if self.groups is None else int(len(np.unique(self.groups))),
        }

    def subset(self, indices: Sequence[int]) -> "CrossModalDataset":
        idx = np.asarray(indices, dtype=np.int64)
        return CrossModalDataset(
            name=self.name,
            root=self.root,
            layout=self.layout,
            ids=[self.ids[i] for i in idx],
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            label_names=list(self.label_names),
            image_paths=[self.image_paths[i] for i in idx] if self.image_paths is not None else None,
            image_array=_take_rows(self.image_array, idx) if self.image_array is not None else None,
            groups=np.asarray(self.groups)[idx] if self.groups is not None else None,
            stats=dict(self.stats),
        )


def _take_rows(array, idx: np.ndarray):
    """Rows `idx` of an image array: numpy indexes directly; a lazy on-disk array gives a view (no pixels read)."""
    if isinstance(array, np.ndarray):
        return array[idx]
    if hasattr(array, "take_rows"):  # dcmfg.data.matfiles.H5ImageArray
        return array.take_rows(idx)
    # Any other array-like (e.g. an h5py dataset, which wants increasing distinct indices): read what is needed.
    uniq, inverse = np.unique(idx, return_inverse=True)
    return np.asarray(array[uniq.tolist()])[inverse.reshape(-1)]
