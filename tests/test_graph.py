"""The dynamic cross-modal feature graph: which nodes connect (batch, static, bank) and the alignment score."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcmfg import graph as G
from dcmfg.config import GraphConfig
from dcmfg.errors import ConfigError


def _nodes(b=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * b, d, generator=g)
    modality = torch.cat([torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long)])
    return h, modality


def _adj(edges, n):
    a = torch.zeros(n, n, dtype=torch.bool)
    a[edges[1], edges[0]] = True  # a[i, j]: message j -> i
    return a


def test_mutual_edges_are_symmetric_with_self_loops_and_reverse_knn():
    h, mod = _nodes()
    cfg = GraphConfig(relation="mutual", k=3, fallback="none")
    a = _adj(G.batch_edges(h, mod, cfg), len(h))
    assert torch.equal(a, a.T)
    assert bool(a.diagonal().all())
    # brute force: i-j iff j in kNN(i) and i in kNN(j)
    s = F.normalize(h, dim=1) @ F.normalize(h, dim=1).T
    s.fill_diagonal_(-2)
    knn = torch.zeros_like(a)
    knn.scatter_(1, s.topk(3, dim=1).indices, True)
    expect = knn & knn.T
    off = a.clone()
    off.fill_diagonal_(False)
    assert torch.equal(off, expect)


def test_knn_relation_gives_k_in_edges_and_cross_modal_only_links_other_modality():
    h, mod = _nodes()
    a = _adj(G.batch_edges(h, mod, GraphConfig(relation="knn", k=4)), len(h))
    a.fill_diagonal_(False)
    assert a.sum(1).tolist() == [4] * len(h)
    a = _adj(G.batch_edges(h, mod, GraphConfig(relation="mutual", k=4, cross_modal_only=True)), len(h))
    a.fill_diagonal_(False)
    i, j = a.nonzero(as_tuple=True)
    assert len(i) > 0 and bool((mod[i] != mod[j]).all())


def test_fallback_gives_every_node_a_neighbour():
    # one far-away outlier: it is nobody's neighbour, so it has no mutual edge without the fallback
    h, mod = _nodes(b=8)
    h[0] = 100 * torch.ones(h.shape[1])
    h[1:] -= h[1:].mean(0)
    for fallback, expect_alone in (("none", True), ("nearest", False)):
        a = _adj(G.batch_edges(h, mod, GraphConfig(k=2, fallback=fallback)), len(h))
        a.fill_diagonal_(False)
        assert bool((a.sum(1) == 0).any()) == expect_alone


def test_k_larger_than_graph_is_a_config_error():
    h, mod = _nodes(b=3)
    with pytest.raises(ConfigError, match=r"graph.k=9 is larger than the graph"):
        G.batch_edges(h, mod, GraphConfig(k=9))
    with pytest.raises(ConfigError, match="graph.k=4"):
        G.batch_edges(h, mod, GraphConfig(k=4, cross_modal_only=True))


def test_static_edges_keep_pairs_and_stay_inside_modality():
    h, mod = _nodes(b=10)
    e = G.static_pair_edges(h[:10], h[10:], GraphConfig(k=3))
    a = _adj(e, 20)
    ar = torch.arange(10)
    assert bool(a[ar, ar + 10].all()) and bool(a[ar + 10, ar].all())
    a[ar, ar + 10] = False
    a[ar + 10, ar] = False
    i, j = a.nonzero(as_tuple=True)
    assert bool((mod[i] == mod[j]).all())


def test_bank_edges_of_a_query_do_not_depend_on_other_queries():
    h, mod = _nodes(b=20)
    cfg = GraphConfig(k=4)
    tau = G.bank_tau(h, mod, cfg)
    q = torch.randn(7, h.shape[1], generator=torch.Generator().manual_seed(3))
    qmod = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    qi, bj = G.query_bank_edges(q, qmod, h, mod, tau, cfg)
    for i in (0, 4):
        qi1, bj1 = G.query_bank_edges(q[i : i + 1], qmod[i : i + 1], h, mod, tau, cfg)
        assert sorted(bj1.tolist()) == sorted(bj[qi == i].tolist())
    # the reverse test against tau: every kept bank node j would have the query among its k nearest
    s = (F.normalize(q, dim=1) @ F.normalize(h, dim=1).T)[qi, bj]
    assert bool((s >= tau[bj] - 1e-5).all() | (torch.bincount(qi, minlength=7)[qi] == 1).all())


def test_exclude_drops_the_query_copy_in_the_bank():
    h, mod = _nodes(b=20)
    cfg = GraphConfig(k=4)
    tau = G.bank_tau(h, mod, cfg)
    qi, bj = G.query_bank_edges(h[:3], mod[:3], h, mod, tau, cfg)
    assert set(range(3)) <= set(bj[bj == qi].tolist())  # each finds itself
    qi, bj = G.query_bank_edges(h[:3], mod[:3], h, mod, tau, cfg, exclude=torch.arange(3))
    assert not bool((bj == qi).any())


def _reference_alignment(r, w, m):
    A = F.normalize(r, dim=-1) @ F.normalize(w, dim=-1).T  # (R, W)
    best = A.max(0).values[m]
    return best.mean()


def test_region_word_alignment_matches_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    r, w = torch.randn(5, 6, 8, generator=g), torch.randn(5, 7, 8, generator=g)
    m = torch.rand(5, 7, generator=g) > 0.4
    m[:, 0] = True
    got = G.region_word_alignment(r, w, m, chunk=2)
    ref = torch.stack([_reference_alignment(r[e], w[e], m[e]) for e in range(5)])
    torch.testing.assert_close(got, ref)
    dense = G.alignment_matrix_dense(r, w, m)
    torch.testing.assert_close(dense[torch.arange(5), torch.arange(5)], ref)
    torch.testing.assert_close(dense[1, 3], _reference_alignment(r[1], w[3], m[3]))


def test_edge_alignment_is_zero_on_same_modality_edges_and_matches_dense():
    h, mod = _nodes(b=6)
    g = torch.Generator().manual_seed(2)
    r, w = torch.randn(6, 4, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    m = torch.ones(6, 5, dtype=torch.bool)
    e = G.batch_edges(h, mod, GraphConfig(k=3, relation="knn"))
    row = torch.cat([torch.arange(6), torch.arange(6)])
    a = G.edge_alignment(e, mod, row, r, w, m)
    same = mod[e[0]] == mod[e[1]]
    assert bool((a[same] == 0).all())
    dense = G.alignment_matrix_dense(r, w, m)
    torch.testing.assert_close(G.edge_alignment(e, mod, row, r, w, m, dense), a)
    cross = ~same
    src, dst = e[:, cross]
    img = torch.where(mod[src] == 0, src, dst)
    txt = torch.where(mod[src] == 0, dst, src)
    torch.testing.assert_close(a[cross], dense[row[img], row[txt]])


def test_cross_k_adds_cross_modal_edges_across_a_modality_gap():
    h, mod = _nodes(b=16)
    # a modality gap: each modality lives mostly in its own half of the dimensions
    h[mod == 0, 8:] *= 0.05
    h[mod == 1, :8] *= 0.05
    base = G.batch_edges(h, mod, GraphConfig(k=4))
    assert not bool((mod[base[0]] != mod[base[1]]).any())
    both = G.batch_edges(h, mod, GraphConfig(k=4, cross_k=2))
    cross = mod[both[0]] != mod[both[1]]
    assert bool(cross.any())
    keys = lambda e: set((e[0] * 100 + e[1]).tolist())  # noqa: E731
    assert keys(base) <= keys(both)  # a union: nothing of the main relation is lost
    only = G.batch_edges(h, mod, GraphConfig(k=2, cross_modal_only=True))
    assert keys(both) == keys(base) | keys(only)
    # bank mode unites the same two relations
    cfg = GraphConfig(k=4, cross_k=2)
    taus = G.bank_taus(h, mod, cfg)
    qi, bj = G.query_bank_edges_all(h[:3], mod[:3], h, mod, taus, cfg, exclude=torch.arange(3))
    assert bool((mod[bj] != mod[qi]).any()) and len(set(zip(qi.tolist(), bj.tolist()))) == len(qi)
