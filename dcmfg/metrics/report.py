"""The retrieval report: every metric of both directions from one ranking per query chunk, and its headline numbers.

`retrieval_report` returns a tidy DataFrame (direction, metric, k, value, variant, distance) with mAP@all / @K
(`dcmfg.metrics.average_precision`), P@K and R@K and the PR-hamming curve (`dcmfg.metrics.precision_recall`),
NDCG@K (`dcmfg.metrics.ndcg`) and the empty-query count. Each value equals what the single-metric function
(`mean_average_precision`, `precision_recall_at_k`, `pr_curve_hamming`) computes for it: the same chunks and kernels
on the same inputs. `report_summary` reads the headline numbers from it for report.json. The definitions are in
docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from dcmfg.distributed import gather_rows, shard_chunks
from dcmfg.metrics._inputs import DEFAULT_KS, _check_choice, _check_ks, _prepare, _Prepared
from dcmfg.metrics.average_precision import _ap_stable_sum, _expected_ap_sums, _harmonic
from dcmfg.metrics.ndcg import _discount, _ndcg_frame, _ndcg_rows
from dcmfg.metrics.precision_recall import _pr_from_counts, _pr_hamming_from_counts
from dcmfg.metrics.ranking import _bits, _chunk_rows, _distances, _stable_order
from dcmfg.metrics.relevance import _finish, _shared_labels, count_empty_queries
from dcmfg.metrics.ties import _hamming_histograms, _tie_groups


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


def _variant(metric: str, k: int | None, **rules) -> str:
    at = "all" if k is None else str(k)
    return f"{metric}@{at} " + " ".join(f"{key}={value}" for key, value in rules.items())


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
