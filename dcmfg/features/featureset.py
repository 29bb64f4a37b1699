"""`FeatureSet`: the frozen features of every item of a dataset, and how cached chunks become one.

Shapes (N items, Di / Dt the image / text backbone widths, R = regions * regions, W the longest text in words):
`image_global` (N, Di), `image_regions` (N, R, Di) an r x r grid in row-major order, `text_global` (N, Dt),
`text_words` (N, W, Dt), all float16; `text_mask` (N, W) and `valid` (N,) bool. Items of one caption group share
their image's rows (the image is encoded once, see `dcmfg.features.job.image_units`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class FeatureSet:
    image_global: torch.Tensor  # (N, Di) float16
    image_regions: torch.Tensor  # (N, R, Di) float16, R = regions * regions (an r x r grid, row-major)
    text_global: torch.Tensor  # (N, Dt) float16
    text_words: torch.Tensor  # (N, W, Dt) float16
    text_mask: torch.Tensor  # (N, W) bool
    valid: torch.Tensor  # (N,) bool: False where the image could not be read (its features are zeros)
    key: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.image_global.shape[0]


def pad(x: torch.Tensor, w: int) -> torch.Tensor:
    """Pad dim 1 with zeros (False for masks) up to w."""
    if x.shape[1] == w:
        return x
    padding = torch.zeros((x.shape[0], w - x.shape[1], *x.shape[2:]), dtype=x.dtype)
    return torch.cat([x, padding], dim=1)


def assemble(loaded: dict, plan: list, row_to_image: np.ndarray, key: str) -> FeatureSet:
    """One FeatureSet from the chunks of `plan` (file name -> tensors in `loaded`); image rows are spread back to
    the items through `row_to_image`, texts are padded to the longest chunk."""
    img = [loaded[f"image-{i:05d}.safetensors"] for kind, i, _, _ in plan if kind == "image"]
    txt = [loaded[f"text-{i:05d}.safetensors"] for kind, i, _, _ in plan if kind == "text"]
    idx = torch.from_numpy(np.asarray(row_to_image, dtype=np.int64))
    w = max(t["words"].shape[1] for t in txt)
    return FeatureSet(
        image_global=torch.cat([c["global"] for c in img])[idx],
        image_regions=torch.cat([c["regions"] for c in img])[idx],
        text_global=torch.cat([c["global"] for c in txt]),
        text_words=torch.cat([pad(c["words"], w) for c in txt]),
        text_mask=torch.cat([pad(c["mask"], w) for c in txt]),
        valid=torch.cat([c["valid"] for c in img])[idx],
        key=key,
    )
