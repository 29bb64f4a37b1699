"""Metrics against obviously-correct slow references (loops over queries and ranks) and hand-computed examples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch

import dcmfg.metrics.ties
from dcmfg.metrics import (
    MetricInputError,
    count_empty_queries,
    mean_average_precision,
    pr_curve_hamming,
    precision_recall_at_k,
    report_summary,
    retrieval_report,
)
from metric_oracles import oracle_ndcg_at_k, oracle_pr_curve_rank

# ----------------------------------------------------------------------------------------------------------------------
# slow references: one query at a time, plain Python over ranks


def ref_distance(q: np.ndarray, d: np.ndarray, distance: str) -> np.ndarray:
    """Lower = better, exactly as docs/metrics.md ranks: -cosine, or the Hamming distance of sign patterns."""
    if distance == "hamming":
        qb, db = q > 0, d > 0
        return np.array([[int(np.sum(a != b)) for b in db] for a in qb], dtype=np.float64)
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    dn = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    return -(qn.astype(np.float32) @ dn.astype(np.float32).T).astype(np.float64)


def ref_order(dist_row: np.ndarray) -> list[int]:
    return sorted(range(len(dist_row)), key=lambda j: (dist_row[j], j))


def ref_ap(rel_ranked: list[bool], n_rel: int, k: int, denominator: str) -> float:
    hits, total = 0, 0.0
    for rank, rel in enumerate(rel_ranked[:k], start=1):
        if rel:
            hits += 1
            total += hits / rank
    den = min(n_rel, k) if denominator == "relevant" else hits
    return total / den if den > 0 else 0.0


def ref_expected_ap(dist_row: np.ndarray, rel_row: np.ndarray, k: int) -> float:
    """Average of AP@K over every order inside each tie group (brute force)."""
    n_rel = int(rel_row.sum())
    groups = [np.flatnonzero(dist_row == v) for v in sorted(set(dist_row.tolist()))]
    per_group = [sorted(set(itertools.permutations(rel_row[g].tolist()))) for g in groups]
    # Counting multiplicities: every distinct pattern of a group appears equally often among its permutations.
    values = []
    for combo in itertools.product(*per_group):
        ranked = [bool(x) for pattern in combo for x in pattern]
        values.append(ref_ap(ranked, n_rel, k, "relevant"))
    return float(np.mean(values))


def ref_map(q, d, ql, dl, distance, k=None, denominator="relevant", ties="stable", empty="zero"):
    dist = ref_distance(q, d, distance)
    rel = (ql @ dl.T) > 0
    aps = []
    for i in range(len(q)):
        n_rel = int(rel[i].sum())
        if n_rel == 0:
            if empty == "zero":
                aps.append(0.0)
            continue
        kk = len(d) if k is None else min(k, len(d))
        if ties == "stable":
            ranked = [bool(rel[i][j]) for j in ref_order(dist[i])]
            aps.append(ref_ap(ranked, n_rel, kk, denominator))
        else:
            aps.append(ref_expected_ap(dist[i], rel[i], kk))
    return float(np.mean(aps))


def ref_pr_at_k(q, d, ql, dl, distance, ks, empty="zero"):
    dist = ref_distance(q, d, distance)
    rel = (ql @ dl.T) > 0
    rows = []
    for k in sorted({min(k, len(d)) for k in ks}):
        ps, rs = [], []
        for i in range(len(q)):
            n_rel = int(rel[i].sum())
            if n_rel == 0 and empty == "exclude":
                continue
            top = ref_order(dist[i])[:k]
            hits = sum(bool(rel[i][j]) for j in top)
            ps.append(hits / k)
            rs.append(hits / n_rel if n_rel else 0.0)
        rows.append((k, np.mean(ps), np.mean(rs)))
    return rows


def ref_ndcg(q, d, ql, dl, distance, ks):
    dist = ref_distance(q, d, distance)
    grades = ql.astype(int) @ dl.astype(int).T
    out = []
    for k in sorted({min(k, len(d)) for k in ks}):
        vals = []
        for i in range(len(q)):
            ranked = [grades[i][j] for j in ref_order(dist[i])][:k]
            ideal = sorted(grades[i].tolist(), reverse=True)[:k]
            dcg = sum((2**g - 1) / math.log2(r + 2) for r, g in enumerate(ranked))
            idcg = sum((2**g - 1) / math.log2(r + 2) for r, g in enumerate(ideal))
            vals.append(dcg / idcg if idcg > 0 else 0.0)
        out.append((k, np.mean(vals)))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# random data with many ties, empty queries, single- and multi-label


def make_case(seed: int, n_query=23, n_db=40, bits=4, n_labels=5, single_label=False, dim=6):
    rng = np.random.default_rng(seed)
    if single_label:
        ql = np.eye(n_labels, dtype=np.uint8)[rng.integers(0, n_labels, n_query)]
        dl = np.eye(n_labels + 1, dtype=np.uint8)[rng.integers(0, n_labels + 1, n_db)][:, :n_labels]
        ql = np.concatenate([ql, np.zeros((n_query, 1), np.uint8)], 1)
        dl = np.concatenate([dl, (dl.sum(1, keepdims=True) == 0).astype(np.uint8)], 1)
        ql[-1] = 0
        ql[-1, -1] = 1  # may have no relevant item if the last class is absent
    else:
        ql = (rng.random((n_query, n_labels)) < 0.25).astype(np.uint8)
        dl = (rng.random((n_db, n_labels)) < 0.25).astype(np.uint8)
    ql[0] = 0  # a query with no label: never any relevant item
    codes_q = rng.choice([-1.0, 1.0], size=(n_query, bits)).astype(np.float32)
    codes_d = rng.choice([-1.0, 1.0], size=(n_db, bits)).astype(np.float32)
    # Real embeddings with exact ties: entries in {0, +-1} with exactly 4 non-zeros (norm 2, so normalising and
    # every cosine are exact in float32), some duplicated rows.
    def unit_rows(n: int) -> np.ndarray:
        x = rng.choice([-1.0, 1.0], size=(n, dim)).astype(np.float32)
        for row in x:
            row[rng.permutation(dim)[: dim - 4]] = 0.0
        return x

    emb_q, emb_d = unit_rows(n_query), unit_rows(n_db)
    emb_d[1::4] = emb_d[0::4][: len(emb_d[1::4])]
    return codes_q, codes_d, emb_q, emb_d, ql, dl


CASES = [(0, False), (1, False), (2, True), (3, True)]


@pytest.mark.parametrize("seed,single", CASES)
@pytest.mark.parametrize("distance", ["hamming", "cosine"])
@pytest.mark.parametrize("k", [None, 7, 1000])
@pytest.mark.parametrize("denominator", ["relevant", "retrieved"])
def test_map_stable_matches_reference(seed, single, distance, k, denominator):
    cq, cd, eq, ed, ql, dl = make_case(seed, single_label=single)
    q, d = (cq, cd) if distance == "hamming" else (eq, ed)
    assert count_empty_queries(ql, dl) >= 1
    for empty in ("zero", "exclude"):
        got = mean_average_precision(
            torch.from_numpy(q), torch.from_numpy(d), ql, dl, distance=distance, k=k, denominator=denominator,
            empty=empty, chunk_size=5,
        )
        want = ref_map(q, d, ql, dl, distance, k=k, denominator=denominator, empty=empty)
        assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed,single", CASES)
@pytest.mark.parametrize("k", [None, 9, 1000])
def test_map_expected_ties_matches_brute_force(seed, single, k):
    cq, cd, eq, ed, ql, dl = make_case(seed, n_query=9, n_db=11, bits=3, single_label=single)
    want = ref_map(cq, cd, ql, dl, "hamming", k=k, ties="expected")
    got = mean_average_precision(cq, cd, ql, dl, distance="hamming", k=k, ties="expected", chunk_size=4)
    assert got == pytest.approx(want, abs=1e-12)
    # The sort-based group path (cosine) on +-1 codes has exactly the Hamming tie groups.
    got_cos = mean_average_precision(cq, cd, ql, dl, distance="cosine", k=k, ties="expected")
    assert got_cos == pytest.approx(want, abs=1e-12)
    want_cos = ref_map(eq, ed, ql, dl, "cosine", k=k, ties="expected")
    assert mean_average_precision(eq, ed, ql, dl, k=k, ties="expected") == pytest.approx(want_cos, abs=1e-12)


def test_histogram_paths_agree(monkeypatch):
    # Many labels take the unfused histogram (relevance first); it must give the same numbers as the fused one.
    cq, cd, _, _, ql, dl = make_case(6, n_query=9, n_db=11, bits=3)
    fused = (mean_average_precision(cq, cd, ql, dl, distance="hamming", ties="expected"),
             pr_curve_hamming(cq, cd, ql, dl))
    monkeypatch.setattr(dcmfg.metrics.ties, "_FUSED_HISTOGRAM_BINS", 4)
    assert mean_average_precision(cq, cd, ql, dl, distance="hamming", ties="expected") == pytest.approx(fused[0],
                                                                                                         abs=1e-12)
    pd.testing.assert_frame_equal(pr_curve_hamming(cq, cd, ql, dl), fused[1])
    assert fused[0] == pytest.approx(ref_map(cq, cd, ql, dl, "hamming", ties="expected"), abs=1e-12)


def test_per_query_and_empty_rule():
    cq, cd, _, _, ql, dl = make_case(5)
    mean0, per0 = mean_average_precision(cq, cd, ql, dl, distance="hamming", return_per_query=True)
    mean1, per1 = mean_average_precision(cq, cd, ql, dl, distance="hamming", empty="exclude", return_per_query=True)
    empty = torch.from_numpy(((ql @ dl.T) > 0).sum(1) == 0)
    assert bool(empty[0]) and per0.shape == (len(cq),)
    assert torch.all(per0[empty] == 0) and torch.all(torch.isnan(per1[empty]))
    assert mean0 == pytest.approx(float(per0.mean()))
    assert mean1 == pytest.approx(float(per0[~empty].mean()))
    assert mean1 > mean0


@pytest.mark.parametrize("seed,single", CASES)
@pytest.mark.parametrize("distance", ["hamming", "cosine"])
def test_precision_recall_ndcg_match_reference(seed, single, distance):
    cq, cd, eq, ed, ql, dl = make_case(seed, single_label=single)
    q, d = (cq, cd) if distance == "hamming" else (eq, ed)
    ks = (1, 3, 10, 40, 500)
    for empty in ("zero", "exclude"):
        got = precision_recall_at_k(q, d, ql, dl, ks=ks, distance=distance, empty=empty, chunk_size=6)
        want = ref_pr_at_k(q, d, ql, dl, distance, ks, empty=empty)
        assert got["k"].tolist() == [w[0] for w in want]  # 500 capped to the database size 40
        np.testing.assert_allclose(got["precision"], [w[1] for w in want], atol=1e-12)
        np.testing.assert_allclose(got["recall"], [w[2] for w in want], atol=1e-12)
    got = oracle_ndcg_at_k(q, d, ql, dl, ks=ks, distance=distance, chunk_size=7)
    want = ref_ndcg(q, d, ql, dl, distance, ks)
    np.testing.assert_allclose(got["ndcg"], [w[1] for w in want], atol=1e-12)
    curve = oracle_pr_curve_rank(q, d, ql, dl, grid=[2, 20, 40], distance=distance)
    want = ref_pr_at_k(q, d, ql, dl, distance, [2, 20, 40])
    np.testing.assert_allclose(curve["precision"], [w[1] for w in want], atol=1e-12)


@pytest.mark.parametrize("seed", [0, 2])
def test_pr_curve_hamming_matches_reference(seed):
    cq, cd, _, _, ql, dl = make_case(seed, single_label=seed == 2)
    dist = ref_distance(cq, cd, "hamming")
    rel = (ql @ dl.T) > 0
    got = pr_curve_hamming(cq, cd, ql, dl)
    for radius in range(cq.shape[1] + 1):
        precisions, recalls = [], []
        for i in range(len(cq)):
            inside = [j for j in range(len(cd)) if dist[i][j] <= radius]
            hits = sum(bool(rel[i][j]) for j in inside)
            if inside:
                precisions.append(hits / len(inside))
            recalls.append(hits / rel[i].sum() if rel[i].sum() else 0.0)
        row = got.iloc[radius]
        assert row["precision"] == pytest.approx(np.mean(precisions), abs=1e-12)
        assert row["recall"] == pytest.approx(np.mean(recalls), abs=1e-12)
        assert row["n_queries"] == len(precisions)


# ----------------------------------------------------------------------------------------------------------------------
# hand-computed examples


def test_hand_example_cosine():
    # One query [1, 0]; cosine to the database: 0, 1, 0.707, -1, 1. Stable order: d1, d4 (tie, lower index first),
    # d2, d0, d3. Query labels {A, B}; d4 has {A, B} (grade 2), d0 has {A} (grade 1), the rest none.
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
    ql = np.array([[1, 1]])
    dl = np.array([[1, 0], [0, 0], [0, 0], [0, 0], [1, 1]])
    # relevance by rank: 0 1 0 1 0 -> AP@all = (1/2 + 2/4) / 2
    assert mean_average_precision(q, d, ql, dl) == pytest.approx(0.5)
    # AP@2: one hit at rank 2 -> 1/2, divided by min(R=2, K=2) = 2, or by the 1 retrieved hit
    assert mean_average_precision(q, d, ql, dl, k=2) == pytest.approx(0.25)
    assert mean_average_precision(q, d, ql, dl, k=2, denominator="retrieved") == pytest.approx(0.5)
    # Expected over the tie {d1, d4}: orders give 0.5 and (1 + 2/4) / 2 = 0.75 -> 0.625
    assert mean_average_precision(q, d, ql, dl, ties="expected") == pytest.approx(0.625)
    pr = precision_recall_at_k(q, d, ql, dl, ks=(1, 2, 4))
    assert pr["precision"].tolist() == pytest.approx([0.0, 0.5, 0.5])
    assert pr["recall"].tolist() == pytest.approx([0.0, 0.5, 1.0])
    # grades by rank 0 2 0 1 0; ideal 2 1 0 0 0; gain 2^g - 1
    dcg = 3 / math.log2(3) + 1 / math.log2(5)
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    assert oracle_ndcg_at_k(q, d, ql, dl, ks=(5,))["ndcg"].iloc[0] == pytest.approx(dcg / idcg)
    assert oracle_ndcg_at_k(q, d, ql, dl, ks=(1,))["ndcg"].iloc[0] == pytest.approx(0.0)


def test_hand_example_hamming():
    # Query code 11; database 11, 01, 10, 00, 11 ({0,1} codes) -> distances 0, 1, 1, 2, 0.
    # Stable order: d0, d4 | d1, d2 | d3. Relevant: d1 and d4 -> by rank 0 1 1 0 0.
    q = torch.tensor([[1, 1]])
    d = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]])
    ql = np.array([[1]])
    dl = np.array([[0], [1], [0], [0], [1]])
    assert mean_average_precision(q, d, ql, dl, distance="hamming") == pytest.approx((1 / 2 + 2 / 3) / 2)
    # Four equally likely in-group orders: relevant ranks (2,3), (1,3), (2,4), (1,4)
    expected = np.mean([(1 / 2 + 2 / 3) / 2, (1 + 2 / 3) / 2, (1 / 2 + 2 / 4) / 2, (1 + 2 / 4) / 2])
    assert expected == pytest.approx(2 / 3)
    assert mean_average_precision(q, d, ql, dl, distance="hamming", ties="expected") == pytest.approx(2 / 3)
    curve = pr_curve_hamming(q, d, ql, dl)
    assert curve["precision"].tolist() == pytest.approx([1 / 2, 2 / 4, 2 / 5])
    assert curve["recall"].tolist() == pytest.approx([1 / 2, 1.0, 1.0])
    assert curve["retrieved"].tolist() == pytest.approx([2, 4, 5])
    # +-1 codes of the same bits give the same numbers
    assert mean_average_precision(q * 2 - 1, d * 2 - 1, ql, dl, distance="hamming") == pytest.approx(7 / 12)


def test_chunking_does_not_change_values():
    cq, cd, eq, ed, ql, dl = make_case(7, n_query=31, n_db=57)
    for kwargs in (dict(distance="hamming", ties="expected"), dict(distance="cosine"), dict(distance="hamming", k=9)):
        q, d = (cq, cd) if kwargs["distance"] == "hamming" else (eq, ed)
        values = [mean_average_precision(q, d, ql, dl, chunk_size=c, **kwargs) for c in (1, 4, 31, None)]
        assert max(values) - min(values) < 1e-12


def test_stable_topk_path_equals_full_sort():
    # K far below N takes the topk-on-unique-keys path; it must equal the prefix of the stable sort.
    cq, cd, eq, ed, ql, dl = make_case(8, n_query=12, n_db=400, bits=4)
    for q, d, distance in ((cq, cd, "hamming"), (eq, ed, "cosine")):
        for k in (1, 5, 37):
            assert mean_average_precision(q, d, ql, dl, distance=distance, k=k) == pytest.approx(
                ref_map(q, d, ql, dl, distance, k=k), abs=1e-12
            )


# ----------------------------------------------------------------------------------------------------------------------
# report


def test_retrieval_report_rows_and_summary():
    cq, cd, _, _, ql, dl = make_case(1)
    tq, td = -cq, np.roll(cd, 1, axis=1)
    df = retrieval_report(cq, tq, cd, td, ql, dl, distance="hamming", ks=(1, 10), map_k=(None, 20, 5000),
                          denominators=("relevant", "retrieved"))
    assert list(df.columns) == ["direction", "metric", "k", "value", "variant", "distance"]
    assert set(df["direction"]) == {"I->T", "T->I"}
    i2t = df[(df["direction"] == "I->T") & (df["metric"] == "mAP")]
    # @all (stable, then expected), @20 with both denominators; 5000 >= N=40 is skipped
    assert sorted(i2t["variant"]) == sorted([
        "mAP@all denominator=relevant ties=stable empty=zero",
        "mAP@all denominator=retrieved ties=stable empty=zero",
        "mAP@20 denominator=relevant ties=stable empty=zero",
        "mAP@20 denominator=retrieved ties=stable empty=zero",
        "mAP@all denominator=relevant ties=expected empty=zero",
    ])
    summary = report_summary(df)
    assert summary["map_i2t"] == pytest.approx(mean_average_precision(cq, td, ql, dl, distance="hamming"))
    assert summary["map_t2i"] == pytest.approx(mean_average_precision(tq, cd, ql, dl, distance="hamming"))
    assert summary["empty_queries_i2t"] == count_empty_queries(ql, dl) >= 1
    assert "p@10_t2i" in summary and "map@20_i2t" in summary
    pr = df[(df["metric"] == "PR-hamming-R") & (df["direction"] == "T->I")]
    assert len(pr) == cq.shape[1] + 1 and pr["value"].is_monotonic_increasing


# ----------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors_name_argument_and_shapes():
    q, d = torch.randn(4, 8), torch.randn(6, 8)
    ql, dl = np.ones((4, 3)), np.ones((6, 3))
    with pytest.raises(MetricInputError, match=r"query \(4, 8\) and database \(6, 5\)"):
        mean_average_precision(q, torch.randn(6, 5), ql, dl)
    with pytest.raises(MetricInputError, match=r"database_labels has 5 rows \(5, 3\) but database has 6"):
        mean_average_precision(q, d, ql, np.ones((5, 3)))
    with pytest.raises(MetricInputError, match=r"query_labels \(4, 3\) and database_labels \(6, 4\)"):
        mean_average_precision(q, d, ql, np.ones((6, 4)))
    bad = q.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(MetricInputError, match=r"query \(4, 8\) contains 1 NaN/inf.*rows \[2\]"):
        mean_average_precision(bad, d, ql, dl)
    with pytest.raises(MetricInputError, match=r"database \(6, 8\): hash codes must be binary"):
        mean_average_precision(torch.sign(q), torch.tanh(d), ql, dl, distance="hamming")
    with pytest.raises(MetricInputError, match=r"query \(2, 2\): hash codes must be binary"):
        mean_average_precision(torch.tensor([[-1, 0], [1, 1]]), torch.ones(6, 2), ql[:2], dl, distance="hamming")
    with pytest.raises(MetricInputError, match=r"query_labels \(4, 3\) must be multi-hot"):
        mean_average_precision(q, d, ql * 2, dl)
    with pytest.raises(MetricInputError, match="distance must be"):
        mean_average_precision(q, d, ql, dl, distance="euclidean")
    with pytest.raises(MetricInputError, match="ties='expected' is defined for denominator='relevant' only"):
        mean_average_precision(q, d, ql, dl, ties="expected", denominator="retrieved")
    with pytest.raises(MetricInputError, match="k must hold positive integers"):
        mean_average_precision(q, d, ql, dl, k=0)
    with pytest.raises(MetricInputError, match="chunk_size"):
        mean_average_precision(q, d, ql, dl, chunk_size=0)
    with pytest.raises(ValueError):  # MetricInputError is a ValueError for callers that catch those
        precision_recall_at_k(q, d, ql, dl[:, :2])


def test_deterministic_and_dtype_independent():
    cq, cd, eq, ed, ql, dl = make_case(4)
    a = mean_average_precision(eq, ed, ql, dl)
    assert a == mean_average_precision(eq, ed, ql, dl)
    assert a == pytest.approx(mean_average_precision(eq.astype(np.float64), ed, ql, dl), abs=1e-12)
    h = mean_average_precision(cq, cd, ql, dl, distance="hamming")
    assert h == mean_average_precision(cq.astype(np.int8), (cd > 0), ql.astype(bool), dl, distance="hamming")
    assert isinstance(precision_recall_at_k(eq, ed, ql, dl), pd.DataFrame)


@pytest.mark.parametrize("distance,ties", [("hamming", "stable"), ("hamming", "expected"), ("cosine", "stable"),
                                           ("cosine", "expected")])
@pytest.mark.parametrize("n_db", [40, 400])  # 400: K=5 and 20 take the partial (top-k) ranking path
def test_report_from_one_ranking_equals_the_single_metrics(distance, ties, n_db):
    """retrieval_report ranks each query chunk once and derives every metric from that order; its values must be
    exactly those of the single-metric functions."""
    cq, cd, eq, ed, ql, dl = make_case(11, n_query=19, n_db=n_db, bits=6)
    q, d = (cq, cd) if distance == "hamming" else (eq, ed)
    t, u = (-cq, np.roll(cd, 1, axis=1)) if distance == "hamming" else (-eq, np.roll(ed, 1, axis=1))
    dens = ("relevant", "retrieved")
    for empty in ("zero", "exclude"):
        common = dict(distance=distance, empty=empty, chunk_size=4)
        df = retrieval_report(q, t, d, u, ql, dl, ks=(1, 5, 20), map_k=(None, 20), ties=ties, denominators=dens,
                              **common)
        part = df[df["direction"] == "I->T"]

        def value(metric, k, part=part):
            sel = part[(part["metric"] == metric) & ((part["k"] == k) if k is not None else part["k"].isna())]
            return sel["value"].tolist()

        for k in (None, 20):
            expect = [mean_average_precision(q, u, ql, dl, k=k, ties=ties, denominator=den, **common)
                      for den in dens if not (ties == "expected" and den == "retrieved")]
            if distance == "hamming" and ties == "stable" and k is None:
                expect.append(mean_average_precision(q, u, ql, dl, ties="expected", **common))
            assert value("mAP", k) == expect
        pr = precision_recall_at_k(q, u, ql, dl, ks=(1, 5, 20), **common)
        nd = oracle_ndcg_at_k(q, u, ql, dl, ks=(1, 5, 20), **common)
        for k in (1, 5, 20):
            assert value("P", k) == pr.loc[pr["k"] == k, "precision"].tolist()
            assert value("R", k) == pr.loc[pr["k"] == k, "recall"].tolist()
            assert value("NDCG", k) == nd.loc[nd["k"] == k, "ndcg"].tolist()
        if distance == "hamming":
            curve = pr_curve_hamming(q, u, ql, dl, empty=empty, chunk_size=4)
            got = part[part["metric"] == "PR-hamming-P"]["value"].to_numpy()
            assert np.array_equal(got, curve["precision"].to_numpy(), equal_nan=True)
        t2i = df[(df["direction"] == "T->I") & (df["metric"] == "mAP")]["value"].iloc[0]
        assert t2i == mean_average_precision(t, d, ql, dl, ties=ties, **common)
