"""Mean average precision, mAP@all and mAP@K, with ties broken by database index or averaged over (docs/metrics.md).

For one query with R relevant items, ranked by `dcmfg.metrics.ranking`:

    AP@K = (1 / den) * sum over relevant items at rank r <= K of precision@r

with den = min(R, K) (`denominator="relevant"`) or the number of relevant items in the top K (`"retrieved"`);
K = N (the database size) for mAP@all. mAP is the mean over queries under the empty-query rule
(`dcmfg.metrics.relevance`).

`ties="stable"` ranks ties by ascending database index. `ties="expected"` is the tie-aware value of McSherry &
Najork (2008): the expectation of AP over all orders inside each group of equal scores (`dcmfg.metrics.ties`),
in closed form with harmonic numbers (`_expected_ap_sums`); for Hamming codes it needs no sort at all.

Inputs: query (Q, D), database (N, D), query_labels (Q, C), database_labels (N, C) (see `dcmfg.metrics._inputs`).
Sums are float64; the result is a Python float, or with `return_per_query=True` also the (Q,) float64 per-query APs.
"""

from __future__ import annotations

import torch

from dcmfg.metrics._inputs import MetricInputError, _check_choice, _check_ks, _prepare
from dcmfg.metrics.ranking import _bits, _chunk_rows, _distances, _stable_order
from dcmfg.metrics.relevance import _finish, _shared_labels
from dcmfg.metrics.ties import _hamming_histograms, _tie_groups


def mean_average_precision(
    query,
    database,
    query_labels,
    database_labels,
    *,
    distance: str = "cosine",
    k: int | None = None,
    denominator: str = "relevant",
    ties: str = "stable",
    empty: str = "zero",
    chunk_size: int | None = None,
    return_per_query: bool = False,
):
    """mAP@all (k=None) or mAP@K.

    AP@K = (1 / den) * sum over relevant items at rank r <= K of precision@r, with den = min(R, K)
    (`denominator="relevant"`, docs/metrics.md) or the number of relevant items in the top K (`"retrieved"`, the
    variant common in hashing code). `ties="expected"` is defined for `denominator="relevant"` only (the other
    denominator is itself random under tie permutations, so AP is no longer linear in the ranking).
    Returns the mean, or `(mean, per_query float64 tensor)` (NaN for excluded queries).
    """
    _check_choice(denominator, "denominator", ("relevant", "retrieved"))
    _check_choice(ties, "ties", ("stable", "expected"))
    _check_choice(empty, "empty", ("zero", "exclude"))
    if ties == "expected" and denominator == "retrieved":
        raise MetricInputError("ties='expected' is defined for denominator='relevant' only")
    if k is not None:
        _check_ks([k], "k")
    p = _prepare(query, database, query_labels, database_labels, distance)
    n_db = p.n_database
    kk = n_db if k is None else min(int(k), n_db)
    harmonic = _harmonic(n_db, p.device) if ties == "expected" else None
    per_query = torch.empty(p.n_query, dtype=torch.float64, device=p.device)
    n_rel = torch.empty(p.n_query, dtype=torch.float64, device=p.device)
    ws: dict = {}
    for rows in _chunk_rows(p.n_query, n_db, chunk_size):
        if ties == "stable":
            rel = _shared_labels(p, rows) > 0
            order = _stable_order(_distances(p, rows), kk, _bits(p))
            sums, found = _ap_stable_sum(rel.gather(1, order), kk)
            del order
            big_r = found if kk == n_db else torch.count_nonzero(rel, dim=1).double()
            den = big_r.clamp(max=kk) if denominator == "relevant" else found
        else:
            if p.distance == "hamming":
                n, r = _hamming_histograms(p, rows, ws)
            else:
                dist_sorted, order = torch.sort(_distances(p, rows), dim=1, stable=True)
                n, r = _tie_groups(dist_sorted, (_shared_labels(p, rows) > 0).gather(1, order))
                del dist_sorted, order
            big_r = r.sum(1)
            sums = _expected_ap_sums(n, r, [kk], harmonic)[:, 0]
            den = big_r.clamp(max=kk)
        n_rel[rows] = big_r
        per_query[rows] = torch.where(den > 0, sums / den.clamp(min=1), 0.0)
    mean, per_query = _finish(per_query, n_rel == 0, empty)
    return (mean, per_query) if return_per_query else mean


def _ap_stable_sum(rel_sorted: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of precision@rank over the relevant items in the top K, and the relevant items in the top K (float64)."""
    relf = rel_sorted[:, :k].to(torch.float64)
    hits = torch.cumsum(relf, dim=1)
    found = hits[:, -1].clone()
    ranks = torch.arange(1, k + 1, dtype=torch.float64, device=relf.device)
    return hits.div_(ranks).mul_(relf).sum(1), found


def _harmonic(n: int, device: torch.device) -> torch.Tensor:
    """H[m] = sum_{i<=m} 1/i for m = 0..n, float64."""
    h = torch.zeros(n + 1, dtype=torch.float64, device=device)
    h[1:] = torch.cumsum(1.0 / torch.arange(1, n + 1, dtype=torch.float64, device=device), 0)
    return h


def _expected_ap_sums(n: torch.Tensor, r: torch.Tensor, ks: list[int], harmonic: torch.Tensor) -> torch.Tensor:
    """Tie-aware (McSherry & Najork) expected sum of precision@rank over relevant items in the top K.

    Groups of equal score come in rank order with n items, r of them relevant, after N0 items (R0 relevant).
    Inside a group every order is equally likely, so for the item at group position i:
    E[rel_i * hits_i] = r/n (R0 + 1) + (i - 1) r (r - 1) / (n (n - 1)), divided by its rank N0 + i.
    Summing over i = 1..m with harmonic numbers needs no sort and no loop.
    """
    n0 = torch.cumsum(n, dim=1) - n
    r0 = torch.cumsum(r, dim=1) - r
    p1 = torch.where(n > 0, r / n.clamp(min=1), 0.0)
    p2 = torch.where(n > 1, r * (r - 1) / (n * (n - 1)).clamp(min=1), 0.0)
    out = []
    for k in ks:
        m = (k - n0).clamp(min=0).minimum(n)
        lo = n0.long()
        s1 = harmonic[lo + m.long()] - harmonic[lo]
        s2 = m - (n0 + 1) * s1
        out.append((p1 * (r0 + 1) * s1 + p2 * s2).sum(1))
    return torch.stack(out, dim=1)
