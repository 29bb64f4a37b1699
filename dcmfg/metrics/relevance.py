"""Relevance and the queries without any relevant item.

A database item is relevant to a query iff their label vectors share >= 1 label; `_shared_labels(p, rows)` is the
(chunk, N) float32 number of shared labels (graded relevance for NDCG; > 0 = relevant).

A query with no relevant item (R = 0) has no defined AP, recall or NDCG. `_finish(values, empty_mask, empty)` takes
the mean over queries under the rule `empty`: "zero" counts such a query as 0 (the default), "exclude" leaves it out
of the mean (its per-query value becomes NaN). `count_empty_queries` says how many there are.
"""

from __future__ import annotations

import torch

from dcmfg.metrics._inputs import MetricInputError, _labels, _Prepared


def _shared_labels(p: _Prepared, rows: slice) -> torch.Tensor:
    """(chunk, N) float32 number of shared labels (graded relevance; > 0 = relevant)."""
    return p.query_labels[rows] @ p.database_labels.T


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


def _finish(values: torch.Tensor, empty_mask: torch.Tensor, empty: str) -> tuple[float, torch.Tensor]:
    """Mean over queries under the empty-query rule; per-query values (NaN where excluded)."""
    values = values.clone()
    if empty == "exclude":
        values[empty_mask] = float("nan")
        kept = values[~empty_mask]
        return (float(kept.mean()) if kept.numel() else float("nan")), values
    values[empty_mask] = 0.0
    return float(values.mean()), values
