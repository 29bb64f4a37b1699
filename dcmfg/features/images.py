"""Reading images for extraction: what a DataLoader worker does for one image, and how images are batched.

Workers stamp, read, decode and preprocess; the main process runs the backbone on whole batches. Batches never
straddle a chunk and start at the chunk's first image, so the numbers do not depend on which chunks a run resumes
or which rank extracts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dcmfg.data.base import CrossModalDataset, ImageReadError

from .cache import stamp
from .job import Job


class ImageReader(torch.utils.data.Dataset):
    """What a DataLoader worker does for one image: stamp the file, read, decode, preprocess. Never raises: an
    unreadable image comes back as None pixels with its message (the main process applies on_corrupt)."""

    def __init__(self, dataset: CrossModalDataset, rows: np.ndarray, preprocess: Callable):
        self.dataset, self.rows, self.preprocess = dataset, rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        row = int(self.rows[j])
        paths = self.dataset.image_paths
        st = stamp(Path(paths[row])) if paths is not None else None  # before decoding: a later edit shows
        try:
            return j, self.preprocess(self.dataset.image(row)), None, st
        except ImageReadError as exc:
            return j, None, str(exc), st


def collate(items: list) -> tuple[list[int], torch.Tensor | None, list, list]:
    """(positions, stacked pixels of the readable images or None, error messages, file stamps)."""
    pos = [it[0] for it in items]
    good = [it[1] for it in items if it[1] is not None]
    return pos, (torch.stack(good) if good else None), [it[2] for it in items], [it[3] for it in items]


def image_batches(job: Job, todo: list) -> tuple[np.ndarray, list[list[int]]]:
    """Rows of every image to extract, and batches of positions into them that never straddle a chunk (each chunk
    is batched from its start exactly as in one uninterrupted single-process run, so the numbers are the same)."""
    rows, batches, at = [], [], 0
    for _, _, s, e in todo:
        rows.append(job.image_rows[s:e])
        batches += [list(range(at + b, at + min(b + job.batch_size, e - s))) for b in range(0, e - s, job.batch_size)]
        at += e - s
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), batches
