"""The ranking every metric reads, one chunk of queries at a time.

Lower distance = better: `_distances(p, rows)` is (chunk, N) float32, -cosine of unit rows, or the Hamming
distance (b - <q, x>) / 2 of +-1 codes (exact small integers). `_stable_order(dist, k)` gives the indices of the k
best items per row with ties broken by ascending database index: one stable sort, the same on every platform (or,
for k far below N, a top-k on keys made unique by the index, which selects the same prefix).

`_chunk_rows` splits the queries so that one chunk's (chunk x N) matrices stay within `DEFAULT_CHUNK_BYTES`
(about `_BYTES_PER_CELL` bytes per query-item pair), unless `chunk_size` says how many queries a chunk holds.
Chunking never changes a value: every per-query number is computed from its own row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dcmfg.metrics._inputs import MetricInputError, _Prepared

# Extra memory one chunk of queries may take (the per-chunk matrices are chunk x database).
DEFAULT_CHUNK_BYTES = 512 * 2**20
_BYTES_PER_CELL = 48  # distance, sort values + int64 order, relevance, float64 cumsums


def _chunk_rows(n_query: int, n_database: int, chunk_size: int | None) -> Iterator[slice]:
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (n_database * _BYTES_PER_CELL))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise MetricInputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    for start in range(0, n_query, chunk_size):
        yield slice(start, min(start + chunk_size, n_query))


def _bits(p: _Prepared) -> int | None:
    return p.query.shape[1] if p.distance == "hamming" else None


def _distances(p: _Prepared, rows: slice) -> torch.Tensor:
    """(chunk, N) float32, lower = better: -cosine, or the Hamming distance (b - <q, x>) / 2 of +-1 codes (exact
    small integers). One matrix product each, the affine part folded into it."""
    q = p.query[rows]
    if p.distance == "cosine":
        return torch.addmm(q.new_zeros(()), q, p.database.T, beta=0, alpha=-1)
    return torch.addmm(q.new_tensor(p.query.shape[1] / 2), q, p.database.T, alpha=-0.5)


def _stable_order(dist: torch.Tensor, k: int, hamming_bits: int | None = None) -> torch.Tensor:
    """Indices of the k best items per row, ties by ascending database index."""
    n = dist.shape[1]
    if k * 4 >= n:
        if hamming_bits is not None and hamming_bits <= 255:
            dist = dist.to(torch.uint8)  # exact small integers; a uint8 stable sort is faster than a float one
        return torch.sort(dist, dim=1, stable=True)[1][:, :k]
    # Partial selection: make keys unique (order-preserving float bits, then the index) so topk cannot
    # pick an arbitrary member of a tie group at the cut.
    bits = (dist + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    keys = (ordered << 32) + torch.arange(n, device=dist.device)
    return torch.topk(keys, k, dim=1, largest=False, sorted=True)[1]
