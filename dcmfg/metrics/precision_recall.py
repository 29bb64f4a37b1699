"""Precision and recall: at a rank K (P@K, R@K) and within a Hamming radius (the PR-hamming curve) (docs/metrics.md).

For one query with R relevant items and hits(K) relevant items in its top K (stable ties):

    P@K = hits(K) / K        R@K = hits(K) / R

K is capped at the database size N. Within Hamming radius d (d = 0..b for b-bit codes), with n(d) items and
hits(d) relevant items at distance <= d: precision = hits(d) / n(d), averaged over the queries with n(d) > 0;
recall = hits(d) / R, averaged over all queries. Queries with R = 0 follow the empty-query rule
(`dcmfg.metrics.relevance`).

Inputs: query (Q, D), database (N, D), query_labels (Q, C), database_labels (N, C) (see `dcmfg.metrics._inputs`).
Both return a pandas DataFrame, one row per K (columns k, precision, recall) or per radius (columns radius,
precision, recall, retrieved, n_queries).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from dcmfg.metrics._inputs import DEFAULT_KS, _check_choice, _check_ks, _prepare, _Prepared
from dcmfg.metrics.ranking import _bits, _chunk_rows, _distances, _stable_order
from dcmfg.metrics.relevance import _finish, _shared_labels
from dcmfg.metrics.ties import _hamming_histograms


def precision_recall_at_k(
    query,
    database,
    query_labels,
    database_labels,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    distance: str = "cosine",
    empty: str = "zero",
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """P@K and R@K (stable ties), K capped at the database size (duplicates after capping dropped).

    Columns: k, precision, recall. R@K of a query with no relevant item is 0 (`empty="zero"`); with
    `empty="exclude"` such queries leave both means.
    """
    _check_choice(empty, "empty", ("zero", "exclude"))
    ks = _check_ks(ks, "ks")
    p = _prepare(query, database, query_labels, database_labels, distance)
    return _pr_frame(p, ks, empty, chunk_size)


def _pr_frame(p: _Prepared, ks: list[int], empty: str, chunk_size: int | None) -> pd.DataFrame:
    ks = sorted({min(k, p.n_database) for k in ks})
    hits, n_rel = _ranked_counts(p, ks, chunk_size)
    return _pr_from_counts(hits, n_rel, ks, empty)


def _ranked_counts(p: _Prepared, ks: list[int], chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevant items in the top K (stable ties) per query and K, and R per query."""
    kmax = max(ks)
    hits = torch.empty(p.n_query, len(ks), dtype=torch.float64, device=p.device)
    n_rel = torch.empty(p.n_query, dtype=torch.float64, device=p.device)
    cols = torch.tensor([k - 1 for k in ks], device=p.device)
    for rows in _chunk_rows(p.n_query, p.n_database, chunk_size):
        rel = _shared_labels(p, rows) > 0
        n_rel[rows] = torch.count_nonzero(rel, dim=1).double()
        rel_sorted = rel.gather(1, _stable_order(_distances(p, rows), kmax, _bits(p)))
        hits[rows] = torch.cumsum(rel_sorted, dim=1, dtype=torch.float64).index_select(1, cols)
    return hits, n_rel


def _pr_from_counts(hits: torch.Tensor, n_rel: torch.Tensor, ks: list[int], empty: str) -> pd.DataFrame:
    empty_mask = n_rel == 0
    rows = []
    for j, k in enumerate(ks):
        prec, _ = _finish(hits[:, j] / k, empty_mask, empty)
        rec, _ = _finish(hits[:, j] / n_rel.clamp(min=1), empty_mask, empty)
        rows.append({"k": k, "precision": prec, "recall": rec})
    return pd.DataFrame(rows, columns=["k", "precision", "recall"])


def pr_curve_hamming(
    query,
    database,
    query_labels,
    database_labels,
    *,
    empty: str = "zero",
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Precision and recall within Hamming radius d, d = 0..b (no sort: per-query distance histograms).

    Precision at a radius is averaged over the queries that retrieve at least one item within it (`n_queries`);
    recall over all queries (R = 0 counts as 0, or is excluded with `empty="exclude"`). `retrieved` is the mean
    number of items within the radius.
    """
    _check_choice(empty, "empty", ("zero", "exclude"))
    p = _prepare(query, database, query_labels, database_labels, "hamming")
    n_bits = p.query.shape[1]
    total = torch.empty(p.n_query, n_bits + 1, dtype=torch.float64, device=p.device)
    found = torch.empty_like(total)
    n_rel = torch.empty(p.n_query, dtype=torch.float64, device=p.device)
    ws: dict = {}
    for rows in _chunk_rows(p.n_query, p.n_database, chunk_size):
        n, r = _hamming_histograms(p, rows, ws)
        n_rel[rows] = r.sum(1)
        total[rows] = torch.cumsum(n, 1)
        found[rows] = torch.cumsum(r, 1)
    return _pr_hamming_from_counts(total, found, n_rel, empty)


def _pr_hamming_from_counts(total: torch.Tensor, found: torch.Tensor, n_rel: torch.Tensor, empty: str) -> pd.DataFrame:
    """The PR-hamming table from per-query cumulative (items, relevant items) within each radius, and R."""
    n_bits = total.shape[1] - 1
    keep = n_rel > 0 if empty == "exclude" else torch.ones_like(n_rel, dtype=torch.bool)
    total, found, n_rel = total[keep], found[keep], n_rel[keep]
    retrieving = total > 0
    prec_sum = torch.where(retrieving, found / total.clamp(min=1), 0.0).sum(0)
    n_q = retrieving.sum(0)
    precision = torch.where(n_q > 0, prec_sum / n_q.clamp(min=1), float("nan"))
    recall = (found / n_rel.clamp(min=1)[:, None]).mean(0)
    return pd.DataFrame(
        {
            "radius": np.arange(n_bits + 1),
            "precision": precision.cpu().numpy(),
            "recall": recall.cpu().numpy(),
            "retrieved": total.mean(0).cpu().numpy(),
            "n_queries": n_q.cpu().numpy(),
        }
    )
