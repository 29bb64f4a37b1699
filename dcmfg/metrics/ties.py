"""Groups of equal scores per query: what the tie-aware metrics average over.

For a chunk of queries each returns two (chunk, G) float64 tensors, in rank order (best group first): n, the
number of items in each group of equal distance, and r, how many of them are relevant (sum(r) = R per query).

- `_hamming_histograms(p, rows)`: for Hamming codes of b bits the groups are the distances d = 0..b (G = b + 1),
  counted without any sort, from one matrix product and one scatter per chunk.
- `_tie_groups(dist_sorted, rel_sorted)`: for any distance, from a row already sorted by distance (G = N, padded
  with empty groups).
"""

from __future__ import annotations

import torch

from dcmfg.metrics._inputs import _Prepared
from dcmfg.metrics.ranking import _distances
from dcmfg.metrics.relevance import _shared_labels

_FUSED_HISTOGRAM_BINS = 1 << 14


def _hamming_histograms(p: _Prepared, rows: slice, ws: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query and Hamming distance d = 0..b: (items at d, relevant items at d), float64. No sort.

    key = (b + 1) * shared_labels + d comes out of ONE matrix product of [(b + 1) l_q, -q / 2] and [l_x, x]
    (plus b / 2; every term is exact in float32), and one scatter of ones into (b + 1) x (C + 1) bins per query
    counts both histograms at once. `ws` (a dict kept across the chunks of one call) holds the database side and
    the key buffers, so chunks reuse memory instead of faulting in fresh pages.
    """
    ws = {} if ws is None else ws
    q, ql = p.query[rows], p.query_labels[rows]
    n_bits, n_labels = p.query.shape[1], p.query_labels.shape[1]
    width = n_bits + 1
    chunk = q.shape[0]
    if width * (n_labels + 1) <= _FUSED_HISTOGRAM_BINS:
        if "db" not in ws:
            ws["db"] = torch.cat([p.database_labels, p.database], dim=1).T.contiguous()
            ws["f"] = torch.empty(chunk, p.n_database, device=q.device)
            ws["l"] = torch.empty(chunk, p.n_database, dtype=torch.long, device=q.device)
        a = torch.cat([ql * width, q * -0.5], dim=1)
        keys_f = torch.addmm(q.new_tensor(n_bits / 2), a, ws["db"], out=ws["f"][:chunk])
        keys = ws["l"][:chunk].copy_(keys_f)
        n_bins = width * (n_labels + 1)
    else:  # many labels: relevance first, key = 2 d + relevant
        keys = _distances(p, rows).mul_(2).add_(_shared_labels(p, rows).clamp_(max=1)).long()
        keys = keys // 2 + (keys % 2) * width
        n_bins = 2 * width
    h = torch.zeros(chunk, n_bins, dtype=torch.float32, device=keys.device)
    h.scatter_add_(1, keys, torch.ones(1, 1, device=keys.device).expand_as(keys))
    h = h.double().view(chunk, -1, width)
    return h.sum(1), h[:, 1:].sum(1)


def _tie_groups(dist_sorted: torch.Tensor, rel_sorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sizes and relevant counts of the groups of equal scores, in rank order, padded with empty groups."""
    new = torch.ones_like(dist_sorted, dtype=torch.bool)
    new[:, 1:] = dist_sorted[:, 1:] != dist_sorted[:, :-1]
    gid = torch.cumsum(new, dim=1) - 1
    n = torch.zeros(dist_sorted.shape, dtype=torch.float64, device=dist_sorted.device)
    r = torch.zeros_like(n)
    n.scatter_add_(1, gid, torch.ones_like(n))
    r.scatter_add_(1, gid, rel_sorted.to(torch.float64))
    return n, r
