"""The surface every model of the harness has, in code: training and evaluation never branch on the model.

- `RetrievalModel`: what the engine, evaluation, `dcmfg search` and the study call on every model (DCMFG and the
  baselines): `forward` on a training batch, `build_bank` (the reference bank, or None), `embed` (inductive
  embeddings of one modality), plus the `torch.nn.Module` calls they make (train/eval, parameters, weights, device).
- `GraphModel`: a model with the graph (DCMFG): its graph config and layers, `encode`, `batch_graph`, `propagate`.
- `ModelOutput`: what `forward` returns; `Projection`: the light head from a backbone width that both use.
- `modality_chunks` / `concat_chunks`: the chunked per-modality loop of `embed`.

`batch`/`feats` are dicts of float tensors: image_global (N, Di), image_regions (N, R, Di), text_global (N, Dt),
text_words (N, W, Dt), text_mask (N, W) bool. Embedding results are dicts: z (N, d) L2-normalised, h (N, bits) tanh
codes, logits (N, C) where the model has a label head, and for a graph model the per-item graph statistics
(`dcmfg.graph.stats.item_stats`) and the query step's `GraphTally` under "graph".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
import torch.nn as nn

from dcmfg.config import GraphConfig
from dcmfg.modality import Modality


@dataclass
class ModelOutput:
    """What a model's forward returns on a training batch; `dcmfg.engine.losses.total_loss` reads these fields by name
    (a renamed field fails loudly there instead of silently dropping a loss term)."""

    z_img: torch.Tensor | None = None  # graph outputs, L2-normalised (B, d)
    z_txt: torch.Tensor | None = None
    p_img: torch.Tensor | None = None  # pre-graph projections (B, d)
    p_txt: torch.Tensor | None = None
    h_img: torch.Tensor | None = None  # tanh hash codes (B, bits)
    h_txt: torch.Tensor | None = None
    logits_img: torch.Tensor | None = None  # label head (B, C)
    logits_txt: torch.Tensor | None = None
    align: torch.Tensor | None = None  # (A, A) region-word alignment of the first A pairs
    attention: list | None = None  # per layer {edge_index, alpha, mutual} with return_attention
    modality: torch.Tensor | None = None  # (2B,) node modality with return_attention
    stats: dict[str, float] = field(default_factory=dict)  # graph statistics (dcmfg.graph.stats), keys graph_*

    def map(self, fn: Callable) -> "ModelOutput":
        """The same output with `fn` applied to every tensor field (e.g. a gather across ranks)."""
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


@runtime_checkable
class RetrievalModel(Protocol):
    """Every model `dcmfg.models.registry.create_model` builds (an `nn.Module` with these methods)."""

    def __call__(self, batch: dict, gather: Callable | None = None, return_attention: bool = False) -> ModelOutput:
        ...

    def forward(self, batch: dict, gather: Callable | None = None, return_attention: bool = False) -> ModelOutput:
        """A training mini-batch of B pairs. `gather`: applied to per-item tensors (DDP: the whole batch across
        ranks) before anything couples the items."""
        ...

    def build_bank(self, feats: dict, inference: str | None = None) -> Any:
        """The reference bank (`dcmfg.graph.Bank`: training nodes) the inference graph attaches to, or None for a
        model without a graph. `inference` (default graph.inference): bank | none | smooth | transductive."""
        ...

    def embed(self, feats: dict, modality: int, bank: Any, return_attention: bool = False, chunk: int = 1024,
              exclude: torch.Tensor | None = None) -> dict:
        """Inductive embeddings of the items of one modality: one item's result never depends on the other items
        it is embedded with. `exclude` (N,) long: per item, the bank node that is the item itself (-1 if none)."""
        ...

    def train(self, mode: bool = True) -> Any:
        ...

    def eval(self) -> Any:
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        ...

    def state_dict(self, *args, **kwargs) -> dict:
        ...

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False) -> Any:
        ...

    def to(self, *args, **kwargs) -> Any:
        ...


@runtime_checkable
class GraphModel(RetrievalModel, Protocol):
    """A model with the graph (DCMFG): what the graph experiments and statistics call beyond `RetrievalModel`.
    (Its `layers`, an `nn.ModuleList`, is no member here: `isinstance` looks members up statically on newer Pythons,
    which do not see submodules.)"""

    gcfg: GraphConfig

    def encode(self, batch: dict) -> dict:
        """Per-item projections (and tokens) of a batch, before any graph."""
        ...

    def batch_graph(self, enc: dict, density: float = 1.0) -> Any:
        """The `dcmfg.graph.BatchGraph` over the pairs of `encode`'s output."""
        ...

    def propagate(self, h: torch.Tensor, graph, tally=None) -> tuple[torch.Tensor, list]:
        """The layers over a graph: (output states, one step per layer)."""
        ...


class Projection(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: light head from a frozen backbone width into d."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def modality_chunks(feats: dict, modality: int, chunk: int) -> Iterator[tuple[int, dict]]:
    """(start, features of items start..start+chunk) of one modality: only that modality's tensors, sliced."""
    key = Modality(modality).key
    n = len(feats[f"{key}_global"])
    for s in range(0, n, chunk):
        yield s, {k: v[s : s + chunk] for k, v in feats.items() if k.startswith(key)}


def concat_chunks(outs: list[dict]) -> dict:
    """Per-chunk result dicts joined along the items (keys of the first chunk)."""
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
