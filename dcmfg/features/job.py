"""One extraction as one object: the dataset, its cache folder and key, the encoders, and the chunk plan.

The plan cuts the distinct images (one per caption group) and the items (texts) into chunks of `chunk_size`, in
row order: `("image", i, start, stop)` for each image chunk, then `("text", i, start, stop)`. Chunk `i` of a kind
is the file `<kind>-<i:05d>.safetensors` of the cache (see `dcmfg.features.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dcmfg.data.base import CrossModalDataset
from dcmfg.data.captions import group_units


def image_units(dataset: CrossModalDataset) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose image is encoded (the first row of each group) and, per row, the index of its image."""
    n = len(dataset)
    if dataset.groups is None:
        return np.arange(n), np.arange(n)
    return group_units(dataset.groups)  # images in order of first appearance


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks of `size` covering 0..n."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def chunk_name(kind: str, i: int) -> str:
    return f"{kind}-{i:05d}.safetensors"


@dataclass
class Job:
    """Everything one extraction needs, passed around as one object."""

    dataset: CrossModalDataset
    folder: Path
    key: str
    material: dict
    img_enc: object
    txt_enc: object
    image_rows: np.ndarray  # dataset row of each distinct image
    row_to_image: np.ndarray
    dims: dict
    batch_size: int
    chunk_size: int
    on_corrupt: str
    workers: int
    device: torch.device
    amp: torch.dtype | None
    progress: bool
    on_chunk: Callable[[str], None] | None

    @property
    def counts(self) -> dict:
        return {"items": len(self.dataset), "images": len(self.image_rows)}

    def plan(self) -> list[tuple[str, int, int, int]]:
        n, m = len(self.dataset), len(self.image_rows)
        plan = [("image", i, s, e) for i, (s, e) in enumerate(chunks(m, self.chunk_size))]
        return plan + [("text", i, s, e) for i, (s, e) in enumerate(chunks(n, self.chunk_size))]

    def shapes(self, kind: str, s: int, e: int) -> dict:
        """Expected shape of each tensor of a chunk of rows s..e (None: any length, the chunk's longest text)."""
        di, dt, r = self.dims["image"], self.dims["text"], self.dims["regions"]
        if kind == "image":
            return {"global": (e - s, di), "regions": (e - s, r * r, di), "valid": (e - s,)}
        return {"global": (e - s, dt), "words": (e - s, None, dt), "mask": (e - s, None)}
