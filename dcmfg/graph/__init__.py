"""The dynamic cross-modal feature graph (docs/method.md sections 2-3): which nodes connect, in training and against
the bank, and what the graph did.

One abstraction, two implementations, both walked by the one propagation loop `dcmfg.models.dcmfg.DCMFG.propagate`:
a graph answers `edges(layer, h)` (built before the first layer, and before every layer with
`graph.rebuild_per_layer`) and `sources(layer, h, edges)` (the states messages come from).

- `knn`: top-k search with one tie rule (torch or FAISS), candidate blocks, tau, CSLS hubness scores;
- `mutual`: the relation: the (k, k') mutual test within a set and against a bank, fallback edges;
- `edges`: what a graph step yields (`Edges` with flags, `Tokens`, `RelationState`);
- `batch`: `BatchGraph` (the 2n nodes of n pairs: a training batch, or the bank's own graph) and the settings every
  graph shares (`parts`, `bank_density`, `ModalityCentre`);
- `bank`: `Bank` (the training nodes embedded by the trained model) and `BankGraph` (queries against it);
- `alignment`: the region-word alignment score of cross-modal edges;
- `stats`: what the graph did (mutual share, fallback share, degrees, hubness, attention entropy);
- `checks`: what the graph code refuses, as one-line errors.

The names below are the package's surface (`from dcmfg import graph as G`; `G.BatchGraph`, `G.Bank`, ...).
"""

from dcmfg.graph.alignment import alignment_matrix_dense, edge_alignment, region_word_alignment
from dcmfg.graph.bank import Bank, BankGraph
from dcmfg.graph.batch import BatchGraph, ModalityCentre, Part, bank_density, parts
from dcmfg.graph.checks import NonFiniteFeatures, SearchInputError
from dcmfg.graph.edges import Edges, RelationState, Tokens
from dcmfg.graph.knn import candidate_topk, kth_neighbour_similarity, topk, topk_stable
from dcmfg.graph.mutual import MutualRelation, mutual_graph, mutual_knn_edges, mutual_knn_to_bank, mutual_to_bank
from dcmfg.graph.stats import GraphTally, inference_report, target_counts

__all__ = [
    "Bank", "BankGraph", "BatchGraph", "Edges", "GraphTally", "ModalityCentre", "MutualRelation", "NonFiniteFeatures",
    "Part", "RelationState", "SearchInputError", "Tokens", "alignment_matrix_dense", "bank_density", "candidate_topk",
    "edge_alignment", "inference_report", "kth_neighbour_similarity", "mutual_graph", "mutual_knn_edges",
    "mutual_knn_to_bank", "mutual_to_bank", "parts", "region_word_alignment", "target_counts", "topk", "topk_stable",
]
