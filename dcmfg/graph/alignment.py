"""The region-word alignment score (docs/method.md section 3) that the attention of a cross-modal edge receives.

For an image v with region tokens and a text t with word tokens: A(v, t) = cos(regions, words) (R, W), its maximum
over regions per word, averaged over the valid words. Per edge (`edge_alignment`, `region_word_alignment`) for the
graph, dense over a batch (`alignment_matrix_dense`) for the alignment loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcmfg.modality import IMAGE


def region_word_alignment(
    regions: torch.Tensor, words: torch.Tensor, mask: torch.Tensor, chunk: int = 4096, normalized: bool = False
) -> torch.Tensor:
    """Fine-grained alignment of E image-text pairs: A = cos(regions, words) (E, R, W), max over regions, mean
    over the valid words. regions (E, R, t), words (E, W, t), mask (E, W) bool -> (E,). `normalized`: the tokens
    are already unit length."""
    out = []
    for s in range(0, len(regions), chunk):
        r, w = regions[s : s + chunk], words[s : s + chunk]
        if not normalized:
            r, w = F.normalize(r, dim=-1), F.normalize(w, dim=-1)
        m = mask[s : s + chunk].to(r.dtype)
        best = torch.einsum("erd,ewd->erw", r, w).amax(dim=1)  # (e, W): each word's best region
        out.append((best * m).sum(1) / m.sum(1).clamp(min=1.0))
    return torch.cat(out) if out else regions.new_zeros(0)


def alignment_matrix_dense(regions: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Alignment score of every image with every text of a batch: regions (B, R, t), words (B', W, t) -> (B, B')."""
    r = F.normalize(regions, dim=-1)
    w = F.normalize(words, dim=-1)
    best = torch.einsum("ard,bwd->abrw", r, w).amax(dim=2)  # (B, B', W)
    m = mask.to(r.dtype)[None]
    return (best * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def edge_alignment(
    edge_index: torch.Tensor,
    modality: torch.Tensor,
    token_row: torch.Tensor,
    regions: torch.Tensor,
    words: torch.Tensor,
    mask: torch.Tensor,
    normalized: bool = False,
) -> torch.Tensor:
    """Alignment score per edge (E,): region-word alignment for cross-modal edges, 0 for same-modality edges.

    `token_row[n]` is node n's row in `regions` (image nodes) or `words`/`mask` (text nodes).
    """
    src, dst = edge_index
    cross = modality[src] != modality[dst]
    score = torch.zeros(edge_index.shape[1], device=edge_index.device, dtype=regions.dtype)
    if not bool(cross.any()):
        return score
    s, d = src[cross], dst[cross]
    img = torch.where(modality[s] == IMAGE, s, d)
    txt = torch.where(modality[s] == IMAGE, d, s)
    ri, rt = token_row[img], token_row[txt]
    vals = region_word_alignment(regions[ri], words[rt], mask[rt], normalized=normalized)
    return score.masked_scatter(cross, vals.to(score.dtype))
