"""The dynamic cross-modal feature graph (method.md section 2): which nodes connect, in training and against the bank.

One abstraction, two implementations, both walked by the one propagation loop `dcmfg.models.dcmfg.DCMFG.propagate`:

- `BatchGraph`: the 2n nodes [images; texts] of n pairs (a training mini-batch, or the training set when the
  reference bank is built); messages among them; rebuilt from the current features.
- `BankGraph`: queries of one modality against a fixed `Bank` (the training nodes embedded by the trained model: their
  layer states, the thresholds tau of the mutual test, the CSLS r); messages from bank nodes to the queries only, so a
  query's result never depends on the other queries.

Both ask a graph two things per layer: `edges(layer, h)` (built before the first layer, and before every layer with
`graph.rebuild_per_layer`) and `sources(layer, h, edges)` (the states messages come from). Edge lists follow PyG (row
0 = source j, row 1 = target i, message j -> i) and carry flags: `mutual` (the pair passed the mutual test), `fallback`
(added because the target had no relation edge), `self_loop`, `cross` (image-text).

The relation itself (candidates, CSLS hubness correction, the (k, k') mutual test) is `dcmfg.graph.knn.mutual_graph` /
`mutual_to_bank`; this module decides which features it sees (the current states, centred per modality with
`graph.centre`; or the frozen backbone globals for `static`) and which nodes are candidates. It also holds the
region-word alignment score that the attention of cross-modal edges receives (section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcmfg.graph import knn as search
from dcmfg.config import GraphConfig
from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.modality import IMAGE, TEXT


class NonFiniteFeatures(DcmfgError):
    """Node features hold NaN/inf (diverged training or broken inputs): no graph can be built from them."""


def check_finite(h: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(h).all()):
        bad = (~torch.isfinite(h)).any(1).nonzero().flatten()[:5].tolist()
        raise NonFiniteFeatures(f"{where}: node features hold NaN/inf (first rows {bad})")


def check_k(k: int, n_candidates: int, where: str) -> None:
    """k larger than the graph is a config error the user can fix; say which knob."""
    if k > n_candidates:
        raise ConfigError(
            f"graph.k={k} is larger than the graph: each node of the {where} has only {n_candidates} candidate "
            f"neighbours; lower graph.k or use more nodes (train.batch_size, a larger training split)"
        )


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
    if cfg.cross_k > 0 and not cfg.cross_modal_only and cfg.relation != "static":
        out.append(Part(cfg.cross_k, rev(cfg.cross_k), True))
    return out


def bank_density(cfg: GraphConfig, n_pairs: int, batch_size: int) -> float:
    """How many times more candidates a bank node has than a node of a training batch, when graph.bank_density is
    "matched" (then the reverse condition of the mutual test keeps the same share of candidates); else 1."""
    if cfg.bank_density != "matched":
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


# ---------------------------------------------------------------------------------------------- edges


@dataclass
class Tokens:
    """Projected region tokens of images and word tokens (+ mask) of texts, one row per pair, L2-normalised (the
    alignment is a cosine: normalising once per item, not once per edge, saves most of its cost)."""

    regions: torch.Tensor | None  # (n, R, t); None for text-only queries
    words: torch.Tensor | None  # (n, W, t); None for image-only queries
    mask: torch.Tensor | None  # (n, W) bool

    @classmethod
    def unit(cls, regions=None, words=None, mask=None) -> "Tokens":
        return cls(None if regions is None else F.normalize(regions, dim=-1),
                   None if words is None else F.normalize(words, dim=-1), mask)


@dataclass
class RelationState:
    """What the bank keeps of its own relation at one layer, for the queries' mutual test: per part, the features
    the test compares (the states, centred; static: the frozen globals of one modality), tau (the k'-th
    candidate's score) and the CSLS r of each row."""

    keys: list[torch.Tensor]
    taus: list[torch.Tensor]
    rs: list[torch.Tensor | None]


@dataclass
class Edges:
    """Edges of one graph step: index over (source rows, target rows) with per-edge flags."""

    index: torch.Tensor  # (2, E): row 0 source (into `sources()`), row 1 target
    mutual: torch.Tensor  # (E,) bool: a genuine mutual edge
    fallback: torch.Tensor  # (E,) bool: added because the target had no relation edge
    self_loop: torch.Tensor  # (E,) bool
    cross: torch.Tensor  # (E,) bool: between an image and a text node
    n_targets: int
    occurrence: torch.Tensor  # (candidates,) k-occurrence: how often each candidate is in a target's k nearest
    align: torch.Tensor | None = None  # (E,) region-word alignment score (0 on same-modality edges and self-loops)
    bank_nodes: torch.Tensor | None = None  # bank graph: the bank node of each source row after the Q queries
    relation: RelationState | None = None  # batch graph: what a bank built from this graph keeps


def _merge(src, tgt, mutual, fallback, n_src: int):
    """Union of edge lists: each (source, target) once, mutual if any copy is, fallback only if every copy is."""
    key = tgt * n_src + src
    uniq, inv = torch.unique(key, return_inverse=True)  # sorted: deterministic (target, source) order
    m = torch.zeros(len(uniq), dtype=torch.long, device=key.device).scatter_reduce(0, inv, mutual.long(), "amax")
    f = torch.ones(len(uniq), dtype=torch.long, device=key.device).scatter_reduce(0, inv, fallback.long(), "amin")
    return uniq % n_src, uniq // n_src, m.bool(), f.bool()


def _occurrence(neighbours: torch.Tensor, n: int, to_node=None) -> torch.Tensor:
    nb = neighbours[neighbours >= 0]
    return torch.bincount(nb if to_node is None else to_node(nb), minlength=n)


def _relation_kw(cfg: GraphConfig) -> dict:
    return dict(relation="knn" if cfg.relation == "knn" else "mutual", hubness=cfg.hubness, fallback=cfg.fallback)


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
        if self.cfg.relation == "static":
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
                search.mutual_graph(x, p.k, k_reverse=p.k_reverse, modality=self.modality,
                                    partner=self.partner if self.cfg.exclude_pair else None,
                                    cross_modal_only=p.cross_modal_only, self_loops=False, **_relation_kw(self.cfg))
                for p in self.parts
            ]
        src = torch.cat([r.edge_index[0] for r in rels])
        tgt = torch.cat([r.edge_index[1] for r in rels])
        flags = (torch.cat([r.mutual for r in rels]), torch.cat([r.fallback for r in rels]))
        state = RelationState([x] * len(rels), [r.tau for r in rels], [r.r for r in rels])
        return self._finish(src, tgt, *flags, _occurrence(rels[0].neighbours, n2), state)

    def _static_edges(self) -> Edges:
        """Edges from the frozen globals: per modality m, the relation among its rows; row j's partner-side node
        (and, unless cross_modal_only, the same-modality node) becomes a neighbour of node (m, i)."""
        n, p = self.n, self.parts[0]
        check_k(p.k, n - 1, f"{n}-pair static graph")
        srcs, tgts, ms, fs, occ, keys, taus, rs = [], [], [], [], [], [], [], []
        for m, raw in ((IMAGE, self.raw[0]), (TEXT, self.raw[1])):
            check_finite(raw, f"{n}-pair static graph")
            with torch.no_grad():
                rel = search.mutual_graph(raw, p.k, k_reverse=p.k_reverse, self_loops=False, **_relation_kw(self.cfg))
            j, i = rel.edge_index
            for cand in _static_candidates(m, p.cross_modal_only):
                srcs.append(j + cand * n)
                tgts.append(i + m * n)
                ms.append(rel.mutual)
                fs.append(rel.fallback)
            occ.append(_occurrence(rel.neighbours, n))
            keys.append(raw)
            taus.append(rel.tau)
            rs.append(rel.r)
        return self._finish(torch.cat(srcs), torch.cat(tgts), torch.cat(ms), torch.cat(fs), torch.cat(occ),
                            RelationState(keys, taus, rs))

    def _finish(self, src, tgt, mutual, fallback, occurrence, state) -> Edges:
        n2 = 2 * self.n
        ar = torch.arange(n2, device=src.device)
        src, tgt, mutual, fallback = _merge(src, tgt, mutual, fallback, n2)
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


def _static_candidates(m: int, cross_modal_only: bool) -> list[int]:
    """Which node of a neighbouring pair a node of modality m links to in the static graph."""
    return [1 - m] if cross_modal_only else [1 - m, m]


# ---------------------------------------------------------------------------------------------- the bank


@dataclass
class Bank:
    """The reference bank of the inference graph: n training pairs as nodes [images...; texts...], the input
    state of every layer, and per built layer the relation state the queries' mutual test needs."""

    n_pairs: int
    modality: torch.Tensor  # (2n,) 0 image, 1 text
    inference: str = "bank"  # bank | none | smooth: how `DCMFG.embed` uses the bank
    states: list[torch.Tensor] = field(default_factory=list)  # input of each layer, (2n, d)
    relations: list[RelationState] = field(default_factory=list)  # per layer (with rebuild_per_layer) or [layer 0]
    tokens: Tokens | None = None
    density: float = 1.0
    stats: dict = field(default_factory=dict)  # statistics of the bank's own graph (graphstats)

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
        if self.cfg.relation == "static":
            if self._static is None:
                self._static = self._static_edges(q, dev)
            return self._static
        check_finite(h, f"{q} queries")
        qmod = torch.full((q,), self.m, dtype=torch.long, device=dev)
        x = h.detach() if self.centre is None else self.centre[layer](h.detach(), qmod)
        state = self.bank.relations[layer]
        exclude = self._exclude()
        rels = [
            search.mutual_to_bank(x, key, p.k, tau, query_modality=qmod, bank_modality=self.bank.modality,
                                  cross_modal_only=p.cross_modal_only, exclude=exclude, bank_r=r, **_relation_kw(self.cfg))
            for p, key, tau, r in zip(self.parts, state.keys, state.taus, state.rs)
        ]
        src = torch.cat([r.edge_index[0] for r in rels])
        tgt = torch.cat([r.edge_index[1] for r in rels])
        mutual = torch.cat([r.mutual for r in rels])
        fallback = torch.cat([r.fallback for r in rels])
        return self._finish(src, tgt, mutual, fallback, _occurrence(rels[0].neighbours, 2 * n), q, dev)

    def _static_edges(self, q: int, dev) -> Edges:
        n, p = self.bank.n_pairs, self.parts[0]
        state = self.bank.relations[0]
        check_finite(self.raw, f"{q} queries")
        exclude = None if self.pair is None else self.pair[:, None]  # the pair's row: its copy and its partner
        with torch.no_grad():
            rel = search.mutual_to_bank(self.raw, state.keys[self.m], p.k, state.taus[self.m], exclude=exclude,
                                        bank_r=state.rs[self.m], **_relation_kw(self.cfg))
        j, i = rel.edge_index
        cands = _static_candidates(self.m, p.cross_modal_only)
        src = torch.cat([j + c * n for c in cands])
        tgt = torch.cat([i] * len(cands))
        mutual, fallback = torch.cat([rel.mutual] * len(cands)), torch.cat([rel.fallback] * len(cands))
        occ = _occurrence(rel.neighbours, 2 * n, lambda r: r + (1 - self.m) * n)
        return self._finish(src, tgt, mutual, fallback, occ, q, dev)

    def _finish(self, bank_src, tgt, mutual, fallback, occurrence, q: int, dev) -> Edges:
        m2 = len(self.bank.modality)
        bank_src, tgt, mutual, fallback = _merge(bank_src, tgt, mutual, fallback, m2)
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


# ---------------------------------------------------------------------------------------------- alignment (section 3)


def region_word_alignment(
    regions: torch.Tensor, words: torch.Tensor, mask: torch.Tensor, chunk: int = 4096, normalized: bool = False
) -> torch.Tensor:
    """Fine-grained alignment of E image-text pairs: A = cos(regions, words) (E, R, W), max over regions, mean
    over the valid words. regions (E, R, t), words (E, W, t), mask (E, W) bool -> (E,). `normalized`: the tokens
    are already unit length."""
    out = []
    for s in range(0, len(regions), chunk):
        r, w = regions[s : s + chunk], words[s : s + chunk]
        if not normalized:
            r, w = F.normalize(r, dim=-1), F.normalize(w, dim=-1)
        m = mask[s : s + chunk].to(r.dtype)
        best = torch.einsum("erd,ewd->erw", r, w).amax(dim=1)  # (e, W): each word's best region
        out.append((best * m).sum(1) / m.sum(1).clamp(min=1.0))
    return torch.cat(out) if out else regions.new_zeros(0)


def alignment_matrix_dense(regions: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Alignment score of every image with every text of a batch: regions (B, R, t), words (B', W, t) -> (B, B')."""
    r = F.normalize(regions, dim=-1)
    w = F.normalize(words, dim=-1)
    best = torch.einsum("ard,bwd->abrw", r, w).amax(dim=2)  # (B, B', W)
    m = mask.to(r.dtype)[None]
    return (best * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def edge_alignment(
    edge_index: torch.Tensor,
    modality: torch.Tensor,
    token_row: torch.Tensor,
    regions: torch.Tensor,
    words: torch.Tensor,
    mask: torch.Tensor,
    dense: torch.Tensor | None = None,
    normalized: bool = False,
) -> torch.Tensor:
    """Alignment score per edge: region-word alignment for cross-modal edges, 0 for same-modality edges.

    `token_row[n]` is node n's row in `regions` (image nodes) or `words`/`mask` (text nodes). With `dense`
    (an image-row x text-row score matrix already computed for the batch), the scores are gathered from it.
    """
    src, dst = edge_index
    cross = modality[src] != modality[dst]
    score = torch.zeros(edge_index.shape[1], device=edge_index.device, dtype=regions.dtype)
    if not bool(cross.any()):
        return score
    s, d = src[cross], dst[cross]
    img = torch.where(modality[s] == IMAGE, s, d)
    txt = torch.where(modality[s] == IMAGE, d, s)
    ri, rt = token_row[img], token_row[txt]
    if dense is not None:
        vals = dense[ri, rt]
    else:
        vals = region_word_alignment(regions[ri], words[rt], mask[rt], normalized=normalized)
    return score.masked_scatter(cross, vals.to(score.dtype))
