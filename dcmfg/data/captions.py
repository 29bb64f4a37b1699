"""Caption groups: the rules every loader follows whose items may carry several captions (MS-COCO, manifests).

The `captions` switch:
- "first": one row per item with its first caption; `groups` is None.
- "join": one row per item, all its captions joined by " "; `groups` is None.
- "all": one row per caption, each paired with the same image; rows of one image share a group id in
  `CrossModalDataset.groups` (the item's row order, 0..n_items-1), and ids read "<item id>#<k>".

The retrieval protocol for grouped rows (what we chose, and why; docs/mscoco.md says it for users):
1. Splits are drawn by group (`dcmfg.data.splits.make_split` draws every protocol over groups when
   `dataset.groups` is set, and sizes then count images): an image and all its captions land in the same part, so
   a query's siblings are never in the database. Otherwise an image query would find its own captions
   (near-duplicates of its pair) at the top and the number would measure pair memorisation, not label-level
   retrieval.
2. Relevance is the usual one (share >= 1 label); siblings share every label, so an image and its captions act as
   one item for relevance.
3. The image side is counted once per group (`group_representatives`, which `dcmfg.engine.evaluate` uses): an image
   repeated once per caption would be retrieved five times for a text query and weigh five times in image->text
   mAP. The text side keeps every caption as its own query / database item: they are different texts.
4. A split file whose parts cut through a group is refused when it is loaded (`dcmfg.data.splits.check_split`),
   so a query's siblings are never in its database and the ranking needs no exclusion.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import DatasetError

CAPTION_MODES = ("first", "join", "all")


def expand_captions(
    ids: Sequence[str], captions_per_item: Sequence[Sequence[str]], mode: str
) -> tuple[list[str], list[str], np.ndarray, np.ndarray | None]:
    """Apply the `captions` switch. Returns (row ids, row texts, item index of each row, groups or None).

    Each item must have >= 1 caption. "all" makes one row per caption and groups = item index.
    """
    if mode not in CAPTION_MODES:
        raise DatasetError(f"captions={mode!r} is not one of {', '.join(CAPTION_MODES)}")
    if mode == "first":
        return list(ids), [c[0] for c in captions_per_item], np.arange(len(ids), dtype=np.int64), None
    if mode == "join":
        return list(ids), [" ".join(c) for c in captions_per_item], np.arange(len(ids), dtype=np.int64), None
    counts = np.fromiter((len(c) for c in captions_per_item), dtype=np.int64, count=len(captions_per_item))
    item = np.repeat(np.arange(len(ids), dtype=np.int64), counts)
    row_ids = [f"{i}#{k}" for i, c in zip(ids, captions_per_item) for k in range(len(c))]
    texts = [t for c in captions_per_item for t in c]
    return row_ids, texts, item, item.copy()


def group_units(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each group, groups in order of first appearance; per row, the index of its group in that
    order). Splits draw these units, features encode one image per unit."""
    g = np.asarray(groups, dtype=np.int64)
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(first), dtype=np.int64)
    rank[order] = np.arange(len(first))
    return first[order], rank[inverse.reshape(-1)]


def group_representatives(groups: np.ndarray) -> np.ndarray:
    """Row index of the first row of each group (in order of first appearance): use it for the image side."""
    return group_units(groups)[0]

