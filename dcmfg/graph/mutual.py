"""The relation of the DCMFG graph (docs/method.md section 2): which pairs connect, within a set and against a bank.

On top of `dcmfg.graph.knn.candidate_topk`: each target's k best candidates (cosine, or CSLS with `hubness`), the
(k, k') mutual test, the fallback edge of a target left alone, self-loops. The mutual test is list membership inside
a set (`mutual_graph`) and the equivalent threshold against a bank (`mutual_to_bank`: score >= tau of the bank row,
its k'-th candidate's score), so both follow one rule and a query never depends on the other queries.

Edge lists follow PyG: row 0 = source j, row 1 = target i (message j -> i); edges are unique, sorted by target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcmfg.choices import Fallback, Hubness, Relation, check
from dcmfg.graph import checks
from dcmfg.graph.checks import SearchInputError
from dcmfg.graph.knn import hub_scores


@dataclass
class MutualRelation:
    """A mutual-kNN relation (or, with relation "knn", the kNN relation with its mutual flags). Edges j -> i (PyG
    order) with per-edge flags, and what the test used."""

    edge_index: torch.Tensor  # (2, E): source row (set or bank), target row (set or query)
    score: torch.Tensor  # (E,) score of the pair in the test's units (cosine or CSLS); self-loops: nan
    mutual: torch.Tensor  # (E,) bool: the pair passed the mutual test (j in kNN_k(i) and i in kNN_k'(j))
    fallback: torch.Tensor  # (E,) bool: added because the target had no relation edge
    neighbours: torch.Tensor  # (N, k) each target's k nearest candidates, -1 padded (k-occurrence, hubness)
    tau: torch.Tensor | None = None  # within a set: (N,) score of each row's k'-th candidate (-inf: fewer)
    r: torch.Tensor | None = None  # CSLS: (N,) mean cosine of each target row to its k nearest candidates


def _check_relation(relation: str, fallback: str) -> None:
    # The static relation is no test of its own: the graph runs this one on the frozen backbone features.
    if relation not in (Relation.MUTUAL, Relation.KNN):
        raise SearchInputError(f"relation must be '{Relation.MUTUAL}' or '{Relation.KNN}', got {relation!r}")
    check(Fallback, fallback, "fallback", SearchInputError)


def _assemble(nbr, sc, mutual, relation, fallback, n_targets, self_loops, symmetric_fallback=False):
    """Edges from forward lists (target rows x k candidates) and their mutual flags: the relation edges, the
    fallback edge of each target left without one, self-loops; unique, sorted by (target, source)."""
    valid = nbr >= 0
    kept = valid & (mutual if relation == Relation.MUTUAL else True)
    tgt_all = torch.arange(n_targets, device=nbr.device)[:, None].expand_as(nbr)
    src, tgt, flag_m, flag_f, score = nbr[kept], tgt_all[kept], mutual[kept], mutual[kept] & False, sc[kept]
    if fallback == Fallback.NEAREST:
        lonely = (~kept.any(1)) & valid[:, 0]
        nodes = lonely.nonzero().flatten()
        near = nbr[nodes, 0]
        add_src, add_tgt, add_sc = [near], [nodes], [sc[nodes, 0]]
        if symmetric_fallback:  # within a set the lonely node also reaches its nearest (the edge goes both ways)
            add_src, add_tgt, add_sc = add_src + [nodes], add_tgt + [near], add_sc + [sc[nodes, 0]]
        m = sum(len(a) for a in add_src)
        src, tgt = torch.cat([src, *add_src]), torch.cat([tgt, *add_tgt])
        score = torch.cat([score, *add_sc])
        flag_m = torch.cat([flag_m, torch.zeros(m, dtype=torch.bool, device=nbr.device)])
        flag_f = torch.cat([flag_f, torch.ones(m, dtype=torch.bool, device=nbr.device)])
    if self_loops:
        ar = torch.arange(n_targets, device=nbr.device)
        src, tgt = torch.cat([src, ar]), torch.cat([tgt, ar])
        score = torch.cat([score, torch.full((n_targets,), float("nan"), device=nbr.device)])
        flag_m = torch.cat([flag_m, torch.zeros(n_targets, dtype=torch.bool, device=nbr.device)])
        flag_f = torch.cat([flag_f, torch.zeros(n_targets, dtype=torch.bool, device=nbr.device)])
    n_src = int(max(int(src.max()) + 1 if len(src) else 0, n_targets, 1))
    key = tgt * n_src + src
    # A pair may come twice (a relation edge and a fallback edge back): keep one, a relation edge before a fallback.
    order = torch.argsort(key * 2 + flag_f.long(), stable=True)
    key, first = key[order], torch.ones(len(order), dtype=torch.bool, device=nbr.device)
    first[1:] = key[1:] != key[:-1]
    pick = order[first]
    return torch.stack([src[pick], tgt[pick]]), score[pick], flag_m[pick], flag_f[pick]


def mutual_graph(
    x: torch.Tensor,
    k: int,
    *,
    relation: str = "mutual",
    modality: torch.Tensor | None = None,
    partner: torch.Tensor | None = None,
    cross_modal_only: bool = False,
    k_reverse: int | None = None,
    hubness: str = "none",
    fallback: str = "nearest",
    self_loops: bool = True,
    metric: str = "cosine",
) -> MutualRelation:
    """The (mutual) kNN graph over the rows of x: edge j -> i iff j is among the k best candidates of i and i
    among the k' = `k_reverse` (default k) best of j; relation "knn" keeps every j of the k best (flagged mutual or
    not). Candidates exclude the row itself and its `partner` ((N,) long, -1 none: the paired item, which a query
    never has in the bank), and with `cross_modal_only` keep the other modality only. k is capped per row at its
    number of candidates. `hubness` "csls" scores pairs by 2cos - r_i - r_j (r = mean cosine to the k nearest
    candidates), which lowers the score of hubs that are near to everything. fallback "nearest": a row left without
    an edge gets one from its best candidate and one back to it. Self-loops last; edges unique, sorted by
    (target, source)."""
    x = checks.matrix(x, "x")
    k = checks.positive_int(k)
    k_reverse = k if k_reverse is None else checks.positive_int(k_reverse, "k_reverse")
    _check_relation(relation, fallback)
    n = x.shape[0]
    mod = checks.per_row(modality, n, "modality", x.device) if modality is not None else None
    if cross_modal_only and mod is None:
        raise SearchInputError("cross_modal_only=True needs modality ((N,) long, 0 = image, 1 = text)")
    exclude = torch.arange(n, device=x.device)[:, None]
    if partner is not None:
        exclude = torch.cat([exclude, checks.per_row(partner, n, "partner", x.device)[:, None]], 1)
    kw = dict(query_modality=mod, database_modality=mod, cross_modal_only=cross_modal_only, exclude=exclude,
              metric=metric)
    sc, nbr, r = hub_scores(x, x, max(k, k_reverse), k, kw, hubness, None)
    tau = sc[:, k_reverse - 1]
    # i in kNN_k'(j) by list membership (exact under ties: the tie rule of `topk` decides); a bank query, which is
    # in no list, uses the equivalent threshold test against tau instead (`mutual_to_bank`).
    rows = torch.arange(n, device=x.device)[:, None]
    rev = nbr[:, :k_reverse]
    sc, nbr = sc[:, :k], nbr[:, :k]
    mutual = (nbr >= 0) & torch.isin(nbr * n + rows, (rows * n + rev)[rev >= 0])
    edges, score, flag_m, flag_f = _assemble(nbr, sc, mutual, relation, fallback, n, self_loops, symmetric_fallback=True)
    return MutualRelation(edges, score, flag_m, flag_f, nbr, tau, r)


def mutual_to_bank(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    tau: torch.Tensor,
    *,
    relation: str = "mutual",
    query_modality: torch.Tensor | None = None,
    bank_modality: torch.Tensor | None = None,
    cross_modal_only: bool = False,
    exclude: torch.Tensor | None = None,
    hubness: str = "none",
    bank_r: torch.Tensor | None = None,
    fallback: str = "nearest",
    metric: str = "cosine",
    chunk_size: int = 2048,
    tolerance: float = 1e-6,
) -> MutualRelation:
    """Edges from a fixed bank to each query (edge_index row 0 = bank row, row 1 = query row; no self-loops).

    Edge j -> i iff j is among the k best bank candidates of query i and score(i, j) >= tau_j, the score of j's
    k'-th candidate inside the bank (from `mutual_graph(bank, ...).tau` with the same candidates rule, or
    `kth_neighbour_similarity`): i would be among j's k' nearest. With hubness "csls", `bank_r` is the bank rows'
    r and tau is in CSLS units; the query's own r comes from its own k nearest bank candidates. Each query is
    searched on its own, so its edges never depend on the other queries. `exclude` (Q,) or (Q, X): bank rows a
    query must not link to (its own copy and its partner when the query is a bank member). `tolerance` absorbs the
    last-bit difference between one pair's score computed in two different matrix products."""
    q, b = checks.matrix_pair(query, bank, "query", "bank")
    k = checks.positive_int(k)
    _check_relation(relation, fallback)
    if not isinstance(tau, torch.Tensor) or tau.shape != (b.shape[0],):
        raise SearchInputError(f"tau must be a tensor of shape ({b.shape[0]},) (one per bank row), got "
                               f"{tuple(tau.shape) if isinstance(tau, torch.Tensor) else type(tau).__name__}")
    if hubness == Hubness.CSLS and (bank_r is None or bank_r.shape != (b.shape[0],)):
        raise SearchInputError(f"hubness='csls' needs bank_r of shape ({b.shape[0]},) (each bank row's r)")
    checks.chunk_size(chunk_size)
    tau = tau.detach().to(q.device, torch.float32)
    kw = dict(query_modality=query_modality, database_modality=bank_modality, cross_modal_only=cross_modal_only,
              exclude=exclude, metric=metric, chunk_size=chunk_size)
    sc, nbr, r = hub_scores(q, b, k, k, kw, hubness, bank_r)
    mutual = (nbr >= 0) & (sc >= tau[nbr.clamp(min=0)] - tolerance)
    edges, score, flag_m, flag_f = _assemble(nbr, sc, mutual, relation, fallback, q.shape[0], self_loops=False)
    # by query, then by descending score (ties: lower bank row first, the order _assemble left them in)
    by_score = torch.argsort(-score, stable=True)
    order = by_score[torch.argsort(edges[1][by_score], stable=True)]
    return MutualRelation(edges[:, order], score[order], flag_m[order], flag_f[order], nbr, None, r)


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
    """edge_index (2, E) long over the rows of x (PyG: row 0 source j, row 1 target i): `mutual_graph` without the
    flags. knn: j -> i for every j in kNN(i). mutual: i - j (both directions) iff i in kNN(j) and j in kNN(i)."""
    return mutual_graph(x, k, relation=relation, modality=modality, cross_modal_only=cross_modal_only,
                        fallback=fallback, self_loops=self_loops, metric=metric).edge_index


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
    """`mutual_to_bank` as (query_index (E,), bank_index (E,), similarity (E,)), sorted by query, then by
    descending similarity."""
    rel = mutual_to_bank(query, bank, k, tau, query_modality=query_modality, bank_modality=bank_modality,
                         cross_modal_only=cross_modal_only, fallback=fallback, metric=metric, exclude=exclude,
                         chunk_size=chunk_size, tolerance=tolerance)
    return rel.edge_index[1], rel.edge_index[0], rel.score
