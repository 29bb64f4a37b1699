"""The inference graph (docs/method.md section 2): queries of one modality against a fixed `Bank` of training nodes.

The bank holds the training pairs embedded by the trained model as one `BatchGraph`: the input state of every layer,
the thresholds tau of the mutual test and the CSLS r (`RelationState`), the unit tokens. `BankGraph` sends messages
from bank nodes to the queries only, so a query's result never depends on the other queries; its edges follow the
batch graph's rule (a bank member embedded as a query, its copy excluded, gets the edges it has in the bank's graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dcmfg.choices import Inference, Relation
from dcmfg.config import GraphConfig
from dcmfg.graph.alignment import region_word_alignment
from dcmfg.graph.batch import parts, relation_kw, static_candidates
from dcmfg.graph.checks import check_finite
from dcmfg.graph.edges import Edges, RelationState, Tokens, k_occurrence, merge_edges
from dcmfg.graph.mutual import mutual_to_bank
from dcmfg.modality import IMAGE


@dataclass
class Bank:
    """The reference bank of the inference graph: n training pairs as nodes [images...; texts...], the input
    state of every layer, and per built layer the relation state the queries' mutual test needs."""

    n_pairs: int
    modality: torch.Tensor  # (2n,) 0 image, 1 text
    inference: str = Inference.BANK  # bank | none | smooth: how `DCMFG.embed` uses the bank
    states: list[torch.Tensor] = field(default_factory=list)  # input of each layer, (2n, d)
    relations: list[RelationState] = field(default_factory=list)  # per layer (with rebuild_per_layer) or [layer 0]
    tokens: Tokens | None = None
    density: float = 1.0
    stats: dict = field(default_factory=dict)  # statistics of the bank's own graph (dcmfg.graph.stats)

    @property
    def token_row(self) -> torch.Tensor:
        """Each bank node's row in the bank's training list (its pair)."""
        return torch.arange(len(self.modality), device=self.modality.device) % self.n_pairs


class BankGraph:
    """Q queries of one modality against a bank. Sources of a layer: [the Q queries; the bank nodes the edges use]
    (only those, so the cost per query does not grow with the bank); targets: the queries. `exclude` (Q,) long:
    the bank node that is the query itself (a training item in the database; -1 none): neither it nor, with
    graph.exclude_pair, its paired node is linked, as in training."""

    def __init__(self, cfg: GraphConfig, bank: Bank, modality: int, *, tokens=None, raw=None,
                 centre: nn.ModuleList | None = None, exclude: torch.Tensor | None = None):
        self.cfg, self.bank, self.m, self.tokens, self.raw, self.centre = cfg, bank, modality, tokens, raw, centre
        self.parts = parts(cfg, bank.density)
        n = bank.n_pairs
        self.pair = None if exclude is None else torch.where(exclude >= 0, exclude % n, exclude)
        self._static: Edges | None = None

    def sources(self, layer: int, h: torch.Tensor, edges: Edges) -> torch.Tensor:
        return torch.cat([h, self.bank.states[layer][edges.bank_nodes]])

    def _exclude(self) -> torch.Tensor | None:
        """Bank nodes each query must not link to: its own copy and, with exclude_pair, its copy's partner."""
        if self.pair is None:
            return None
        n = self.bank.n_pairs
        modalities = [self.m, 1 - self.m] if self.cfg.exclude_pair else [self.m]
        return torch.stack([torch.where(self.pair >= 0, self.pair + m * n, self.pair) for m in modalities], 1)

    def edges(self, layer: int, h: torch.Tensor) -> Edges:
        q, n, dev = len(h), self.bank.n_pairs, h.device
        if self.cfg.relation == Relation.STATIC:
            if self._static is None:
                self._static = self._static_edges(q, dev)
            return self._static
        check_finite(h, f"{q} queries")
        qmod = torch.full((q,), self.m, dtype=torch.long, device=dev)
        x = h.detach() if self.centre is None else self.centre[layer](h.detach(), qmod)
        state = self.bank.relations[layer]
        exclude = self._exclude()
        rels = [
            mutual_to_bank(x, key, p.k, tau, query_modality=qmod, bank_modality=self.bank.modality,
                           cross_modal_only=p.cross_modal_only, exclude=exclude, bank_r=r, **relation_kw(self.cfg))
            for p, key, tau, r in zip(self.parts, state.keys, state.taus, state.rs)
        ]
        src = torch.cat([r.edge_index[0] for r in rels])
        tgt = torch.cat([r.edge_index[1] for r in rels])
        mutual = torch.cat([r.mutual for r in rels])
        fallback = torch.cat([r.fallback for r in rels])
        return self._finish(src, tgt, mutual, fallback, k_occurrence(rels[0].neighbours, 2 * n), q, dev)

    def _static_edges(self, q: int, dev) -> Edges:
        n, p = self.bank.n_pairs, self.parts[0]
        state = self.bank.relations[0]
        check_finite(self.raw, f"{q} queries")
        exclude = None if self.pair is None else self.pair[:, None]  # the pair's row: its copy and its partner
        with torch.no_grad():
            rel = mutual_to_bank(self.raw, state.keys[self.m], p.k, state.taus[self.m], exclude=exclude,
                                 bank_r=state.rs[self.m], **relation_kw(self.cfg))
        j, i = rel.edge_index
        cands = static_candidates(self.m, p.cross_modal_only)
        src = torch.cat([j + c * n for c in cands])
        tgt = torch.cat([i] * len(cands))
        mutual, fallback = torch.cat([rel.mutual] * len(cands)), torch.cat([rel.fallback] * len(cands))
        occ = k_occurrence(rel.neighbours, 2 * n, lambda r: r + (1 - self.m) * n)
        return self._finish(src, tgt, mutual, fallback, occ, q, dev)

    def _finish(self, bank_src, tgt, mutual, fallback, occurrence, q: int, dev) -> Edges:
        m2 = len(self.bank.modality)
        bank_src, tgt, mutual, fallback = merge_edges(bank_src, tgt, mutual, fallback, m2)
        used, pos = torch.unique(bank_src, return_inverse=True)
        ar = torch.arange(q, device=dev)
        src = torch.cat([pos + q, ar])
        tgt = torch.cat([tgt, ar])
        no = torch.zeros(q, dtype=torch.bool, device=dev)
        cross = torch.cat([self.bank.modality[bank_src] != self.m, no])
        e = Edges(
            index=torch.stack([src, tgt]),
            mutual=torch.cat([mutual, no]),
            fallback=torch.cat([fallback, no]),
            self_loop=torch.cat([torch.zeros(len(mutual), dtype=torch.bool, device=dev), ~no]),
            cross=cross,
            n_targets=q,
            occurrence=occurrence,
            bank_nodes=used,
        )
        if self.tokens is not None:
            e.align = torch.zeros(len(src), device=dev)
            if bool(cross.any()):
                qc, bc = tgt[cross], bank_src[cross[: len(bank_src)]]
                rows = bc % self.bank.n_pairs
                bt = self.bank.tokens
                if self.m == IMAGE:
                    vals = region_word_alignment(self.tokens.regions[qc], bt.words[rows], bt.mask[rows], normalized=True)
                else:
                    vals = region_word_alignment(bt.regions[rows], self.tokens.words[qc], self.tokens.mask[qc],
                                                 normalized=True)
                e.align = e.align.masked_scatter(cross, vals.to(e.align.dtype))
        return e

    def bank_index(self, edges: Edges) -> torch.Tensor:
        """Each edge's bank node (-1: the query's self-loop)."""
        src = edges.index[0]
        q = edges.n_targets
        return torch.where(src >= q, edges.bank_nodes[(src - q).clamp(min=0)], torch.full_like(src, -1))
