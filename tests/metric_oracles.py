"""Single-metric entry points kept for the tests only, named as oracles: NDCG@K and the rank-based PR curve as
one call each, built from the package's own kernels (dcmfg.metrics: the same checks, chunks, ranking and NDCG
rows `retrieval_report` uses).

The library reports NDCG only through `retrieval_report` and P/R at K through `precision_recall_at_k`; the tests
check these against the plain-Python references in test_metrics.py and the report against them value for value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from dcmfg.metrics._inputs import DEFAULT_KS, _check_choice, _check_ks, _prepare
from dcmfg.metrics.ndcg import _discount, _ndcg_frame, _ndcg_rows
from dcmfg.metrics.precision_recall import _pr_frame
from dcmfg.metrics.ranking import _bits, _chunk_rows, _distances, _stable_order
from dcmfg.metrics.relevance import _shared_labels


def oracle_pr_curve_rank(
    query,
    database,
    query_labels,
    database_labels,
    *,
    grid: Sequence[int] | None = None,
    distance: str = "cosine",
    empty: str = "zero",
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Rank-based PR curve: P and R at a grid of K (default 21 evenly spaced K from 1 to the database size)."""
    _check_choice(empty, "empty", ("zero", "exclude"))
    p = _prepare(query, database, query_labels, database_labels, distance)
    if grid is None:
        grid = np.unique(np.linspace(1, p.n_database, 21).round().astype(int)).tolist()
    return _pr_frame(p, _check_ks(grid, "grid"), empty, chunk_size)


def oracle_ndcg_at_k(
    query,
    database,
    query_labels,
    database_labels,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    distance: str = "cosine",
    gain: str = "exponential",
    empty: str = "zero",
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """NDCG@K with graded relevance g = number of shared labels, stable ties.

    DCG@K = sum_{r<=K} gain(g_r) / log2(r + 1), gain = 2^g - 1 (`"exponential"`) or g (`"linear"`); the ideal DCG
    ranks the whole database by g. Columns: k, ndcg.
    """
    _check_choice(gain, "gain", ("exponential", "linear"))
    _check_choice(empty, "empty", ("zero", "exclude"))
    p = _prepare(query, database, query_labels, database_labels, distance)
    ks = sorted({min(k, p.n_database) for k in _check_ks(ks, "ks")})
    kmax = max(ks)
    cols = torch.tensor([k - 1 for k in ks], device=p.device)
    discount = _discount(kmax, p.device)
    ndcg = torch.empty(p.n_query, len(ks), dtype=torch.float64, device=p.device)
    n_rel = torch.empty(p.n_query, dtype=torch.float64, device=p.device)
    for rows in _chunk_rows(p.n_query, p.n_database, chunk_size):
        shared = _shared_labels(p, rows)
        n_rel[rows] = torch.count_nonzero(shared, dim=1).double()
        order = _stable_order(_distances(p, rows), kmax, _bits(p))
        ndcg[rows] = _ndcg_rows(shared, order, gain, discount, cols)
    return _ndcg_frame(ndcg, n_rel, ks, empty)
