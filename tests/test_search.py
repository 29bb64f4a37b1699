"""Exact / FAISS top-k and the mutual-kNN tests, against brute-force references written with plain loops."""

from __future__ import annotations

import pytest
import torch

from dcmfg.graph import knn
from dcmfg.graph.checks import SearchInputError
from dcmfg.graph.knn import kth_neighbour_similarity, topk
from dcmfg.graph.mutual import mutual_graph, mutual_knn_edges, mutual_knn_to_bank
from graph_oracles import oracle_knn_within


def int_vectors(n: int, dim: int, seed: int, low: int = -2, high: int = 3) -> torch.Tensor:
    """Small integer vectors: inner products are exact in float32, so ties are exact ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, dim), generator=g).float()


def norm2_vectors(n: int, seed: int, dim: int = 6) -> torch.Tensor:
    """Entries in {0, +-1} with exactly 4 non-zeros: norm 2, so normalised rows and cosines are exact (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n, dim), generator=g).float() * 2 - 1
    zero = torch.argsort(torch.rand(n, dim, generator=g), dim=1)[:, : dim - 4]
    return x.scatter(1, zero, 0.0)


def brute_topk(q: torch.Tensor, d: torch.Tensor, k: int, exclude=None) -> list[list[int]]:
    s = (q.double() @ d.double().T).tolist()
    out = []
    for i, row in enumerate(s):
        cand = [j for j in range(len(row)) if exclude is None or j != int(exclude[i])]
        out.append(sorted(cand, key=lambda j: (-row[j], j))[:k])
    return out


def brute_knn_sets(x: torch.Tensor, k: int, modality=None) -> list[list[int]]:
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    s = (xn @ xn.T).tolist()
    out = []
    for i, row in enumerate(s):
        cand = [j for j in range(len(row)) if j != i and (modality is None or modality[j] != modality[i])]
        out.append(sorted(cand, key=lambda j: (-row[j], j))[:k])
    return out


def edge_set(edge_index: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(j), int(i)) for j, i in edge_index.T.tolist()}  # (source, target)


# ----------------------------------------------------------------------------------------------------------------------
# topk


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_matches_brute_force_with_ties_and_exclude(seed, monkeypatch):
    q, d = int_vectors(17, 5, seed), int_vectors(60, 5, seed + 10)
    d[30:40] = d[0:10]  # duplicated rows: exact ties across the database
    exclude = torch.randint(-1, 60, (17,), generator=torch.Generator().manual_seed(seed))
    for ex in (None, exclude):
        for k in (1, 4, 13, 100):
            want = brute_topk(q, d, min(k, 60 if ex is None else 59), ex)
            scores, idx = topk(q, d, k, metric="ip", exclude=ex, chunk_size=5)
            assert idx.tolist() == want
            assert scores.dtype == torch.float32 and idx.dtype == torch.int64
            assert torch.all(scores[:, 1:] <= scores[:, :-1])
            # Small database blocks: the running merge keeps the same answer (tie rule included).
            monkeypatch.setattr(knn, "BLOCK_BYTES", 16 * 5 * 7)
            assert topk(q, d, k, metric="ip", exclude=ex, chunk_size=5)[1].tolist() == want
            monkeypatch.undo()


def test_topk_cosine_float16_and_scores():
    q, d = torch.randn(9, 16), torch.randn(50, 16)
    s, i = topk(q.half(), d.half(), 5)
    ref = torch.nn.functional.normalize(q.half().float(), dim=1) @ torch.nn.functional.normalize(d.half().float(), dim=1).T
    assert torch.allclose(s, ref.gather(1, i), atol=1e-6)
    assert i.tolist() == brute_topk(torch.nn.functional.normalize(q.half().float(), dim=1),
                                    torch.nn.functional.normalize(d.half().float(), dim=1), 5)


@pytest.mark.parametrize("with_exclude", [False, True])
def test_torch_and_faiss_agree(with_exclude):
    g = torch.Generator().manual_seed(3)
    q, d = torch.randn(40, 32, generator=g), torch.randn(500, 32, generator=g)
    ex = torch.arange(40) * 7 if with_exclude else None
    st, it = topk(q, d, 10, backend="torch", exclude=ex)
    sf, i_f = topk(q, d, 10, backend="faiss", exclude=ex)
    assert torch.equal(it, i_f)
    assert torch.allclose(st, sf, atol=1e-5)
    if with_exclude:
        assert not bool((it == ex[:, None]).any())
    # Approximate indexes are at least sane on this easy set.
    _, ih = topk(q, d, 10, backend="faiss", faiss_index="hnsw")
    assert (ih == it).float().mean() > 0.9


# ----------------------------------------------------------------------------------------------------------------------
# kNN inside one set, mutual edges


def test_oracle_knn_within_is_the_brute_force_answer():
    x = norm2_vectors(30, 5)
    _, i = oracle_knn_within(x, 6)
    assert i.tolist() == brute_knn_sets(x, 6)
    groups = torch.arange(30) // 3
    _, ig = oracle_knn_within(x, 5, groups=groups)
    assert not bool((groups[ig] == groups[:, None]).any())


@pytest.mark.parametrize("cross", [False, True])
def test_kth_similarity_and_tau_of_the_relation_are_the_kth_neighbour(cross):
    x = norm2_vectors(30, 5)
    modality = torch.arange(30) % 2
    s, _ = oracle_knn_within(x, 6, groups=modality if cross else None)  # same modality excluded like a group
    tau = kth_neighbour_similarity(x, 6, modality=modality, cross_modal_only=cross)
    assert torch.equal(tau, s[:, 5])
    rel = mutual_graph(x, 6, modality=modality, cross_modal_only=cross)
    assert torch.equal(rel.tau, s[:, 5])


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("cross", [False, True])
def test_mutual_edges_match_brute_force(k, cross):
    x = norm2_vectors(40, 11 + k)
    modality = (torch.arange(40) % 2) if cross else None
    knn = brute_knn_sets(x, k, modality.tolist() if cross else None)
    mutual = {(j, i) for i in range(40) for j in knn[i] if i in knn[j]}
    e = mutual_knn_edges(x, k, modality=modality, cross_modal_only=cross, fallback="none", self_loops=False)
    assert edge_set(e) == mutual
    assert edge_set(e) == {(i, j) for j, i in edge_set(e)}  # symmetric
    assert all(j in knn[i] for j, i in edge_set(e))  # subset of kNN
    if cross:
        assert all(modality[j] != modality[i] for j, i in edge_set(e))
    ek = mutual_knn_edges(x, k, relation="knn", modality=modality, cross_modal_only=cross, fallback="none",
                          self_loops=False)
    assert edge_set(ek) == {(j, i) for i in range(40) for j in knn[i]}
    # fallback "nearest": every node ends with a neighbour; lonely nodes got exactly their nearest, both ways.
    ef = mutual_knn_edges(x, k, modality=modality, cross_modal_only=cross, fallback="nearest", self_loops=True)
    got = edge_set(ef)
    assert {(i, i) for i in range(40)} <= got and mutual <= got
    lonely = [i for i in range(40) if not any(t == i for _, t in mutual)]
    assert lonely or k > 1  # k=1 leaves some nodes without a mutual neighbour
    extra = {(knn[i][0], i) for i in lonely} | {(i, knn[i][0]) for i in lonely}
    assert got == mutual | extra | {(i, i) for i in range(40)}
    assert torch.equal(ef, mutual_knn_edges(x, k, modality=modality, cross_modal_only=cross))  # deterministic
    assert ef.dtype == torch.long and ef.shape[0] == 2


def test_fallback_outlier_and_small_batch():
    # An outlier's nearest neighbour has closer neighbours of its own: no mutual edge, so the fallback adds one.
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.98, 0.2], [0.0, 1.0]])
    e = mutual_knn_edges(x, 1, fallback="none", self_loops=False)
    assert 3 not in e[1].tolist()
    ef = mutual_knn_edges(x, 1, fallback="nearest", self_loops=False)
    assert {(2, 3), (3, 2)} <= edge_set(ef)
    # k larger than the batch: capped, every other node is a kNN neighbour.
    e_all = mutual_knn_edges(x, 10, self_loops=False)
    assert len(edge_set(e_all)) == 4 * 3
    # one node: only its self-loop
    assert mutual_knn_edges(x[:1], 3).tolist() == [[0], [0]]


# ----------------------------------------------------------------------------------------------------------------------
# bank mode


@pytest.mark.parametrize("cross", [False, True])
def test_bank_mutual_equals_within_set_and_is_query_independent(cross):
    g = torch.Generator().manual_seed(7)
    bank = torch.randn(80, 8, generator=g)
    modality = torch.arange(80) % 2
    kw = dict(cross_modal_only=cross)
    tau = kth_neighbour_similarity(bank, 5, modality=modality, **kw)
    qi, bj, sim = mutual_knn_to_bank(bank, bank, 5, tau, query_modality=modality, bank_modality=modality,
                                     exclude=torch.arange(80), fallback="none", **kw)
    within = mutual_knn_edges(bank, 5, modality=modality, fallback="none", self_loops=False, **kw)
    assert {(int(j), int(i)) for i, j in zip(qi, bj)} == edge_set(within)
    ref = torch.nn.functional.normalize(bank, dim=1)
    assert torch.allclose(sim, (ref[qi] * ref[bj]).sum(1), atol=1e-6)
    # Query independence: a query's edges are the same alone, in another batch, or in another order.
    queries = torch.randn(12, 8, generator=g)
    qmod = torch.arange(12) % 2
    full = mutual_knn_to_bank(queries, bank, 5, tau, query_modality=qmod, bank_modality=modality, **kw)
    perm = torch.randperm(12, generator=g)
    part = mutual_knn_to_bank(queries[perm[:5]], bank, 5, tau, query_modality=qmod[perm[:5]], bank_modality=modality,
                              chunk_size=2, **kw)
    for local, q in enumerate(perm[:5].tolist()):
        assert full[1][full[0] == q].tolist() == part[1][part[0] == local].tolist()
    # fallback: every query has >= 1 edge, and a query's edges are sorted by descending similarity
    assert set(full[0].tolist()) == set(range(12))
    for q in range(12):
        s = full[2][full[0] == q]
        assert torch.all(s[1:] <= s[:-1])


def test_bank_fallback_keeps_nearest():
    bank = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.98, 0.2]])
    tau = kth_neighbour_similarity(bank, 1)
    qi, bj, _ = mutual_knn_to_bank(torch.tensor([[0.0, 1.0]]), bank, 1, tau)
    assert qi.tolist() == [0] and bj.tolist() == [2]
    qi, _, _ = mutual_knn_to_bank(torch.tensor([[0.0, 1.0]]), bank, 1, tau, fallback="none")
    assert qi.numel() == 0


# ----------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors():
    x = torch.randn(10, 4)
    with pytest.raises(SearchInputError, match=r"query \(3, 5\) and database \(10, 4\)"):
        topk(torch.randn(3, 5), x, 2)
    bad = x.clone()
    bad[4, 0] = float("nan")
    with pytest.raises(SearchInputError, match=r"database \(10, 4\) contains 1 NaN/inf values \(first rows \[4\]\)"):
        topk(x[:2], bad, 2)
    with pytest.raises(SearchInputError, match="exclude must have shape"):
        topk(x, x, 2, exclude=torch.arange(3))
    with pytest.raises(SearchInputError, match="cross_modal_only=True needs modality"):
        mutual_knn_edges(x, 2, cross_modal_only=True)
    with pytest.raises(SearchInputError, match=r"modality must have shape \(10,\)"):
        mutual_knn_edges(x, 2, modality=torch.zeros(9), cross_modal_only=True)
    with pytest.raises(SearchInputError, match=r"tau must be a tensor of shape \(10,\)"):
        mutual_knn_to_bank(x[:2], x, 2, torch.zeros(3))
    with pytest.raises(SearchInputError, match=r"k=6 but a bank node has only 5 candidate"):
        kth_neighbour_similarity(x, 6, modality=torch.arange(10) % 2, cross_modal_only=True)
    with pytest.raises(SearchInputError, match="backend must be"):
        topk(x, x, 2, backend="annoy")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        topk(x, x, 0)
    with pytest.raises(SearchInputError, match="must be float"):
        topk(x.long(), x.long(), 1)
