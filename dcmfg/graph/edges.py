"""What one graph step yields, whichever graph built it: `Edges` (index and per-edge flags), the unit-length
`Tokens` the alignment score reads, and the `RelationState` a bank keeps of its own relation.

Edge lists follow PyG (row 0 = source j, row 1 = target i, message j -> i) and carry flags: `mutual` (the pair
passed the mutual test), `fallback` (added because the target had no relation edge), `self_loop`, `cross`
(image-text).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Tokens:
    """Projected region tokens of images and word tokens (+ mask) of texts, one row per pair, L2-normalised (the
    alignment is a cosine: normalising once per item, not once per edge, saves most of its cost)."""

    regions: torch.Tensor | None  # (n, R, t); None for text-only queries
    words: torch.Tensor | None  # (n, W, t); None for image-only queries
    mask: torch.Tensor | None  # (n, W) bool

    @classmethod
    def unit(cls, regions=None, words=None, mask=None) -> "Tokens":
        return cls(None if regions is None else F.normalize(regions, dim=-1),
                   None if words is None else F.normalize(words, dim=-1), mask)


@dataclass
class RelationState:
    """What the bank keeps of its own relation at one layer, for the queries' mutual test: per part, the features
    the test compares (the states, centred; static: the frozen globals of one modality), tau (the k'-th
    candidate's score) and the CSLS r of each row."""

    keys: list[torch.Tensor]
    taus: list[torch.Tensor]
    rs: list[torch.Tensor | None]


@dataclass
class Edges:
    """Edges of one graph step: index over (source rows, target rows) with per-edge flags."""

    index: torch.Tensor  # (2, E): row 0 source (into `sources()`), row 1 target
    mutual: torch.Tensor  # (E,) bool: a genuine mutual edge
    fallback: torch.Tensor  # (E,) bool: added because the target had no relation edge
    self_loop: torch.Tensor  # (E,) bool
    cross: torch.Tensor  # (E,) bool: between an image and a text node
    n_targets: int
    occurrence: torch.Tensor  # (candidates,) k-occurrence: how often each candidate is in a target's k nearest
    align: torch.Tensor | None = None  # (E,) region-word alignment score (0 on same-modality edges and self-loops)
    bank_nodes: torch.Tensor | None = None  # bank graph: the bank node of each source row after the Q queries
    relation: RelationState | None = None  # batch graph: what a bank built from this graph keeps


def merge_edges(src, tgt, mutual, fallback, n_src: int):
    """Union of edge lists: each (source, target) once, mutual if any copy is, fallback only if every copy is."""
    key = tgt * n_src + src
    uniq, inv = torch.unique(key, return_inverse=True)  # sorted: deterministic (target, source) order
    m = torch.zeros(len(uniq), dtype=torch.long, device=key.device).scatter_reduce(0, inv, mutual.long(), "amax")
    f = torch.ones(len(uniq), dtype=torch.long, device=key.device).scatter_reduce(0, inv, fallback.long(), "amin")
    return uniq % n_src, uniq // n_src, m.bool(), f.bool()


def k_occurrence(neighbours: torch.Tensor, n: int, to_node=None) -> torch.Tensor:
    """k-occurrence (n,): how often each of n candidates is among a target's k nearest. `neighbours` (T, k) rows of
    candidates, -1 padded; `to_node` maps them to candidate nodes when they index something else."""
    nb = neighbours[neighbours >= 0]
    return torch.bincount(nb if to_node is None else to_node(nb), minlength=n)
