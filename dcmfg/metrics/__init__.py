"""Retrieval metrics (definitions: docs/metrics.md): mAP (@all, @K), P@K, R@K, the Hamming PR curve, NDCG, and
the report that holds them all.

Every metric takes torch tensors or numpy arrays -- query (Q, D), database (N, D), query_labels (Q, C),
database_labels (N, C) -- and computes on the query's device, chunked over queries, from one ranking per chunk.
Cosine ranks by descending similarity, Hamming by ascending distance; `ties="stable"` breaks ties by ascending
database index, `ties="expected"` averages over the orders inside each tie group. A database item is relevant iff
it shares >= 1 label with the query; queries with none count as 0 (`empty="zero"`) or leave the mean
(`empty="exclude"`).

One module per job:

    _inputs            the checks every metric runs on its inputs (MetricInputError) and the prepared inputs
    ranking            query chunks, distances, the stable order
    relevance          shared labels, queries without a relevant item, the mean under the empty-query rule
    ties               groups of equal scores (sorted rows, or Hamming histograms without a sort)
    average_precision  mean_average_precision: stable and tie-aware AP
    precision_recall   precision_recall_at_k, pr_curve_hamming
    ndcg               NDCG@K kernels
    report             retrieval_report (both directions, every metric), report_summary (its headline numbers)

Names with a leading underscore are kernels shared between these modules, not API.
"""

from dcmfg.metrics._inputs import DEFAULT_KS, MetricInputError
from dcmfg.metrics.average_precision import mean_average_precision
from dcmfg.metrics.precision_recall import pr_curve_hamming, precision_recall_at_k
from dcmfg.metrics.ranking import DEFAULT_CHUNK_BYTES
from dcmfg.metrics.relevance import count_empty_queries
from dcmfg.metrics.report import report_summary, retrieval_report

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_KS",
    "MetricInputError",
    "count_empty_queries",
    "mean_average_precision",
    "pr_curve_hamming",
    "precision_recall_at_k",
    "report_summary",
    "retrieval_report",
]
