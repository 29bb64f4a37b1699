"""Exact and FAISS top-k search and the mutual-kNN tests of the DCMFG graph (within one set, and against a bank).

Conventions shared with `dcmfg.graph`: scores are similarities (cosine on L2-normalised rows, or raw inner product),
higher is better; ties go to the lower database index, so every result is deterministic. Edge lists follow PyG:
row 0 = source j, row 1 = target i (message j -> i). Everything is computed on the inputs' device, chunked over query
rows (and over database blocks when one chunk's score matrix would be large), with no Python loop over items.
"""

from __future__ import annotations

import numpy as np
import torch

from dcmfg.errors import DcmfgError

# Above this many database rows (on CPU) "auto" hands the search to FAISS.
FAISS_AUTO_ROWS = 200_000
# Score-matrix budget for one (query chunk x database block) step of the torch backend.
BLOCK_BYTES = 256 * 2**20


class SearchInputError(DcmfgError, ValueError):
    """Inputs to a search that cannot be right: shapes, NaN, k out of range, unknown options."""


# ----------------------------------------------------------------------------------------------------------------------
# checks


def _matrix(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise SearchInputError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise SearchInputError(f"{name} must be 2-D (rows x dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise SearchInputError(f"{name} has no rows (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise SearchInputError(f"{name} must be float16/float32, got {x.dtype}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise SearchInputError(f"{name} {tuple(x.shape)} contains {int(bad.sum())} NaN/inf values (first rows {rows})")
    return x.detach()


def _pair(query, database, qname: str = "query", dname: str = "database") -> tuple[torch.Tensor, torch.Tensor]:
    q, d = _matrix(query, qname), _matrix(database, dname)
    if q.shape[1] != d.shape[1]:
        raise SearchInputError(
            f"{qname} {tuple(q.shape)} and {dname} {tuple(d.shape)} have different widths ({q.shape[1]} vs {d.shape[1]})"
        )
    return q, d.to(q.device)


def _prep(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric not in ("cosine", "ip"):
        raise SearchInputError(f"metric must be 'cosine' or 'ip', got {metric!r}")
    x = x.float()
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchInputError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def _modality(m, n: int, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        m = torch.as_tensor(m)
    if m.shape != (n,):
        raise SearchInputError(f"{name} must have shape ({n},) (one entry per row), got {tuple(m.shape)}")
    return m.to(device=device, dtype=torch.long)


def _check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise SearchInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


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
    import faiss

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
    q, d = _pair(query, database)
    k = _check_k(k)
    _check_chunk(chunk_size)
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
# kNN inside one set and the mutual test


def _candidates_fn(modality: torch.Tensor | None, groups: torch.Tensor | None, cross_modal_only: bool,
                   q_modality: torch.Tensor | None = None):
    """allowed(rows, cols) -> bool mask of pairs that may be neighbours, or None when all may."""
    if not cross_modal_only and groups is None:
        return None
    qm = q_modality if q_modality is not None else modality

    def allowed(rows: slice, cols: slice) -> torch.Tensor:
        ok = None
        if cross_modal_only:
            ok = qm[rows, None] != modality[None, cols]
        if groups is not None:
            same = groups[rows, None] == groups[None, cols]
            ok = ~same if ok is None else ok & ~same
        return ok

    return allowed


def _within(
    x: torch.Tensor, k: int, metric: str, modality: torch.Tensor | None, cross_modal_only: bool,
    groups: torch.Tensor | None = None, chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inside one set with self (and disallowed pairs) at -inf; rows may contain -inf entries at the end."""
    xn = _prep(x, metric)
    self_index = torch.arange(x.shape[0], device=x.device)
    return _torch_topk(xn, xn, k, self_index, chunk_size, _candidates_fn(modality, groups, cross_modal_only))


def _candidate_counts(n: int, modality: torch.Tensor | None, cross_modal_only: bool,
                      groups: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Number of possible neighbours of each node (self excluded)."""
    if cross_modal_only:
        counts = torch.bincount(modality, minlength=int(modality.max()) + 1)
        avail = n - counts[modality]
    else:
        avail = torch.full((n,), n - 1, dtype=torch.long, device=device)
    if groups is not None:
        g = torch.unique(groups, return_inverse=True)[1]
        avail = avail - (torch.bincount(g)[g] - 1)
    return avail


def knn_within(
    x: torch.Tensor, k: int, *, metric: str = "cosine", groups: torch.Tensor | None = None, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows of each row inside one set, self excluded: (scores (N, k), indices (N, k)).

    `groups` (N,) long: rows sharing a group id (e.g. the captions of one image) are excluded like self.
    """
    x = _matrix(x, "x")
    k = _check_k(k)
    n = x.shape[0]
    g = _modality(groups, n, "groups", x.device) if groups is not None else None
    avail = int(_candidate_counts(n, None, False, g, x.device).min().item()) if g is not None else n - 1
    if k > avail:
        what = f"{n} rows" if g is None else f"{n} rows whose smallest candidate set (other groups) has {avail}"
        raise SearchInputError(f"k={k} nearest neighbours requested but x has {what}; need k <= {avail}")
    return _within(x, k, metric, None, False, g, chunk_size)


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
    bank = _matrix(bank, "bank")
    k = _check_k(k)
    m = bank.shape[0]
    mod = _modality(modality, m, "modality", bank.device) if modality is not None else None
    if cross_modal_only and mod is None:
        raise SearchInputError("cross_modal_only=True needs modality ((M,) long, 0 = image, 1 = text)")
    avail = int(_candidate_counts(m, mod, cross_modal_only, None, bank.device).min())
    if k > avail:
        raise SearchInputError(f"k={k} but a bank node has only {avail} candidate neighbours (bank {tuple(bank.shape)}"
                               f"{', cross-modal only' if cross_modal_only else ''})")
    scores, _ = _within(bank, k, metric, mod, cross_modal_only, None, chunk_size)
    return scores[:, k - 1]


def mutual_knn_edges(
    x: torch.Tensor,
    k: int,
    *,
    relation: str = "mutual",
    modality: torch.Tensor | None = None,
    cross_modal_only: bool = False,
    fallback: str = "nearest",
    self_loops: bool = True,
    metric: str = "cosine",
) -> torch.Tensor:
    """edge_index (2, E) long over the rows of x (PyG: row 0 source j, row 1 target i).

    knn: j -> i for every j in kNN(i). mutual: i - j (both directions) iff i in kNN(j) and j in kNN(i). kNN excludes
    self; with `cross_modal_only` the candidates are the other modality's nodes. k is capped per node at its number of
    candidates (a small batch never fails). fallback "nearest": a node left without a neighbour gets an edge from its
    single nearest candidate and one back to it. Self-loops are added last. Edges are unique and sorted by
    (target, source).
    """
    x = _matrix(x, "x")
    k = _check_k(k)
    if relation not in ("mutual", "knn"):
        raise SearchInputError(f"relation must be 'mutual' or 'knn', got {relation!r}")
    if fallback not in ("nearest", "none"):
        raise SearchInputError(f"fallback must be 'nearest' or 'none', got {fallback!r}")
    n = x.shape[0]
    mod = _modality(modality, n, "modality", x.device) if modality is not None else None
    if cross_modal_only and mod is None:
        raise SearchInputError("cross_modal_only=True needs modality ((N,) long, 0 = image, 1 = text)")
    k_eff = min(k, n - 1)
    if k_eff >= 1:
        scores, nbr = _within(x, k_eff, metric, mod, cross_modal_only)
        valid = torch.isfinite(scores)
        tgt = torch.arange(n, device=x.device)[:, None].expand_as(nbr)[valid]  # i
        src = nbr[valid]  # j in kNN(i)
        if relation == "mutual":
            keys = tgt * n + src
            keep = torch.isin(keys, src * n + tgt)  # the reverse pair exists: i in kNN(j)
            src, tgt = src[keep], tgt[keep]
        if fallback == "nearest":
            lonely = torch.bincount(tgt, minlength=n) == 0
            has_any = valid[:, 0]
            nodes = torch.nonzero(lonely & has_any).flatten()
            near = nbr[nodes, 0]
            src = torch.cat([src, near, nodes])
            tgt = torch.cat([tgt, nodes, near])
    else:
        src = tgt = torch.empty(0, dtype=torch.long, device=x.device)
    if self_loops:
        ar = torch.arange(n, device=x.device)
        src, tgt = torch.cat([src, ar]), torch.cat([tgt, ar])
    keys = torch.unique(tgt * n + src)  # sorted: deterministic order, duplicates from the fallback removed
    return torch.stack([keys % n, keys // n])


def mutual_knn_to_bank(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    tau: torch.Tensor,
    *,
    query_modality: torch.Tensor | None = None,
    bank_modality: torch.Tensor | None = None,
    cross_modal_only: bool = False,
    fallback: str = "nearest",
    metric: str = "cosine",
    exclude: torch.Tensor | None = None,
    chunk_size: int = 2048,
    tolerance: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual-kNN edges from a fixed bank to each query: (query_index (E,), bank_index (E,), sim (E,)).

    Edge i <- j iff j is in kNN_bank(i) and sim(i, j) >= tau_j (i would be in j's kNN inside the bank; tau from
    `kth_neighbour_similarity` with the same k, metric and cross_modal_only). A query with no such j keeps its single
    nearest bank node (fallback "nearest"). Each query is searched on its own row, so its edges never depend on the
    other queries. `exclude` (Q,) long drops one bank index per query (a query that is itself a bank member).
    `tolerance` absorbs float rounding between this search and the bank's own (the same pair's similarity computed
    in two matrix products can differ in the last bit).
    Edges come sorted by query, then by descending similarity.
    """
    q, b = _pair(query, bank, "query", "bank")
    k = _check_k(k)
    if fallback not in ("nearest", "none"):
        raise SearchInputError(f"fallback must be 'nearest' or 'none', got {fallback!r}")
    if not isinstance(tau, torch.Tensor) or tau.shape != (b.shape[0],):
        raise SearchInputError(f"tau must be a tensor of shape ({b.shape[0]},) (one per bank row), got "
                               f"{tuple(tau.shape) if isinstance(tau, torch.Tensor) else type(tau).__name__}")
    tau = tau.detach().to(q.device, torch.float32)
    qm = bm = None
    if cross_modal_only:
        if query_modality is None or bank_modality is None:
            raise SearchInputError("cross_modal_only=True needs query_modality and bank_modality (0 = image, 1 = text)")
        qm = _modality(query_modality, q.shape[0], "query_modality", q.device)
        bm = _modality(bank_modality, b.shape[0], "bank_modality", q.device)
    if exclude is not None:
        exclude = torch.as_tensor(exclude).to(q.device, torch.long)
        if exclude.shape != (q.shape[0],):
            raise SearchInputError(f"exclude must have shape ({q.shape[0]},), got {tuple(exclude.shape)}")
    k_eff = min(k, b.shape[0])
    qn, bn = _prep(q, metric), _prep(b, metric)
    allowed = _candidates_fn(bm, None, cross_modal_only, q_modality=qm)
    scores, nbr = _torch_topk(qn, bn, k_eff, exclude, chunk_size, allowed)
    valid = torch.isfinite(scores)
    keep = valid & (scores >= tau[nbr] - tolerance)
    if fallback == "nearest":
        keep[:, 0] |= valid[:, 0] & ~keep.any(1)
    qi = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(nbr)
    return qi[keep], nbr[keep], scores[keep]
