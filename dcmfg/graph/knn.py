"""Top-k search with one tie rule: exact (torch) or FAISS, over candidate blocks, with the CSLS hubness scores.

Scores are similarities (cosine on L2-normalised rows, or raw inner product), higher is better; ties go to the lower
database index, so every result is deterministic. Everything is computed on the inputs' device, chunked over query
rows (and over database blocks when one chunk's score matrix would be large), with no Python loop over items.

- `topk_stable`: row-wise top-k of a score matrix with the tie rule;
- `topk`: the k best database rows per query (torch or FAISS backend);
- `candidate_topk`: the k best *candidates* (all rows, or another modality than the query's; minus excluded rows;
  plus a per-row bias): what the relation of the graph asks (`dcmfg.graph.mutual`);
- `kth_neighbour_similarity`: tau, the score of each bank row's k-th candidate inside the bank;
- `hub_scores`: the candidates scored by cosine or CSLS (docs/method.md section 2).
"""

from __future__ import annotations

import numpy as np
import torch

from dcmfg.choices import Hubness, check
from dcmfg.graph import checks
from dcmfg.graph.checks import SearchInputError

# Above this many database rows (on CPU) "auto" hands the search to FAISS. Both backends are exact and cost O(rows)
# per query; the torch backend was the faster one at every size measured up to this one (benchmarks/bench_metrics.py
# times both), so the bank of the standard protocols stays with torch.
FAISS_AUTO_ROWS = 200_000
# Score-matrix budget for one (query chunk x database block) step of the torch backend.
BLOCK_BYTES = 256 * 2**20


def _prep(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric not in ("cosine", "ip"):
        raise SearchInputError(f"metric must be 'cosine' or 'ip', got {metric!r}")
    x = x.float()
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


# ----------------------------------------------------------------------------------------------------------------------
# exact top-k with the tie rule


def topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of a score matrix, sorted by descending score, ties by lower column index.

    torch.topk alone may return tied items in any order and may pick any member of a tie group at the cut. One
    topk of k + 1 shows which rows have a tie across the cut; only those rows take the exact (slower) selection.
    """
    n = scores.shape[1]
    if k >= n:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    vals, idx = torch.topk(scores, k + 1, dim=1, sorted=True)
    cut_tie = vals[:, k - 1] == vals[:, k]
    vals, idx = vals[:, :k], idx[:, :k]
    if bool(cut_tie.any()):
        rows = torch.nonzero(cut_tie).flatten()
        idx[rows] = _tied_cut_selection(scores[rows], vals[rows, k - 1 :], k)
    # Order inside the result: by index, then a stable sort by score.
    idx = torch.sort(idx, dim=1)[0]
    vals, perm = torch.sort(scores.gather(1, idx), dim=1, descending=True, stable=True)
    return vals, idx.gather(1, perm)


def _tied_cut_selection(scores: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (ascending) of the k best per row when ties straddle the cut: everything above the k-th
    value, then the tied items in index order."""
    greater = scores > kth
    need = k - greater.sum(1, keepdim=True, dtype=torch.int32)
    tied = scores == kth
    chosen = greater | (tied & (torch.cumsum(tied, 1, dtype=torch.int32) <= need))
    return chosen.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: ascending index in each row


def _masked_scores(
    q: torch.Tensor, d: torch.Tensor, rows: slice, cols: slice, exclude: torch.Tensor | None,
    allowed: torch.Tensor | None,
) -> torch.Tensor:
    """Scores of query rows x database block; excluded / disallowed pairs get -inf."""
    s = q[rows] @ d[cols].T
    if exclude is not None:
        ex = exclude[rows] - cols.start
        hit = (ex >= 0) & (ex < s.shape[1])
        s[torch.nonzero(hit).flatten(), ex[hit]] = float("-inf")
    if allowed is not None:  # (chunk, block) bool
        s.masked_fill_(~allowed, float("-inf"))
    return s


def _torch_topk(
    q: torch.Tensor, d: torch.Tensor, k: int, exclude: torch.Tensor | None, chunk_size: int,
    allowed_fn=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = d.shape[0]
    chunk = min(chunk_size, q.shape[0])
    block = max(k, min(n, BLOCK_BYTES // (4 * chunk)))
    out_s = torch.empty(q.shape[0], k, dtype=torch.float32, device=q.device)
    out_i = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, min(start + chunk, q.shape[0]))
        best_s = best_i = None
        for b0 in range(0, n, block):
            cols = slice(b0, min(b0 + block, n))
            allowed = allowed_fn(rows, cols) if allowed_fn is not None else None
            s = _masked_scores(q, d, rows, cols, exclude, allowed)
            vs, vi = topk_stable(s, min(k, s.shape[1]))
            vi = vi + b0
            if best_s is None:
                best_s, best_i = vs, vi
            else:
                # Earlier blocks hold lower indices, so a stable sort of [best, block] keeps the tie rule.
                cs, perm = torch.sort(torch.cat([best_s, vs], 1), dim=1, descending=True, stable=True)
                best_s, best_i = cs[:, :k], torch.cat([best_i, vi], 1).gather(1, perm[:, :k])
        out_s[rows], out_i[rows] = best_s, best_i
    return out_s, out_i


def _faiss_topk(
    q: torch.Tensor, d: torch.Tensor, k: int, exclude: torch.Tensor | None, index_kind: str, nprobe: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss  # optional and slow to import: only when a search goes to FAISS

    xb = np.ascontiguousarray(d.float().cpu().numpy())
    xq = np.ascontiguousarray(q.float().cpu().numpy())
    dim = xb.shape[1]
    if index_kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_kind == "ivf":
        nlist = max(1, min(4096, int(4 * np.sqrt(len(xb)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(xb)
        index.nprobe = min(nprobe, nlist)
    elif index_kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        raise SearchInputError(f"faiss_index must be 'flat', 'ivf' or 'hnsw', got {index_kind!r}")
    index.add(xb)
    extra = 1 if exclude is not None else 0
    scores, idx = index.search(xq, k + extra)
    scores, idx = torch.from_numpy(scores), torch.from_numpy(idx).long()
    # Same tie rule as torch inside the returned list: order by (score desc, index asc).
    order = torch.argsort(idx, dim=1, stable=True)
    scores, idx = scores.gather(1, order), idx.gather(1, order)
    perm = torch.sort(scores, dim=1, descending=True, stable=True)[1]
    scores, idx = scores.gather(1, perm), idx.gather(1, perm)
    if exclude is not None:
        drop = idx == exclude.cpu()[:, None]
        drop[:, -1] |= ~drop.any(1)  # rows whose excluded item was not returned drop their extra last hit
        scores, idx = scores[~drop].view(len(xq), k), idx[~drop].view(len(xq), k)
    return scores.to(q.device), idx.to(q.device)


def topk(
    query: torch.Tensor,
    database: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    backend: str = "auto",
    exclude: torch.Tensor | None = None,
    chunk_size: int = 2048,
    faiss_index: str = "flat",
    nprobe: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best database rows per query: (scores (Q, k) float32, indices (Q, k) int64), descending score.

    Ties go to the lower database index (exactly with the torch backend; FAISS orders ties inside its result the
    same way, while which tied items make the cut is FAISS's choice). `k` is capped at the number of candidates
    (N, or N - 1 with `exclude`). `exclude` (Q,) long drops one database index per query (e.g. the query itself;
    -1 = none). backend "auto": torch on GPU or below FAISS_AUTO_ROWS database rows, else FAISS; `faiss_index`
    "flat" is exact, "ivf" (nprobe lists) and "hnsw" are approximate.
    """
    q, d = checks.matrix_pair(query, database)
    k = checks.positive_int(k)
    checks.chunk_size(chunk_size)
    if backend not in ("auto", "torch", "faiss"):
        raise SearchInputError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    if exclude is not None:
        exclude = torch.as_tensor(exclude).to(q.device, torch.long)
        if exclude.shape != (q.shape[0],):
            raise SearchInputError(f"exclude must have shape ({q.shape[0]},) (one index per query), got "
                                   f"{tuple(exclude.shape)}")
        if bool(((exclude < -1) | (exclude >= d.shape[0])).any()):
            raise SearchInputError(f"exclude holds indices outside [-1, {d.shape[0] - 1}] of database {tuple(d.shape)}")
    k = min(k, d.shape[0] - (1 if exclude is not None else 0))
    if k < 1:
        raise SearchInputError(f"database {tuple(d.shape)} has no candidate left after exclude")
    qn, dn = _prep(q, metric), _prep(d, metric)
    if backend == "auto":
        backend = "torch" if (q.is_cuda or d.shape[0] < FAISS_AUTO_ROWS) else "faiss"
    if backend == "faiss":
        return _faiss_topk(qn, dn, k, exclude, faiss_index, nprobe)
    return _torch_topk(qn, dn, k, exclude, chunk_size)


# ----------------------------------------------------------------------------------------------------------------------
# candidates: the k best of another modality, minus excluded rows; tau inside a set


def _cross_modal_mask(modality: torch.Tensor):
    """allowed(rows, cols) -> bool mask of the pairs of different modalities (query rows x database block)."""

    def allowed(rows: slice, cols: slice) -> torch.Tensor:
        return modality[rows, None] != modality[None, cols]

    return allowed


def _candidate_counts(n: int, modality: torch.Tensor | None, cross_modal_only: bool,
                      device: torch.device | None = None) -> torch.Tensor:
    """Number of possible neighbours of each node (self excluded)."""
    if cross_modal_only:
        counts = torch.bincount(modality, minlength=int(modality.max()) + 1)
        return n - counts[modality]
    return torch.full((n,), n - 1, dtype=torch.long, device=device)


def kth_neighbour_similarity(
    bank: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    modality: torch.Tensor | None = None,
    cross_modal_only: bool = False,
    chunk_size: int = 2048,
) -> torch.Tensor:
    """tau (M,): similarity of each bank node's k-th nearest neighbour inside the bank (self excluded; with
    `cross_modal_only`, among the other modality). A node i is in kNN(j) iff sim(i, j) >= tau_j (up to exact ties)."""
    bank = checks.matrix(bank, "bank")
    k = checks.positive_int(k)
    m = bank.shape[0]
    mod = checks.per_row(modality, m, "modality", bank.device) if modality is not None else None
    if cross_modal_only and mod is None:
        raise SearchInputError("cross_modal_only=True needs modality ((M,) long, 0 = image, 1 = text)")
    avail = int(_candidate_counts(m, mod, cross_modal_only, bank.device).min())
    if k > avail:
        raise SearchInputError(f"k={k} but a bank node has only {avail} candidate neighbours (bank {tuple(bank.shape)}"
                               f"{', cross-modal only' if cross_modal_only else ''})")
    xn = _prep(bank, metric)
    self_index = torch.arange(m, device=bank.device)
    scores, _ = _torch_topk(xn, xn, k, self_index, chunk_size, _cross_modal_mask(mod) if cross_modal_only else None)
    return scores[:, k - 1]


def candidate_topk(
    query: torch.Tensor,
    database: torch.Tensor,
    k: int,
    *,
    query_modality: torch.Tensor | None = None,
    database_modality: torch.Tensor | None = None,
    cross_modal_only: bool = False,
    exclude: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    metric: str = "cosine",
    backend: str = "auto",
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates of each query row: (scores (Q, k) float32, indices (Q, k) long), best first; a query
    with fewer candidates has -inf / -1 at the end of its row.

    Candidates are all database rows, or with `cross_modal_only` the rows of another modality than the query's.
    `exclude` (Q,) or (Q, X) long: database rows a query must not get (-1: none), e.g. itself and its paired item.
    `bias` (D,): added to every score of database row j (CSLS ranks by cos(i, j) - r_j / 2). Each block of candidates
    is one `topk` call (FAISS for large databases with backend "auto"); a query's result never depends on the others.
    """
    q, d = checks.matrix_pair(query, database)
    k = checks.positive_int(k)
    qn, dn = _prep(q, metric), _prep(d, metric)
    if bias is not None:  # <[q, 1], [d, b]> = <q, d> + b: a per-row bias through the same inner-product search
        qn = torch.cat([qn, torch.ones(len(qn), 1, device=qn.device)], 1)
        dn = torch.cat([dn, bias.detach().to(dn.device, torch.float32)[:, None]], 1)
    n_q, n_d = len(qn), len(dn)
    if exclude is not None:
        exclude = torch.as_tensor(exclude).to(qn.device, torch.long)
        exclude = exclude[:, None] if exclude.ndim == 1 else exclude
        if exclude.shape[0] != n_q:
            raise SearchInputError(f"exclude must have shape ({n_q},) or ({n_q}, X), got {tuple(exclude.shape)}")
    if cross_modal_only:
        if query_modality is None or database_modality is None:
            raise SearchInputError("cross_modal_only=True needs modality ((N,) long, 0 = image, 1 = text)")
        qm = checks.per_row(query_modality, n_q, "query_modality", qn.device)
        dm = checks.per_row(database_modality, n_d, "database_modality", qn.device)
        blocks = [(qm == m, dm != m) for m in torch.unique(qm).tolist()]
    else:
        blocks = [(torch.ones(n_q, dtype=torch.bool, device=qn.device), torch.ones(n_d, dtype=torch.bool, device=qn.device))]
    out_s = torch.full((n_q, k), float("-inf"), device=qn.device)
    out_i = torch.full((n_q, k), -1, dtype=torch.long, device=qn.device)
    for q_rows, d_rows in blocks:
        q_rows, d_rows = q_rows.nonzero().flatten(), d_rows.nonzero().flatten()
        extra = 0 if exclude is None else exclude.shape[1]
        kk = min(k + extra, len(d_rows))
        if kk < 1 or len(q_rows) == 0:
            continue
        s, i = topk(qn[q_rows], dn[d_rows], kk, metric="ip", backend=backend, chunk_size=chunk_size)
        i = d_rows[i]
        if extra:  # drop excluded rows, then move the dropped slots to the end of the row (stable: tie order kept)
            s = s.masked_fill((i[:, :, None] == exclude[q_rows][:, None, :]).any(-1), float("-inf"))
            s, order = torch.sort(s, dim=1, descending=True, stable=True)
            i = i.gather(1, order)
        s, i = s[:, :k], i[:, :k]
        i = i.masked_fill(~torch.isfinite(s), -1)
        out_s[q_rows, : s.shape[1]], out_i[q_rows, : s.shape[1]] = s, i
    return out_s, out_i


def hub_scores(query, database, k: int, k_hub: int, candidate_kw: dict, hubness: str,
               r_database: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The k best candidates of each query, scored in the units of the mutual test: cosine (hubness "none"), or
    CSLS 2cos(x, y) - r(x) - r(y) with r = mean cosine to the k_hub nearest candidates, which lowers the score of
    hubs that are near to everything. `candidate_kw`: the `candidate_topk` options (candidates rule, exclude,
    metric); `r_database` (D,): the database rows' r (None: the database is the query set itself).
    Returns (scores (Q, k), indices (Q, k), r of the queries (Q,) or None)."""
    check(Hubness, hubness, "hubness", SearchInputError)
    if hubness == Hubness.NONE:
        s, i = candidate_topk(query, database, k, **candidate_kw)
        return s, i, None
    s0, _ = candidate_topk(query, database, k_hub, **candidate_kw)
    finite = torch.isfinite(s0)
    r_query = torch.where(finite, s0, 0.0).sum(1) / finite.sum(1).clamp(min=1)
    r_db = r_query if r_database is None else r_database.to(r_query)
    s, i = candidate_topk(query, database, k, bias=-r_db / 2, **candidate_kw)
    return torch.where(torch.isfinite(s), 2 * s - r_query[:, None], s), i, r_query
