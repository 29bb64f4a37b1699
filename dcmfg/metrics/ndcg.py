"""NDCG@K with graded relevance and stable ties (docs/metrics.md); `retrieval_report` reports it.

With g = the number of labels a database item shares with the query and items ranked by `dcmfg.metrics.ranking`:

    DCG@K = sum_{r <= K} gain(g_r) / log2(r + 1),   gain(g) = 2^g - 1 ("exponential") or g ("linear")
    NDCG@K = DCG@K / IDCG@K

where IDCG@K is the DCG@K of the whole database ranked by g (0 when no item is relevant). All in float64.
`_ndcg_rows(shared, order, gain, discount, cols)` takes one chunk's (chunk, N) shared-label counts and its (chunk,
>= Kmax) ranking order and returns (chunk, len(cols)) NDCG at the K = cols + 1; `_ndcg_frame` takes the mean over
queries per K under the empty-query rule.
"""

from __future__ import annotations

import pandas as pd
import torch

from dcmfg.metrics.relevance import _finish


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
