"""The dynamic cross-modal feature graph (method.md section 2): which nodes connect, in batch and bank modes.

Nodes are image and text nodes (`modality` 0 = image, 1 = text). Edges follow PyG's convention (row 0 = source j,
row 1 = target i, message j -> i). kNN search lives in `dcmfg.search`; this module decides what to search over:

- batch mode (training): the 2B nodes of a mini-batch, rebuilt from the current features at every forward;
- bank mode (inference): each query against a fixed reference bank (the training nodes, embedded by the trained
  model), so a query's edges never depend on the other queries;
- `static`: built once from the frozen backbone features, inside each modality, plus the known image-text pairs.

It also holds the region-word alignment score that the attention of cross-modal edges receives (section 3).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dcmfg import search
from dcmfg.config import GraphConfig
from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.modality import IMAGE


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


def parts(cfg: GraphConfig) -> list[GraphConfig]:
    """The kNN relations whose edges the graph is the union of: the main one, plus cross-modal-only with
    k = cross_k when that is set."""
    out = [cfg]
    if cfg.cross_k > 0 and not cfg.cross_modal_only:
        out.append(dataclasses.replace(cfg, k=cfg.cross_k, cross_modal_only=True, cross_k=0))
    return out


def _union(edge_index: torch.Tensor, n_src: int) -> torch.Tensor:
    key = torch.unique(edge_index[1] * n_src + edge_index[0])  # sorted: deterministic order (target, source)
    return torch.stack([key % n_src, key // n_src])


def batch_edges(h: torch.Tensor, modality: torch.Tensor, cfg: GraphConfig) -> torch.Tensor:
    """Mutual (or plain) kNN edges over the nodes of one graph from their current features h (N, d), united
    with the cross-modal relation when graph.cross_k is set."""
    if len(parts(cfg)) > 1:
        return _union(torch.cat([_one_relation(h, modality, c) for c in parts(cfg)], dim=1), len(h))
    return _one_relation(h, modality, cfg)


def _one_relation(h: torch.Tensor, modality: torch.Tensor, cfg: GraphConfig) -> torch.Tensor:
    n_img = int((modality == IMAGE).sum())
    n_candidates = min(n_img, len(h) - n_img) if cfg.cross_modal_only else len(h) - 1
    check_k(cfg.k, n_candidates, f"{len(h)}-node graph")
    check_finite(h, f"{len(h)}-node graph")
    with torch.no_grad():
        return search.mutual_knn_edges(
            h.detach(),
            cfg.k,
            relation=cfg.relation if cfg.relation != "static" else "mutual",
            modality=modality,
            cross_modal_only=cfg.cross_modal_only,
            fallback=cfg.fallback,
            self_loops=True,
        )


def drop_pair_edges(edge_index: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Remove the edges between image node i and text node n_pairs + i (nodes: n_pairs images, then texts)."""
    src, dst = edge_index
    return edge_index[:, (src - dst).abs() != n_pairs]


def static_pair_edges(raw_img: torch.Tensor, raw_txt: torch.Tensor, cfg: GraphConfig) -> torch.Tensor:
    """`static` relation over B pairs (nodes: B images then B texts) from the frozen backbone globals.

    The two backbones' spaces are not comparable, so kNN runs inside each modality; the known pairs give the
    cross-modal edges. Self-loops come from the within-modality calls.
    """
    b = len(raw_img)
    check_k(cfg.k, b - 1, f"{b}-pair static graph")
    check_finite(torch.cat([raw_img, raw_txt], 1), f"{b}-pair static graph")
    with torch.no_grad():
        e_img = search.mutual_knn_edges(raw_img, cfg.k, relation="mutual", fallback=cfg.fallback, self_loops=True)
        e_txt = search.mutual_knn_edges(raw_txt, cfg.k, relation="mutual", fallback=cfg.fallback, self_loops=True)
        ar = torch.arange(b, device=raw_img.device)
        pairs = torch.stack([torch.cat([ar, ar + b]), torch.cat([ar + b, ar])])
        return torch.cat([e_img, e_txt + b, pairs], dim=1)


def bank_tau(bank_h: torch.Tensor, bank_modality: torch.Tensor, cfg: GraphConfig) -> torch.Tensor:
    """tau_j = similarity of bank node j's k-th neighbour inside the bank: i in kNN(j) iff sim(i, j) >= tau_j."""
    if cfg.relation == "knn":  # no reverse condition
        return torch.full((len(bank_h),), -float("inf"), device=bank_h.device)
    n_img = int((bank_modality == IMAGE).sum())
    n_candidates = min(n_img, len(bank_h) - n_img) if cfg.cross_modal_only else len(bank_h) - 1
    check_k(cfg.k, n_candidates, f"{len(bank_h)}-node reference bank")
    return search.kth_neighbour_similarity(
        bank_h, cfg.k, modality=bank_modality, cross_modal_only=cfg.cross_modal_only
    ).to(bank_h.dtype)


def bank_taus(bank_h: torch.Tensor, bank_modality: torch.Tensor, cfg: GraphConfig) -> list[torch.Tensor]:
    """tau of every relation in `parts(cfg)`, in that order."""
    return [bank_tau(bank_h, bank_modality, c) for c in parts(cfg)]


def query_bank_edges_all(hq, query_modality, bank_h, bank_modality, taus, cfg: GraphConfig, exclude=None):
    """`query_bank_edges` for every relation in `parts(cfg)`, united (each pair once)."""
    found = [query_bank_edges(hq, query_modality, bank_h, bank_modality, t, c, exclude) for c, t in zip(parts(cfg), taus)]
    if len(found) == 1:
        return found[0]
    e = _union(torch.stack([torch.cat([b for _, b in found]), torch.cat([q for q, _ in found])]), len(bank_h))
    return e[1], e[0]


def query_bank_edges(
    hq: torch.Tensor,
    query_modality: torch.Tensor,
    bank_h: torch.Tensor,
    bank_modality: torch.Tensor,
    tau: torch.Tensor,
    cfg: GraphConfig,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges bank node j -> query i (mutual against the bank); returns (query_index, bank_index).

    `exclude` (Q,) long: a bank index each query must not link to (-1: none), used when the query is itself a
    bank member (a training item in the database), so it is embedded like any other item, not with its copy."""
    with torch.no_grad():
        qi, bj, _ = search.mutual_knn_to_bank(
            hq.detach(),
            bank_h,
            cfg.k,
            tau,
            query_modality=query_modality,
            bank_modality=bank_modality,
            cross_modal_only=cfg.cross_modal_only,
            fallback=cfg.fallback,
            exclude=exclude,
        )
    return qi, bj


def region_word_alignment(
    regions: torch.Tensor, words: torch.Tensor, mask: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Fine-grained alignment of E image-text pairs: A = cos(regions, words) (E, R, W), max over regions, mean
    over the valid words. regions (E, R, t), words (E, W, t), mask (E, W) bool -> (E,)."""
    out = []
    for s in range(0, len(regions), chunk):
        r = F.normalize(regions[s : s + chunk], dim=-1)
        w = F.normalize(words[s : s + chunk], dim=-1)
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
        vals = region_word_alignment(regions[ri], words[rt], mask[rt])
    return score.masked_scatter(cross, vals.to(score.dtype))
