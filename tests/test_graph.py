"""The dynamic cross-modal feature graph: which nodes connect (batch, static, bank), each relation switch against a
brute-force reference, the alignment score, and the graph statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dcmfg import graph as G
from dcmfg.config import GraphConfig
from dcmfg.errors import ConfigError
from dcmfg.graph import knn
from dcmfg.graph.stats import GraphTally, item_share


def _nodes(b=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * b, d, generator=g)
    modality = torch.cat([torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.long)])
    return h, modality


def _adj(edges, n):
    a = torch.zeros(n, n, dtype=torch.bool)
    a[edges[1], edges[0]] = True  # a[i, j]: message j -> i
    return a


def _cfg(**kw):
    base = dict(relation="mutual", k=3, cross_modal_only=False, exclude_pair=False, fallback="none")
    return GraphConfig(**{**base, **kw})


def _brute_lists(score: torch.Tensor, allowed: torch.Tensor, k: int) -> list[list[int]]:
    """Each row's k best allowed columns by (score desc, index asc)."""
    out = []
    for i in range(len(score)):
        cand = [j for j in range(score.shape[1]) if allowed[i, j]]
        out.append(sorted(cand, key=lambda j: (-float(score[i, j]), j))[:k])
    return out


def _brute_relation(score, allowed, k, k_rev):
    fwd, rev = _brute_lists(score, allowed, k), _brute_lists(score, allowed, k_rev)
    return {(j, i) for i in range(len(score)) for j in fwd[i] if i in rev[j]}


def _allowed(mod, cross, partner=None):
    n = len(mod)
    a = ~torch.eye(n, dtype=torch.bool)
    if cross:
        a &= mod[:, None] != mod[None, :]
    if partner is not None:
        a[torch.arange(n), partner] = False
    return a


def _edge_set(e):
    return {(int(j), int(i)) for j, i in e.T.tolist() if j != i}


def test_mutual_edges_are_symmetric_with_self_loops_and_reverse_knn():
    h, mod = _nodes()
    e = G.BatchGraph(_cfg(), 12).edges(0, h)
    a = _adj(e.index, len(h))
    assert torch.equal(a, a.T) and bool(a.diagonal().all())
    s = F.normalize(h, dim=1) @ F.normalize(h, dim=1).T
    assert _edge_set(e.index) == _brute_relation(s, _allowed(mod, False), 3, 3)
    assert bool(e.mutual[~e.self_loop].all()) and not bool(e.fallback.any())
    assert torch.equal(e.cross, mod[e.index[0]] != mod[e.index[1]])


@pytest.mark.parametrize("cross,exclude_pair", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("hubness,ratio", [("none", 1.0), ("csls", 1.0), ("none", 2.0), ("csls", 1.5)])
def test_each_relation_switch_matches_brute_force(cross, exclude_pair, hubness, ratio):
    """CSLS (2cos - r_i - r_j, r = mean cosine to the k nearest candidates), relaxed (k, k') mutuality and the
    exclusion of the paired item, computed by hand on the full score matrix."""
    h, mod = _nodes(b=15, seed=3)
    k = 4
    k_rev = math.ceil(ratio * k)
    partner = (torch.arange(30) + 15) % 30 if exclude_pair else None
    allowed = _allowed(mod, cross, partner)
    cos = F.normalize(h, dim=1) @ F.normalize(h, dim=1).T
    score = cos
    if hubness == "csls":
        r = torch.stack([cos[i][allowed[i]].topk(k).values.mean() for i in range(30)])
        score = 2 * cos - r[:, None] - r[None, :]
    want = _brute_relation(score, allowed, k, k_rev)
    cfg = _cfg(k=k, cross_modal_only=cross, exclude_pair=exclude_pair, hubness=hubness, reverse_ratio=ratio)
    e = G.BatchGraph(cfg, 15).edges(0, h)
    assert _edge_set(e.index) == want
    if ratio == 1.0:
        assert want == {(i, j) for j, i in want}  # (k, k) mutuality is symmetric
    # relation knn keeps the k best whatever the reverse test says, and flags which edges are mutual
    ek = G.BatchGraph(GraphConfig(**{**cfg.__dict__, "relation": "knn"}), 15).edges(0, h)
    fwd = _brute_lists(score, allowed, k)
    assert _edge_set(ek.index) == {(j, i) for i in range(30) for j in fwd[i]}
    flagged = {(int(j), int(i)) for (j, i), m in zip(ek.index.T.tolist(), ek.mutual.tolist()) if m}
    assert flagged == want


def test_relaxed_mutuality_adds_edges():
    h, mod = _nodes(b=20, seed=1)
    base = G.BatchGraph(_cfg(k=3, cross_modal_only=True), 20).edges(0, h)
    relaxed = G.BatchGraph(_cfg(k=3, cross_modal_only=True, reverse_ratio=3.0), 20).edges(0, h)
    assert _edge_set(base.index) < _edge_set(relaxed.index)


def test_fallback_gives_every_node_a_neighbour_and_is_flagged():
    # one far-away outlier: it is nobody's neighbour, so it has no mutual edge without the fallback
    h, mod = _nodes(b=8)
    h[0] = 100 * torch.ones(h.shape[1])
    h[1:] -= h[1:].mean(0)
    lonely = None
    for fallback, expect_alone in (("none", True), ("nearest", False)):
        e = G.BatchGraph(_cfg(k=2, fallback=fallback), 8).edges(0, h)
        a = _adj(e.index, len(h))
        a.fill_diagonal_(False)
        assert bool((a.sum(1) == 0).any()) == expect_alone
        lonely = (a.sum(1) == 0).nonzero().flatten() if lonely is None else lonely
    into = torch.isin(e.index[1], lonely) & ~e.self_loop
    assert bool(into.any()) and bool(e.fallback[into].all()) and not bool(e.mutual[into].any())


def test_k_larger_than_graph_is_a_config_error():
    h, mod = _nodes(b=3)
    with pytest.raises(ConfigError, match=r"graph.k=9 is larger than the graph"):
        G.BatchGraph(_cfg(k=9), 3).edges(0, h)
    with pytest.raises(ConfigError, match="graph.k=3"):
        G.BatchGraph(_cfg(k=3, cross_modal_only=True, exclude_pair=True), 3).edges(0, h)


def test_centring_uses_batch_means_in_training_and_frozen_running_means_after():
    h, mod = _nodes(b=10)
    h[mod == 1] += 3.0  # a modality gap
    c = G.ModalityCentre(16, momentum=0.5)
    out = c(h, mod)
    torch.testing.assert_close(out[mod == 0].mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.mean[1], h[mod == 1].mean(0))  # the first batch sets the running mean
    c(h + 1.0, mod)
    torch.testing.assert_close(c.mean[1], h[mod == 1].mean(0) + 0.5)
    c.eval()
    frozen = c.mean.clone()
    torch.testing.assert_close(c(h[:3], mod[:3]), h[:3] - frozen[0])
    assert torch.equal(c.mean, frozen) and "mean" in c.state_dict()
    # in the graph: centring is a switch that changes which nodes connect across a gap
    cfg = _cfg(k=3)
    plain = G.BatchGraph(cfg, 10).edges(0, h)
    centred = G.BatchGraph(cfg, 10, centre=torch.nn.ModuleList([G.ModalityCentre(16)])).edges(0, h)
    assert float(plain.cross[~plain.self_loop].float().mean()) < float(centred.cross[~centred.self_loop].float().mean())


def test_bank_density_scales_the_reverse_k():
    cfg = GraphConfig(k=8, bank_density="matched", reverse_ratio=1.0)
    assert G.bank_density(cfg, 526, 128) == pytest.approx(525 / 127)
    assert [p.k_reverse for p in G.parts(cfg, 525 / 127)] == [math.ceil(8 * 525 / 127)]
    assert G.bank_density(GraphConfig(bank_density="same"), 526, 128) == 1.0
    assert G.bank_density(cfg, 50, 128) == 1.0  # a bank smaller than a batch is not thinned
    two = G.parts(GraphConfig(k=4, cross_k=2, cross_modal_only=False, reverse_ratio=1.5))
    assert [(p.k, p.k_reverse, p.cross_modal_only) for p in two] == [(4, 6, False), (2, 3, True)]


def test_static_edges_join_pairs_of_mutual_neighbours_in_each_backbone_space():
    g = torch.Generator().manual_seed(5)
    raw_img, raw_txt = torch.randn(10, 7, generator=g), torch.randn(10, 5, generator=g)
    for cross in (True, False):
        e = G.BatchGraph(_cfg(relation="static", k=3, cross_modal_only=cross), 10, raw=(raw_img, raw_txt)).edges(0, None)
        got = _edge_set(e.index)
        want = set()
        for m, raw in ((0, raw_img), (1, raw_txt)):
            s = F.normalize(raw, dim=1) @ F.normalize(raw, dim=1).T
            rows = _brute_relation(s, ~torch.eye(10, dtype=torch.bool), 3, 3)
            for j, i in rows:
                want.add((j + (1 - m) * 10, i + m * 10))
                if not cross:
                    want.add((j + m * 10, i + m * 10))
        assert got == want
        assert not any(abs(j - i) == 10 for j, i in got)  # never its own pair
        if cross:
            assert bool(e.cross[~e.self_loop].all())


def test_bank_edges_of_a_query_do_not_depend_on_other_queries_and_exclude_its_copy():
    h, mod = _nodes(b=20)
    for cfg in (_cfg(k=4), _cfg(k=4, cross_modal_only=True, exclude_pair=True, hubness="csls", reverse_ratio=2.0)):
        graph = G.BatchGraph(cfg, 20)
        own = graph.edges(0, h)
        bank = G.Bank(n_pairs=20, modality=mod, states=[h], relations=[own.relation])
        q = torch.randn(7, h.shape[1], generator=torch.Generator().manual_seed(3))
        full = G.BankGraph(cfg, bank, 1).edges(0, q)
        bi = G.BankGraph(cfg, bank, 1).bank_index(full)
        for i in (0, 4):
            one = G.BankGraph(cfg, bank, 1).edges(0, q[i : i + 1])
            b1 = G.BankGraph(cfg, bank, 1).bank_index(one)
            assert sorted(b1.tolist()) == sorted(bi[full.index[1] == i].tolist())
        # bank members embedded as queries (copy excluded) get exactly the genuine edges they have in the bank graph
        members = torch.arange(20, 40)  # the texts
        qe = G.BankGraph(cfg, bank, 1, exclude=members).edges(0, h[members])
        qb = G.BankGraph(cfg, bank, 1, exclude=members).bank_index(qe)
        got = {(int(b), int(members[t])) for b, t, m in zip(qb.tolist(), qe.index[1].tolist(), qe.mutual.tolist()) if m}
        want = {(int(j), int(i)) for (j, i), m in zip(own.index.T.tolist(), own.mutual.tolist()) if m and i >= 20}
        assert got == want
        assert not bool((qb == members[qe.index[1]]).any())  # never its own copy
        if cfg.exclude_pair:
            assert not bool((qb == members[qe.index[1]] - 20).any())  # nor its own image


def test_cross_k_adds_cross_modal_edges_across_a_modality_gap():
    h, mod = _nodes(b=16)
    # a modality gap: each modality lives mostly in its own half of the dimensions
    h[mod == 0, 8:] *= 0.05
    h[mod == 1, :8] *= 0.05
    base = G.BatchGraph(_cfg(k=4), 16).edges(0, h)
    assert not bool(base.cross.any())
    both = G.BatchGraph(_cfg(k=4, cross_k=2), 16).edges(0, h)
    assert bool(both.cross.any())
    only = G.BatchGraph(_cfg(k=2, cross_modal_only=True), 16).edges(0, h)
    assert _edge_set(both.index) == _edge_set(base.index) | _edge_set(only.index)  # a union: nothing lost


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
    e = G.BatchGraph(_cfg(k=3, relation="knn"), 6, tokens=G.Tokens.unit(r, w, m)).edges(0, h)
    assert bool((e.align[~e.cross] == 0).all())
    dense = G.alignment_matrix_dense(r, w, m)
    src, dst = e.index[:, e.cross]
    img = torch.where(mod[src] == 0, src, dst)
    txt = torch.where(mod[src] == 0, dst, src)
    torch.testing.assert_close(e.align[e.cross], dense[img % 6, txt % 6])


def test_graph_statistics_on_a_hand_made_graph():
    # 4 targets: 0 has a mutual edge, 1 only a fallback edge, 2 a non-mutual (knn) edge, 3 nothing; self-loops.
    idx = torch.tensor([[1, 3, 0, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3]])
    e = G.Edges(index=idx, mutual=torch.tensor([1, 0, 0, 0, 0, 0, 0]).bool(),
                fallback=torch.tensor([0, 1, 0, 0, 0, 0, 0]).bool(),
                self_loop=torch.tensor([0, 0, 0, 1, 1, 1, 1]).bool(),
                cross=torch.tensor([1, 0, 1, 0, 0, 0, 0]).bool(), n_targets=4,
                occurrence=torch.tensor([2, 1, 0, 1]))
    alpha = torch.tensor([[0.5], [0.25], [1.0], [0.5], [0.75], [0.0], [1.0]])
    t = GraphTally()
    t.add(e, alpha)
    s = t.summary()
    assert s["graph_mutual_share"] == 0.25 and s["graph_fallback_share"] == 0.25
    assert s["graph_in_degree"] == 0.75 and s["graph_cross_share"] == pytest.approx(2 / 3)
    assert s["graph_out_degree"] == 0.75 and s["graph_out_degree_max"] == 1.0
    ent = -(2 * 0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / 4
    assert s["graph_attention_entropy"] == pytest.approx(ent)
    assert s["graph_self_attention"] == pytest.approx((0.5 + 0.75 + 0 + 1) / 4)
    occ = torch.tensor([2.0, 1, 0, 1])
    assert s["graph_hubness"] == pytest.approx(float(((occ - occ.mean()) ** 3).mean() / occ.std(unbiased=False) ** 3))
    both = GraphTally()
    both += t
    both += t
    assert both.summary() == s  # shares over twice the same targets do not change
    assert GraphTally().summary() == {}


def test_query_shares_are_counts_and_disjoint_shares_never_sum_past_one():
    # per-item means over 3 graph steps (k/3 in float32, as the embedding reports them); each step of an item is
    # either mutual or fallback-only, so the two shares must sum to 1 (up to one rounding), never above
    steps = 3
    mutual = torch.randint(0, steps + 1, (999,), generator=torch.Generator().manual_seed(0))
    as_means = lambda c: torch.stack([(torch.arange(steps) < x).float() for x in c.tolist()]).mean(1)  # noqa: E731
    m, f = item_share(as_means(mutual), steps), item_share(as_means(steps - mutual), steps)
    assert m == int(mutual.sum()) / (999 * steps)
    assert m + f <= 1.0 and m + f == pytest.approx(1.0, abs=1e-15)


def test_bank_search_goes_through_topk_with_auto_backend(monkeypatch):
    """Large banks must stay O(k) per query: every candidate search is one `knn.topk(backend='auto')` call per
    modality block (FAISS for large banks), never a dense query x bank matrix held by the graph code."""
    calls = []
    real = knn.topk

    def spy(q, d, k, **kw):
        calls.append((len(q), len(d), k, kw.get("backend")))
        return real(q, d, k, **kw)

    monkeypatch.setattr(knn, "topk", spy)
    h, mod = _nodes(b=20)
    cfg = _cfg(k=4, cross_modal_only=True)
    own = G.BatchGraph(cfg, 20).edges(0, h)
    bank = G.Bank(n_pairs=20, modality=mod, states=[h], relations=[own.relation])
    calls.clear()
    G.BankGraph(cfg, bank, 0).edges(0, torch.randn(5, 16))
    assert calls == [(5, 20, 4, "auto")]  # image queries against the 20 bank texts only


def test_centred_relation_is_the_plain_relation_of_the_centred_features():
    h, mod = _nodes(b=15, seed=4)
    h[mod == 1] += 2.0
    cfg = _cfg(k=4, cross_modal_only=False, exclude_pair=True)
    centre = torch.nn.ModuleList([G.ModalityCentre(16)])
    means = torch.stack([h[mod == 0].mean(0), h[mod == 1].mean(0)])
    got = G.BatchGraph(cfg, 15, centre=centre).edges(0, h)  # training mode: this batch's means
    want = G.BatchGraph(cfg, 15).edges(0, h - means[mod])
    assert torch.equal(got.index, want.index)
    centre.eval()  # inference: the frozen running means, whatever the batch
    other = h[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    got = G.BatchGraph(cfg, 15, centre=centre).edges(0, other)
    want = G.BatchGraph(cfg, 15).edges(0, other - centre[0].mean[mod])
    assert torch.equal(got.index, want.index)
