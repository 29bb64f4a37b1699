"""The training graph (docs/method.md section 2): the 2n nodes [images; texts] of n pairs, rebuilt from the current
features, and the settings every graph shares (the relations it is the union of, k' for a bank, centring).

`BatchGraph` serves a training mini-batch and the bank's own graph (the training set, when the bank is built); its
queries-against-the-bank sibling is `dcmfg.graph.bank.BankGraph`. Both answer `edges(layer, h)` and
`sources(layer, h, edges)` for the one propagation loop `dcmfg.models.dcmfg.DCMFG.propagate`. This module decides
which features the relation sees (the current states, centred per modality with `graph.centre`; or the frozen
backbone globals for `static`) and which nodes are candidates; the relation itself is `dcmfg.graph.mutual`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from dcmfg.choices import BankDensity, Relation
from dcmfg.config import GraphConfig
from dcmfg.graph.alignment import edge_alignment
from dcmfg.graph.checks import check_finite, check_k
from dcmfg.graph.edges import Edges, RelationState, Tokens, k_occurrence, merge_edges
from dcmfg.graph.mutual import mutual_graph
from dcmfg.modality import IMAGE, TEXT


# ---------------------------------------------------------------------------------------------- relation settings


@dataclass(frozen=True)
class Part:
    """One kNN relation of the union the graph is made of."""

    k: int
    k_reverse: int  # j -> i needs i among the k_reverse best candidates of j (relaxed mutuality when > k)
    cross_modal_only: bool


def parts(cfg: GraphConfig, density: float = 1.0) -> list[Part]:
    """The relations whose edges the graph is the union of: the main one, plus cross-modal-only with k = cross_k
    when that is set. `density` (>= 1) scales k' for a graph larger than a training batch (graph.bank_density)."""

    def rev(k: int) -> int:
        return max(1, math.ceil(cfg.reverse_ratio * k * density - 1e-9))

    out = [Part(cfg.k, rev(cfg.k), cfg.cross_modal_only)]
    if cfg.cross_k > 0 and not cfg.cross_modal_only and cfg.relation != Relation.STATIC:
        out.append(Part(cfg.cross_k, rev(cfg.cross_k), True))
    return out


def bank_density(cfg: GraphConfig, n_pairs: int, batch_size: int) -> float:
    """How many times more candidates a bank node has than a node of a training batch, when graph.bank_density is
    "matched" (then the reverse condition of the mutual test keeps the same share of candidates); else 1."""
    if cfg.bank_density != BankDensity.MATCHED:
        return 1.0
    return max(1.0, (n_pairs - 1) / max(1, batch_size - 1))


class ModalityCentre(nn.Module):
    """graph.centre: subtract each modality's mean before the relation test (the modality gap puts all images on one
    side of all texts). Training uses the batch means and keeps a running mean per modality (like BatchNorm); eval
    mode uses the running means, so they are estimated on training data only, frozen for inference and saved with
    the weights. It only moves which nodes connect: messages carry the uncentred states."""

    def __init__(self, dim: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(2, dim))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        if self.training:
            means = torch.stack([x[modality == m].mean(0) if bool((modality == m).any()) else self.mean[m] for m in (IMAGE, TEXT)])
            m = 1.0 if int(self.batches) == 0 else self.momentum
            self.mean.mul_(1 - m).add_(m * means)
            self.batches += 1
        else:
            means = self.mean
        return x - means[modality]


def relation_kw(cfg: GraphConfig) -> dict:
    """The options of `mutual_graph` / `mutual_to_bank` a config sets (the static relation runs the mutual test on
    the frozen features)."""
    return dict(relation=Relation.KNN if cfg.relation == Relation.KNN else Relation.MUTUAL, hubness=cfg.hubness,
                fallback=cfg.fallback)


# ---------------------------------------------------------------------------------------------- the batch graph


class BatchGraph:
    """The 2n nodes [images 0..n-1; texts n..2n-1] of n pairs; node i and n + i are a pair.

    `raw` (static relation): the frozen backbone globals (raw_img (n, Di), raw_txt (n, Dt)); the edges are then built
    once, inside each modality's backbone space (the two spaces are not comparable), and a node of the other modality
    is placed at its pair's position: text j is a neighbour of image i iff image j is a (mutual) neighbour of image i.
    So the static graph has the same cross-modal rule, bank and exclusions as the dynamic one; only the features
    that define the edges differ. `density` scales k' (bank graph matched to the training batches)."""

    def __init__(self, cfg: GraphConfig, n_pairs: int, *, tokens: Tokens | None = None, raw=None,
                 centre: nn.ModuleList | None = None, density: float = 1.0, device=None):
        self.cfg, self.n, self.tokens, self.raw, self.centre = cfg, n_pairs, tokens, raw, centre
        self.parts = parts(cfg, density)
        self.modality = torch.cat([torch.full((n_pairs,), IMAGE, dtype=torch.long, device=device),
                                   torch.full((n_pairs,), TEXT, dtype=torch.long, device=device)])
        ar = torch.arange(n_pairs, device=device)
        self.partner = torch.cat([ar + n_pairs, ar])
        self._static: Edges | None = None

    def sources(self, layer: int, h: torch.Tensor, edges: Edges) -> torch.Tensor:
        return h

    def edges(self, layer: int, h: torch.Tensor) -> Edges:
        if self.cfg.relation == Relation.STATIC:
            if self._static is None:
                self._static = self._static_edges()
            return self._static
        n2 = 2 * self.n
        check_finite(h, f"{n2}-node graph")
        for p in self.parts:
            candidates = (self.n if p.cross_modal_only else n2 - 1) - int(self.cfg.exclude_pair)
            check_k(p.k, candidates, f"{n2}-node graph")
        x = h.detach()
        if self.centre is not None:
            x = self.centre[layer](x, self.modality)
        with torch.no_grad():
            rels = [
                mutual_graph(x, p.k, k_reverse=p.k_reverse, modality=self.modality,
                             partner=self.partner if self.cfg.exclude_pair else None,
                             cross_modal_only=p.cross_modal_only, self_loops=False, **relation_kw(self.cfg))
                for p in self.parts
            ]
        src = torch.cat([r.edge_index[0] for r in rels])
        tgt = torch.cat([r.edge_index[1] for r in rels])
        flags = (torch.cat([r.mutual for r in rels]), torch.cat([r.fallback for r in rels]))
        state = RelationState([x] * len(rels), [r.tau for r in rels], [r.r for r in rels])
        return self._finish(src, tgt, *flags, k_occurrence(rels[0].neighbours, n2), state)

    def _static_edges(self) -> Edges:
        """Edges from the frozen globals: per modality m, the relation among its rows; row j's partner-side node
        (and, unless cross_modal_only, the same-modality node) becomes a neighbour of node (m, i)."""
        n, p = self.n, self.parts[0]
        check_k(p.k, n - 1, f"{n}-pair static graph")
        srcs, tgts, ms, fs, occ, keys, taus, rs = [], [], [], [], [], [], [], []
        for m, raw in ((IMAGE, self.raw[0]), (TEXT, self.raw[1])):
            check_finite(raw, f"{n}-pair static graph")
            with torch.no_grad():
                rel = mutual_graph(raw, p.k, k_reverse=p.k_reverse, self_loops=False, **relation_kw(self.cfg))
            j, i = rel.edge_index
            for cand in static_candidates(m, p.cross_modal_only):
                srcs.append(j + cand * n)
                tgts.append(i + m * n)
                ms.append(rel.mutual)
                fs.append(rel.fallback)
            occ.append(k_occurrence(rel.neighbours, n))
            keys.append(raw)
            taus.append(rel.tau)
            rs.append(rel.r)
        return self._finish(torch.cat(srcs), torch.cat(tgts), torch.cat(ms), torch.cat(fs), torch.cat(occ),
                            RelationState(keys, taus, rs))

    def _finish(self, src, tgt, mutual, fallback, occurrence, state) -> Edges:
        n2 = 2 * self.n
        ar = torch.arange(n2, device=src.device)
        src, tgt, mutual, fallback = merge_edges(src, tgt, mutual, fallback, n2)
        # self-loops last (a node always keeps its own state in the attention)
        src, tgt = torch.cat([src, ar]), torch.cat([tgt, ar])
        no = torch.zeros(n2, dtype=torch.bool, device=src.device)
        e = Edges(
            index=torch.stack([src, tgt]),
            mutual=torch.cat([mutual, no]),
            fallback=torch.cat([fallback, no]),
            self_loop=torch.cat([torch.zeros(len(mutual), dtype=torch.bool, device=src.device), ~no]),
            cross=self.modality[src] != self.modality[tgt],
            n_targets=n2,
            occurrence=occurrence,
            relation=state,
        )
        if self.tokens is not None:
            e.align = edge_alignment(e.index, self.modality, torch.arange(n2, device=src.device) % self.n,
                                     self.tokens.regions, self.tokens.words, self.tokens.mask, normalized=True)
        return e


def static_candidates(m: int, cross_modal_only: bool) -> list[int]:
    """Which node of a neighbouring pair a node of modality m links to in the static graph (0 image, 1 text)."""
    return [1 - m] if cross_modal_only else [1 - m, m]
