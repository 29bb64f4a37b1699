"""Retrieval metrics as defined in design/metrics.md: mAP (@all, @K), P@K, R@K, PR curves, NDCG.

Every metric is computed on batched torch tensors, chunked over queries (extra memory ~ chunk x database x ~48 bytes),
on the inputs' device. Relevance: a database item is relevant to a query iff their label vectors share >= 1 label.

Ranking and ties. Cosine ranks by descending similarity, Hamming by ascending distance. `ties="stable"` breaks ties by
ascending database index (one stable sort, the same on every platform). `ties="expected"` is the tie-aware value of
McSherry & Najork (2008): the expectation of AP over all orders inside each group of equal scores. For Hamming codes it
is computed without any sort, from per-query histograms of (total, relevant) items per distance.

Queries with no relevant item (R = 0) count as AP = 0 under `empty="zero"` (the default) and are left out of every
mean under `empty="exclude"`; `count_empty_queries` and `retrieval_report` say how many there were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from dcmfg.distributed import gather_rows, shard_chunks
from dcmfg.errors import DcmfgError

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50, 100, 500, 1000, 5000)
# Extra memory one chunk of queries may take (the per-chunk matrices are chunk x database).
DEFAULT_CHUNK_BYTES = 512 * 2**20
_BYTES_PER_CELL = 48  # distance, sort values + int64 order, relevance, float64 cumsums


class MetricInputError(DcmfgError, ValueError):
    """Inputs to a metric that cannot be right: mismatched shapes, NaN, non-binary codes or labels."""


@dataclass(frozen=True)
class _Prepared:
    query: torch.Tensor  # (Q, D) float32: unit rows for cosine, +-1 for hamming
    database: torch.Tensor  # (N, D)
    query_labels: torch.Tensor  # (Q, C) float32 0/1
    database_labels: torch.Tensor  # (N, C)
    distance: str

    @property
    def n_query(self) -> int:
        return self.query.shape[0]

    @property
    def n_database(self) -> int:
        return self.database.shape[0]

    @property
    def device(self) -> torch.device:
        return self.query.device


# ----------------------------------------------------------------------------------------------------------------------
# input checks


def _as_tensor(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
    except Exception as exc:  # noqa: BLE001 - report what the argument was
        raise MetricInputError(f"{name}: cannot convert {type(x).__name__} to a tensor ({exc})") from None
    if device is not None:
        t = t.to(device)
    return t


def _check_2d(t: torch.Tensor, name: str) -> None:
    if t.ndim != 2:
        raise MetricInputError(f"{name} must be 2-D (rows x columns), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise MetricInputError(f"{name} has no rows (shape {tuple(t.shape)})")


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
            raise MetricInputError(
                f"{name} {tuple(t.shape)} contains {int(bad.sum())} NaN/inf values (first rows {rows})"
            )


def _binary_codes(t: torch.Tensor, name: str) -> torch.Tensor:
    """{-1,+1} or {0,1} codes (any dtype) -> float32 +-1."""
    if t.dtype == torch.bool:
        return t.float() * 2 - 1
    plus_minus = bool(((t == 1) | (t == -1)).all())
    if plus_minus:
        return t.float()
    zero_one = bool(((t == 0) | (t == 1)).all())
    if zero_one:
        return t.float() * 2 - 1
    bad = t[(t != 1) & (t != -1) & (t != 0)]
    example = bad[:3].tolist() if bad.numel() else "a mix of -1 and 0"
    raise MetricInputError(
        f"{name} {tuple(t.shape)}: hash codes must be binary, all in {{-1,+1}} or all in {{0,1}}; "
        f"found {example} (apply torch.sign to real-valued outputs first)"
    )


def _labels(x, name: str, rows: int, rows_name: str, device: torch.device) -> torch.Tensor:
    t = _as_tensor(x, name, device)
    if t.ndim == 1:
        raise MetricInputError(
            f"{name} must be 2-D multi-hot (rows x labels), got shape {tuple(t.shape)}; "
            "for single-label data pass one-hot rows"
        )
    _check_2d(t, name)
    if t.shape[0] != rows:
        raise MetricInputError(f"{name} has {t.shape[0]} rows {tuple(t.shape)} but {rows_name} has {rows} rows")
    if t.dtype == torch.bool:
        return t.float()
    _check_finite(t, name)
    if not bool(((t == 0) | (t == 1)).all()):
        raise MetricInputError(f"{name} {tuple(t.shape)} must be multi-hot 0/1 label vectors")
    return t.float()


def _prepare(query, database, query_labels, database_labels, distance: str) -> _Prepared:
    if distance not in ("cosine", "hamming"):
        raise MetricInputError(f"distance must be 'cosine' or 'hamming', got {distance!r}")
    q = _as_tensor(query, "query")
    d = _as_tensor(database, "database", q.device)
    _check_2d(q, "query")
    _check_2d(d, "database")
    if q.shape[1] != d.shape[1]:
        raise MetricInputError(
            f"query {tuple(q.shape)} and database {tuple(d.shape)} have different widths ({q.shape[1]} vs {d.shape[1]})"
        )
    ql = _labels(query_labels, "query_labels", q.shape[0], "query", q.device)
    dl = _labels(database_labels, "database_labels", d.shape[0], "database", q.device)
    if ql.shape[1] != dl.shape[1]:
        raise MetricInputError(
            f"query_labels {tuple(ql.shape)} and database_labels {tuple(dl.shape)} have different label widths "
            f"({ql.shape[1]} vs {dl.shape[1]})"
        )
    if distance == "hamming":
        q, d = _binary_codes(q, "query"), _binary_codes(d, "database")
    else:
        if not q.is_floating_point() or not d.is_floating_point():
            raise MetricInputError(
                f"cosine distance needs float embeddings, got query {q.dtype} and database {d.dtype} "
                "(pass distance='hamming' for hash codes)"
            )
        _check_finite(q, "query")
        _check_finite(d, "database")
        q = torch.nn.functional.normalize(q.float(), dim=1)
        d = torch.nn.functional.normalize(d.float(), dim=1)
    return _Prepared(q.contiguous(), d.contiguous(), ql, dl, distance)


def _check_choice(value, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise MetricInputError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_ks(ks: Iterable[int | None], name: str, allow_none: bool = False) -> list[int | None]:
    out: list[int | None] = []
    for k in ks:
        if k is None and allow_none:
            out.append(None)
            continue
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise MetricInputError(f"{name} must hold positive integers{' or None' if allow_none else ''}, got {k!r}")
        out.append(int(k))
    if not out:
        raise MetricInputError(f"{name} is empty")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# chunked kernels


def _chunk_rows(n_query: int, n_database: int, chunk_size: int | None) -> Iterator[slice]:
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (n_database * _BYTES_PER_CELL))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise MetricInputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    for start in range(0, n_query, chunk_size):
        yield slice(start, min(start + chunk_size, n_query))


def _bits(p: _Prepared) -> int | None:
    return p.query.shape[1] if p.distance == "hamming" else None


def _distances(p: _Prepared, rows: slice) -> torch.Tensor:
    """(chunk, N) float32, lower = better: -cosine, or the Hamming distance (b - <q, x>) / 2 of +-1 codes (exact
    small integers). One matrix product each, the affine part folded into it."""
    q = p.query[rows]
    if p.distance == "cosine":
        return torch.addmm(q.new_zeros(()), q, p.database.T, beta=0, alpha=-1)
    return torch.addmm(q.new_tensor(p.query.shape[1] / 2), q, p.database.T, alpha=-0.5)


def _shared_labels(p: _Prepared, rows: slice) -> torch.Tensor:
    """(chunk, N) float32 number of shared labels (graded relevance; > 0 = relevant)."""
    return p.query_labels[rows] @ p.database_labels.T


def _stable_order(dist: torch.Tensor, k: int, hamming_bits: int | None = None) -> torch.Tensor:
    """Indices of the k best items per row, ties by ascending database index."""
    n = dist.shape[1]
    if k * 4 >= n:
        if hamming_bits is not None and hamming_bits <= 255:
            dist = dist.to(torch.uint8)  # exact small integers; a uint8 stable sort is faster than a float one
        return torch.sort(dist, dim=1, stable=True)[1][:, :k]
    # Partial selection: make keys unique (order-preserving float bits, then the index) so topk cannot
    # pick an arbitrary member of a tie group at the cut.
    bits = (dist + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    keys = (ordered << 32) + torch.arange(n, device=dist.device)
    return torch.topk(keys, k, dim=1, largest=False, sorted=True)[1]


def _harmonic(n: int, device: torch.device) -> torch.Tensor:
    """H[m] = sum_{i<=m} 1/i for m = 0..n, float64."""
    h = torch.zeros(n + 1, dtype=torch.float64, device=device)
    h[1:] = torch.cumsum(1.0 / torch.arange(1, n + 1, dtype=torch.float64, device=device), 0)
    return h


def _ap_stable_sum(rel_sorted: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of precision@rank over the relevant items in the top K, and the relevant items in the top K (float64)."""
    relf = rel_sorted[:, :k].to(torch.float64)
    hits = torch.cumsum(relf, dim=1)
    found = hits[:, -1].clone()
    ranks = torch.arange(1, k + 1, dtype=torch.float64, device=relf.device)
    return hits.div_(ranks).mul_(relf).sum(1), found


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


def _finish(values: torch.Tensor, empty_mask: torch.Tensor, empty: str) -> tuple[float, torch.Tensor]:
    """Mean over queries under the empty-query rule; per-query values (NaN where excluded)."""
    values = values.clone()
    if empty == "exclude":
        values[empty_mask] = float("nan")
        kept = values[~empty_mask]
        return (float(kept.mean()) if kept.numel() else float("nan")), values
    values[empty_mask] = 0.0
    return float(values.mean()), values


# ----------------------------------------------------------------------------------------------------------------------
# public metrics


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
    (`denominator="relevant"`, metrics.md) or the number of relevant items in the top K (`"retrieved"`, the
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


def count_empty_queries(query_labels, database_labels) -> int:
    """Number of queries that share no label with any database item (their AP is 0 or excluded)."""
    ql = _labels(query_labels, "query_labels", torch.as_tensor(query_labels).shape[0], "query_labels", None)
    dl = _labels(database_labels, "database_labels", torch.as_tensor(database_labels).shape[0], "database_labels",
                 ql.device)
    if ql.shape[1] != dl.shape[1]:
        raise MetricInputError(
            f"query_labels {tuple(ql.shape)} and database_labels {tuple(dl.shape)} have different label widths"
        )
    # A query has a relevant item iff one of its labels occurs anywhere in the database.
    present = (dl.sum(0) > 0).float()
    return int(((ql @ present) == 0).sum())


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


def _pr_frame(p: _Prepared, ks: list[int], empty: str, chunk_size: int | None) -> pd.DataFrame:
    ks = sorted({min(k, p.n_database) for k in ks})
    hits, n_rel = _ranked_counts(p, ks, chunk_size)
    return _pr_from_counts(hits, n_rel, ks, empty)


def _pr_from_counts(hits: torch.Tensor, n_rel: torch.Tensor, ks: list[int], empty: str) -> pd.DataFrame:
    empty_mask = n_rel == 0
    rows = []
    for j, k in enumerate(ks):
        prec, _ = _finish(hits[:, j] / k, empty_mask, empty)
        rec, _ = _finish(hits[:, j] / n_rel.clamp(min=1), empty_mask, empty)
        rows.append({"k": k, "precision": prec, "recall": rec})
    return pd.DataFrame(rows, columns=["k", "precision", "recall"])


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


def pr_curve_rank(
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


def ndcg_at_k(
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


def _discount(kmax: int, device: torch.device) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64, device=device))


def _ndcg_rows(shared: torch.Tensor, order: torch.Tensor, gain: str, discount: torch.Tensor,
               cols: torch.Tensor) -> torch.Tensor:
    """NDCG at the columns `cols` (K - 1) of a chunk, from the shared-label counts and the ranking order."""
    kmax = discount.shape[0]

    def dcg(g: torch.Tensor) -> torch.Tensor:
        g = g.to(torch.float64)
        gains = torch.exp2(g) - 1 if gain == "exponential" else g
        return torch.cumsum(gains * discount, dim=1).index_select(1, cols)

    got = dcg(shared.gather(1, order[:, :kmax]))
    ideal = dcg(torch.topk(shared, kmax, dim=1, sorted=True)[0])
    return torch.where(ideal > 0, got / ideal.clamp(min=1e-300), 0.0)


def _ndcg_frame(ndcg: torch.Tensor, n_rel: torch.Tensor, ks: list[int], empty: str) -> pd.DataFrame:
    out = []
    for j, k in enumerate(ks):
        value, _ = _finish(ndcg[:, j], n_rel == 0, empty)
        out.append({"k": k, "ndcg": value})
    return pd.DataFrame(out, columns=["k", "ndcg"])


# ----------------------------------------------------------------------------------------------------------------------
# report


def _variant(metric: str, k: int | None, **rules) -> str:
    at = "all" if k is None else str(k)
    return f"{metric}@{at} " + " ".join(f"{key}={value}" for key, value in rules.items())


def retrieval_report(
    image_query,
    text_query,
    image_database,
    text_database,
    query_labels,
    database_labels,
    *,
    distance: str = "cosine",
    ks: Sequence[int] = DEFAULT_KS,
    map_k: Sequence[int | None] = (None, 5000),
    ties: str = "stable",
    empty: str = "zero",
    chunk_size: int | None = None,
    denominators: Sequence[str] = ("relevant",),
    ndcg: bool = True,
    pr_hamming: bool = True,
    distributed: bool = False,
) -> pd.DataFrame:
    """Both directions, tidy: one row per value with columns direction, metric, k, value, variant, distance.

    I->T ranks the text database for image queries, T->I the image database for text queries. Rows: mAP for each
    entry of `map_k` (None = @all; a K >= database size is skipped since it equals @all) and each denominator, P
    and R at `ks`, NDCG at `ks`, for Hamming also the tie-aware mAP@all (when `ties="stable"`) and the
    PR-hamming curve (k = radius), and `empty-queries` (how many queries have no relevant item). The rows of
    the requested rule come first; `report_summary` reads those.

    `distributed=True` under an initialised torch.distributed process group: every rank calls it with the same
    inputs, each ranks its own block of query chunks, the per-query values are gathered, and every rank returns
    the same frame, equal to a single process's (the chunks are the same, so every per-query value is too).
    """
    _check_choice(ties, "ties", ("stable", "expected"))
    _check_choice(empty, "empty", ("zero", "exclude"))
    for den in denominators:
        _check_choice(den, "denominators", ("relevant", "retrieved"))
    map_ks = _check_ks(map_k, "map_k", allow_none=True)
    ks = _check_ks(ks, "ks")
    directions = (("I->T", image_query, text_database), ("T->I", text_query, image_database))
    rows: list[dict] = []
    for direction, query, database in directions:
        p = _prepare(query, database, query_labels, database_labels, distance)
        for metric, k, value, variant in _direction_report(p, map_ks, denominators, ks, ties, empty, ndcg,
                                                           pr_hamming, chunk_size, distributed):
            rows.append({"direction": direction, "metric": metric, "k": np.nan if k is None else k,
                         "value": float(value), "variant": variant, "distance": distance})
        rows.append({"direction": direction, "metric": "empty-queries", "k": np.nan,
                     "value": float(count_empty_queries(query_labels, database_labels)),
                     "variant": f"queries with no relevant item (rule empty={empty})", "distance": distance})
    return pd.DataFrame(rows, columns=["direction", "metric", "k", "value", "variant", "distance"])


def _direction_report(p: _Prepared, map_ks, denominators, ks, ties, empty, ndcg, pr_hamming, chunk_size,
                      distributed: bool = False) -> list:
    """The report rows (metric, k, value, variant) of one direction from ONE ranking per query chunk: every stable
    metric (mAP@K for each K and denominator, P/R@K, NDCG@K) reads the same order, the tie-aware values and the
    Hamming PR curve the same per-distance histograms. The numbers equal those of the single-metric functions
    (same chunks, same kernels on the same inputs)."""
    n_db, dev, hamming = p.n_database, p.device, p.distance == "hamming"
    wanted = [k for k in map_ks if k is None or k < n_db]  # a K >= N equals @all
    stable_maps = [(k, n_db if k is None else k, den) for k in wanted for den in denominators] \
        if ties == "stable" else []
    expected_maps = [(k, n_db if k is None else k) for k in wanted] \
        if ties == "expected" and "relevant" in denominators else []
    extra_expected = hamming and ties == "stable"  # the tie-aware mAP@all beside the stable one
    exp_kks = [kk for _, kk in expected_maps] + ([n_db] if extra_expected else [])
    pr_ks = sorted({min(k, n_db) for k in ks})
    kmax = max(pr_ks)
    kneed = max([kk for _, kk, _ in stable_maps] + [kmax])
    cols = torch.tensor([k - 1 for k in pr_ks], device=dev)
    discount = _discount(kmax, dev) if ndcg else None
    harmonic = _harmonic(n_db, dev) if exp_kks else None
    use_hist = hamming and (bool(exp_kks) or pr_hamming)
    n_bits = p.query.shape[1]

    # per-query values, one row per query: every mean below is taken over these
    width = {"stable_pq": len(stable_maps), "stable_nrel": len(stable_maps), "exp_pq": len(exp_kks), "exp_nrel": 1,
             "hits": len(pr_ks), "n_rel": 1, "nd": len(pr_ks) if ndcg else 0,
             "total": n_bits + 1 if use_hist and pr_hamming else 0, "found": n_bits + 1 if use_hist and pr_hamming
             else 0, "hist_nrel": 1}
    acc = {name: torch.zeros(p.n_query, w, dtype=torch.float64, device=dev) for name, w in width.items()}
    stable_pq, stable_nrel, exp_pq, hits, nd, total, found = (acc[k] for k in (
        "stable_pq", "stable_nrel", "exp_pq", "hits", "nd", "total", "found"))
    exp_nrel, n_rel, hist_nrel = acc["exp_nrel"][:, 0], acc["n_rel"][:, 0], acc["hist_nrel"][:, 0]
    chunks, sharded = shard_chunks(list(_chunk_rows(p.n_query, n_db, chunk_size)), distributed)
    ws: dict = {}
    for rows in chunks:
        shared = _shared_labels(p, rows)
        rel = shared > 0
        groups = None
        if exp_kks and not hamming:  # the one full sort also gives the tie groups
            dist_sorted, order = torch.sort(_distances(p, rows), dim=1, stable=True)
            groups = _tie_groups(dist_sorted, rel.gather(1, order))
            del dist_sorted
        else:
            order = _stable_order(_distances(p, rows), kneed, _bits(p))
        rel_sorted = rel.gather(1, order[:, :kneed])
        count = torch.count_nonzero(rel, dim=1).double()
        for j, (_, kk, den) in enumerate(stable_maps):
            sums, got = _ap_stable_sum(rel_sorted, kk)
            big_r = got if kk == n_db else count
            d = big_r.clamp(max=kk) if den == "relevant" else got
            stable_nrel[rows, j] = big_r
            stable_pq[rows, j] = torch.where(d > 0, sums / d.clamp(min=1), 0.0)
        n_rel[rows] = count
        hits[rows] = torch.cumsum(rel_sorted[:, :kmax], dim=1, dtype=torch.float64).index_select(1, cols)
        if ndcg:
            nd[rows] = _ndcg_rows(shared, order, "exponential", discount, cols)
        del order, rel_sorted, rel
        if use_hist:
            groups = _hamming_histograms(p, rows, ws)
            if pr_hamming:
                hist_nrel[rows] = groups[1].sum(1)
                total[rows], found[rows] = torch.cumsum(groups[0], 1), torch.cumsum(groups[1], 1)
        if exp_kks:
            n_g, r_g = groups
            big_r = r_g.sum(1)
            exp_nrel[rows] = big_r
            sums = _expected_ap_sums(n_g, r_g, exp_kks, harmonic)
            d = torch.stack([big_r.clamp(max=kk) for kk in exp_kks], dim=1)
            exp_pq[rows] = torch.where(d > 0, sums / d.clamp(min=1), 0.0)
    if sharded:
        gather_rows(acc, chunks)

    out = []
    for k in wanted:  # mAP rows in the order of map_k, then denominators
        for den in denominators:
            if ties == "stable":
                j = stable_maps.index((k, n_db if k is None else k, den))
                value, _ = _finish(stable_pq[:, j].contiguous(), stable_nrel[:, j] == 0, empty)
            elif den == "relevant":
                j = expected_maps.index((k, n_db if k is None else k))
                value, _ = _finish(exp_pq[:, j].contiguous(), exp_nrel == 0, empty)
            else:
                continue
            out.append(("mAP", k, value, _variant("mAP", k, denominator=den, ties=ties, empty=empty)))
    for rec in _pr_from_counts(hits, n_rel, pr_ks, empty).itertuples():
        out.append(("P", rec.k, rec.precision, _variant("P", rec.k, ties="stable", empty=empty)))
        out.append(("R", rec.k, rec.recall, _variant("R", rec.k, ties="stable", empty=empty)))
    if ndcg:
        for rec in _ndcg_frame(nd, n_rel, pr_ks, empty).itertuples():
            out.append(("NDCG", rec.k, rec.ndcg, _variant("NDCG", rec.k, gain="exponential", ties="stable",
                                                          empty=empty)))
    if hamming:
        if extra_expected:
            value, _ = _finish(exp_pq[:, -1].contiguous(), exp_nrel == 0, empty)
            out.append(("mAP", None, value, _variant("mAP", None, denominator="relevant", ties="expected",
                                                     empty=empty)))
        if pr_hamming:
            for rec in _pr_hamming_from_counts(total, found, hist_nrel, empty).itertuples():
                out.append(("PR-hamming-P", rec.radius, rec.precision,
                            f"PR-hamming radius={rec.radius} empty={empty}"))
                out.append(("PR-hamming-R", rec.radius, rec.recall, f"PR-hamming radius={rec.radius} empty={empty}"))
    return out


def report_summary(df: pd.DataFrame) -> dict:
    """Headline numbers for report.json: map_i2t / map_t2i (the first mAP@all rows), mAP@K, P@K, R@K, NDCG@K
    keyed like `map@5000_i2t`, `p@10_t2i`, plus the variant strings and empty-query counts."""
    out: dict = {}
    tags = {"I->T": "i2t", "T->I": "t2i"}
    for direction, tag in tags.items():
        part = df[df["direction"] == direction]
        if part.empty:
            continue
        maps = part[(part["metric"] == "mAP") & part["k"].isna()]
        if not maps.empty:
            out[f"map_{tag}"] = float(maps.iloc[0]["value"])
            out[f"map_{tag}_variant"] = str(maps.iloc[0]["variant"])
        for metric in ("mAP", "P", "R", "NDCG"):
            sel = part[(part["metric"] == metric) & part["k"].notna()]
            for rec in sel.drop_duplicates(subset=["k"], keep="first").itertuples():
                out[f"{metric.lower()}@{int(rec.k)}_{tag}"] = float(rec.value)
        empty = part[part["metric"] == "empty-queries"]
        if not empty.empty:
            out[f"empty_queries_{tag}"] = int(empty.iloc[0]["value"])
    if "map_i2t" in out and "map_t2i" in out:
        out["map_mean"] = (out["map_i2t"] + out["map_t2i"]) / 2
    return out
