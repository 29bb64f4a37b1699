"""Reference implementations the graph tests check the library against (oracles: simple, dense, not fast).

Each computes the full score matrix at once and selects with the library's tie rule (`topk_stable`: descending
score, ties to the lower index), so on vectors with exact cosines its answer is the exact answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcmfg.graph.knn import topk_stable


def oracle_knn_within(x: torch.Tensor, k: int, *, groups: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest rows (cosine) of each row inside one set, self excluded: (scores (N, k), indices (N, k)).
    `groups` (N,) long: rows sharing a group id (e.g. the captions of one image) are excluded like self."""
    xn = F.normalize(x.float(), dim=1)
    s = xn @ xn.T
    excluded = torch.eye(len(x), dtype=torch.bool)
    if groups is not None:
        excluded |= groups[:, None] == groups[None, :]
    assert k <= int((~excluded).sum(1).min()), "the oracle needs k candidates in every row"
    return topk_stable(s.masked_fill(excluded, float("-inf")), k)
