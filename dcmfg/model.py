"""DCMFG (method.md sections 1-4): projections, attention-guided edges, GNN layers, real and hash heads.

Every model in the harness (DCMFG and the baselines in `baselines.py`) has the same surface, so training and
evaluation never branch on the model:

- `forward(batch, gather=None, return_attention=False) -> dict` on a training mini-batch of B pairs;
- `build_bank(feats) -> Bank | None`: the reference bank (training nodes) the inference graph attaches to;
- `embed(feats, modality, bank, return_attention=False) -> dict(z, h[, attention])`: inductive embeddings,
  one item's result independent of the other items it is embedded with.

`batch`/`feats` are dicts of float tensors: image_global (N, Di), image_regions (N, R, Di), text_global (N, Dt),
text_words (N, W, Dt), text_mask (N, W) bool.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import degree, softmax

from dcmfg import graph as G
from dcmfg.config import Config
from dcmfg.errors import ConfigError

# ---------------------------------------------------------------------------------------------- pieces


class Projection(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: light head from a frozen backbone width into d."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionConv(MessagePassing):
    """Attention-weighted message passing (method.md section 3) on torch-geometric's MessagePassing.

    mode "gatv2": GATv2 logits a^T LeakyReLU(W_l x_j + W_r x_i) (the same parametrisation as PyG's GATv2Conv,
    share_weights=False, no self-loops added here), softmax over each target's neighbours.
    mode "alignment": the GATv2 logit plus scale_h * align_ij, align_ij the region-word alignment of a cross-modal
    edge (0 on same-modality edges).
    mode "none": plain degree-normalised weights 1/deg(i) (GCN-style mean over the neighbours, self-loop included).
    """

    def __init__(self, dim: int, heads: int, mode: str, dropout: float = 0.0, negative_slope: float = 0.2):
        super().__init__(aggr="add", node_dim=0)
        self.heads, self.channels, self.mode = heads, dim // heads, mode
        self.dropout, self.negative_slope = dropout, negative_slope
        self.lin_l = nn.Linear(dim, heads * self.channels)
        if mode != "none":
            self.lin_r = nn.Linear(dim, heads * self.channels)
            self.att = nn.Parameter(torch.empty(1, heads, self.channels))
            nn.init.xavier_uniform_(self.att.view(heads, self.channels))
        if mode == "alignment":
            # Alignment scores are cosines averaged over words: differences between neighbours are ~0.1, so
            # start with a scale that lets them matter; learned per head.
            self.align_scale = nn.Parameter(torch.full((heads,), 5.0))
        self.bias = nn.Parameter(torch.zeros(heads * self.channels))

    def edge_logits(
        self, xl: torch.Tensor, xr: torch.Tensor, edge_index: torch.Tensor, align: torch.Tensor | None
    ) -> torch.Tensor:
        """GATv2 logits (E, heads) from the source (xl) and target (xr) transforms, plus the alignment term."""
        src, dst = edge_index
        e = F.leaky_relu(xl[src] + xr[dst], self.negative_slope)
        logit = (e * self.att).sum(-1)  # (E, H)
        if self.mode == "alignment" and align is not None:
            logit = logit + align[:, None] * self.align_scale
        return logit

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, align: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (out (N, dim), alpha (E, heads)): the new features and each edge's attention coefficient."""
        n = x.size(0)
        dst = edge_index[1]
        xl = self.lin_l(x).view(-1, self.heads, self.channels)
        if self.mode == "none":
            deg = degree(dst, n, dtype=x.dtype).clamp(min=1.0)
            alpha = (1.0 / deg[dst])[:, None].expand(-1, self.heads)
        else:
            xr = self.lin_r(x).view(-1, self.heads, self.channels)
            alpha = softmax(self.edge_logits(xl, xr, edge_index, align), dst, num_nodes=n)
        out = self.propagate(edge_index, x=xl, alpha=F.dropout(alpha, self.dropout, self.training))
        return out.reshape(n, -1) + self.bias, alpha

    def forward_to_queries(
        self, h: torch.Tensor, xl_bank: torch.Tensor, edge_index: torch.Tensor, align: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bipartite step of the inference graph: sources = [queries; bank], targets = the Q queries only.

        `xl_bank` is lin_l of the bank states, computed once per bank (the bank's own updates are precomputed), so
        the cost per query does not grow with the bank. Same arithmetic as `forward` on the joint graph."""
        q = h.size(0)
        xl = torch.cat([self.lin_l(h).view(-1, self.heads, self.channels), xl_bank])
        dst = edge_index[1]
        if self.mode == "none":
            deg = degree(dst, q, dtype=h.dtype).clamp(min=1.0)
            alpha = (1.0 / deg[dst])[:, None].expand(-1, self.heads)
        else:
            xr = self.lin_r(h).view(-1, self.heads, self.channels)
            alpha = softmax(self.edge_logits(xl, xr, edge_index, align), dst, num_nodes=q)
        out = self.propagate(edge_index, x=(xl, xl[:q]), alpha=alpha, size=(xl.size(0), q))
        return out.reshape(q, -1) + self.bias, alpha

    def message(self, x_j: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return x_j * alpha.unsqueeze(-1)


class GraphLayer(nn.Module):
    """One propagation step (method.md section 4): attention conv, residual connection, LayerNorm."""

    def __init__(self, dim: int, heads: int, mode: str, dropout: float):
        super().__init__()
        self.conv = AttentionConv(dim, heads, mode, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, align: torch.Tensor | None = None):
        m, alpha = self.conv(h, edge_index, align)
        return self.norm(h + self.drop(F.gelu(m))), alpha

    def forward_to_queries(self, h, xl_bank, edge_index, align=None):
        m, alpha = self.conv.forward_to_queries(h, xl_bank, edge_index, align)
        return self.norm(h + self.drop(F.gelu(m))), alpha


@dataclass
class Bank:
    """The reference bank of the inference graph: training nodes [images..., texts...] and their layer states."""

    states: list[torch.Tensor]  # input of each layer, (M, d)
    sources: list[torch.Tensor]  # lin_l of each layer's states (M, heads, channels): the bank as message sources
    taus: list  # per layer, per relation of graph.parts: similarity of each bank node's k-th neighbour in the bank
    modality: torch.Tensor  # (M,) 0 image, 1 text
    token_row: torch.Tensor  # (M,) row into regions (image nodes) or words/mask (text nodes)
    regions: torch.Tensor | None = None  # projected region tokens of the bank images
    words: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    raw: dict = field(default_factory=dict)  # static relation: raw globals and taus per modality


# ---------------------------------------------------------------------------------------------- DCMFG


class DCMFG(nn.Module):
    """Dynamic cross-modal feature graph network."""

    def __init__(self, cfg: Config, image_dim: int, text_dim: int, num_labels: int):
        super().__init__()
        m = cfg.model
        self.cfg, self.gcfg = cfg, cfg.graph
        # The static graph's bank search runs inside one modality (raw backbone spaces are not comparable), so
        # cross_modal_only cannot apply there: it would leave no candidate at all.
        self.static_gcfg = replace(cfg.graph, cross_modal_only=False)
        self.proj_img = Projection(image_dim, m.hidden, m.dim, m.dropout)
        self.proj_txt = Projection(text_dim, m.hidden, m.dim, m.dropout)
        self.use_tokens = m.attention == "alignment"
        if self.use_tokens:
            self.tok_img = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, m.token_dim))
            self.tok_txt = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, m.token_dim))
        self.layers = nn.ModuleList(GraphLayer(m.dim, m.heads, m.attention, m.dropout) for _ in range(m.layers))
        self.hash_head = nn.Linear(m.dim, m.hash_bits)
        self.label_head = nn.Linear(m.dim, num_labels)

    # -- training graph over a mini-batch ---------------------------------------------------------------

    def encode(self, batch: dict) -> dict:
        """Per-item projections (what a DDP rank computes on its own shard before the graph is gathered)."""
        enc = {
            "p_img": self.proj_img(batch["image_global"]),
            "p_txt": self.proj_txt(batch["text_global"]),
            "raw_img": batch["image_global"],
            "raw_txt": batch["text_global"],
        }
        if self.use_tokens:
            enc["regions"] = self.tok_img(batch["image_regions"])
            enc["words"] = self.tok_txt(batch["text_words"])
            enc["mask"] = batch["text_mask"]
        return enc

    def forward(self, batch: dict, gather: Callable | None = None, return_attention: bool = False) -> dict:
        enc = self.encode(batch)
        if gather is not None:
            enc = {k: gather(v) for k, v in enc.items()}
        b = len(enc["p_img"])
        dev = enc["p_img"].device
        modality = torch.cat([torch.zeros(b, dtype=torch.long, device=dev), torch.ones(b, dtype=torch.long, device=dev)])
        token_row = torch.cat([torch.arange(b, device=dev), torch.arange(b, device=dev)])
        dense = None
        if self.use_tokens and self.cfg.loss.alignment:
            # Alignment loss over the first pairs of the (random) batch only: the dense image x text score tensor
            # is B*B*R*W, by far the largest cost of a step; the graph's edges are scored one by one below.
            a = min(b, self.cfg.loss.alignment_batch)
            dense = G.alignment_matrix_dense(enc["regions"][:a], enc["words"][:a], enc["mask"][:a])
        static = G.static_pair_edges(enc["raw_img"], enc["raw_txt"], self.gcfg) if self.gcfg.relation == "static" else None
        h = torch.cat([enc["p_img"], enc["p_txt"]])
        attention = []
        edges = None
        for i, layer in enumerate(self.layers):
            if edges is None or self.gcfg.rebuild_per_layer:
                edges = static if static is not None else self._graph(h, modality, b)
            align = (
                G.edge_alignment(edges, modality, token_row, enc["regions"], enc["words"], enc["mask"])
                if self.use_tokens
                else None
            )
            h, alpha = layer(h, edges, align)
            attention.append({"edge_index": edges, "alpha": alpha.detach()})
        out = self._heads(h[:b], h[b:])
        out["p_img"], out["p_txt"] = enc["p_img"], enc["p_txt"]
        if dense is not None:
            out["align"] = dense
        if return_attention:
            out["attention"] = attention
            out["modality"] = modality
        return out

    def _graph(self, h: torch.Tensor, modality: torch.Tensor, n_pairs: int) -> torch.Tensor:
        edges = G.batch_edges(h, modality, self.gcfg)
        return G.drop_pair_edges(edges, n_pairs) if self.gcfg.exclude_pair else edges

    def _heads(self, h_img: torch.Tensor, h_txt: torch.Tensor) -> dict:
        return {
            "z_img": F.normalize(h_img, dim=1),
            "z_txt": F.normalize(h_txt, dim=1),
            "h_img": torch.tanh(self.hash_head(h_img)),
            "h_txt": torch.tanh(self.hash_head(h_txt)),
            "logits_img": self.label_head(h_img),
            "logits_txt": self.label_head(h_txt),
        }

    # -- inference graph: a fixed bank of training nodes ---------------------------------------------

    @torch.no_grad()
    def build_bank(self, feats: dict) -> Bank:
        """Embed the training pairs as one graph (eval mode) and keep every layer's input states and taus."""
        enc = self.encode(feats)
        m0 = len(enc["p_img"])
        dev = enc["p_img"].device
        modality = torch.cat([torch.zeros(m0, dtype=torch.long, device=dev), torch.ones(m0, dtype=torch.long, device=dev)])
        token_row = torch.cat([torch.arange(m0, device=dev), torch.arange(m0, device=dev)])
        bank = Bank(states=[], sources=[], taus=[], modality=modality, token_row=token_row)
        if self.use_tokens:
            bank.regions, bank.words, bank.mask = enc["regions"], enc["words"], enc["mask"]
        static = None
        if self.gcfg.relation == "static":
            static = G.static_pair_edges(enc["raw_img"], enc["raw_txt"], self.gcfg)
            zeros = torch.zeros(m0, dtype=torch.long, device=dev)
            bank.raw = {
                "img": enc["raw_img"],
                "txt": enc["raw_txt"],
                "tau_img": G.bank_tau(enc["raw_img"], zeros, self.static_gcfg),
                "tau_txt": G.bank_tau(enc["raw_txt"], zeros, self.static_gcfg),
            }
        h = torch.cat([enc["p_img"], enc["p_txt"]])
        edges = None
        for layer in self.layers:
            if edges is None or self.gcfg.rebuild_per_layer:
                edges = static if static is not None else self._graph(h, modality, m0)
            bank.states.append(h)
            bank.sources.append(layer.conv.lin_l(h).view(len(h), layer.conv.heads, layer.conv.channels))
            bank.taus.append(G.bank_taus(h, modality, self.gcfg) if static is None else None)
            align = (
                G.edge_alignment(edges, modality, token_row, bank.regions, bank.words, bank.mask)
                if self.use_tokens
                else None
            )
            h, _ = layer(h, edges, align)
        return bank

    @torch.no_grad()
    def embed(
        self,
        feats: dict,
        modality: int,
        bank: Bank,
        return_attention: bool = False,
        chunk: int = 1024,
        exclude: torch.Tensor | None = None,
    ) -> dict:
        """Embed items of one modality against the bank; chunks only bound memory (queries never interact).

        `exclude` (N,) long: per item, the bank node that is the item itself (-1 if none); it is not linked."""
        key = "image" if modality == G.IMAGE else "text"
        n = len(feats[f"{key}_global"])
        outs, attn = [], []
        for s in range(0, n, chunk):
            part = {k: v[s : s + chunk] for k, v in feats.items() if k.startswith(key)}
            ex = None if exclude is None else exclude[s : s + chunk]
            o, a = self._embed_chunk(part, modality, bank, ex)
            outs.append(o)
            if return_attention:
                for entry in a:  # shift query indices to the full set
                    entry["query_index"] = entry["query_index"] + s
                attn.append(a)
        res = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        if return_attention:
            res["attention"] = [
                {k: torch.cat([a[layer][k] for a in attn]) for k in attn[0][layer]} for layer in range(len(attn[0]))
            ]
        return res

    def _embed_chunk(self, part: dict, modality: int, bank: Bank, exclude: torch.Tensor | None = None):
        is_img = modality == G.IMAGE
        g = part["image_global" if is_img else "text_global"]
        h = (self.proj_img if is_img else self.proj_txt)(g)
        q = len(h)
        dev = h.device
        toks = None
        if self.use_tokens:
            toks = self.tok_img(part["image_regions"]) if is_img else self.tok_txt(part["text_words"])
        qmod = torch.full((q,), modality, dtype=torch.long, device=dev)
        ar = torch.arange(q, device=dev)
        edges = None
        attention = []
        for i, layer in enumerate(self.layers):
            if edges is None or self.gcfg.rebuild_per_layer:
                if self.gcfg.relation == "static":
                    raw = bank.raw["img" if is_img else "txt"]
                    ex = None
                    if exclude is not None:  # bank index -> index inside this modality's raw block
                        ex = torch.where(exclude >= 0, exclude - (0 if is_img else len(raw)), exclude)
                    qi, bj = G.query_bank_edges(
                        g, torch.zeros(q, dtype=torch.long, device=dev), raw,
                        torch.zeros(len(raw), dtype=torch.long, device=dev),
                        bank.raw["tau_img" if is_img else "tau_txt"], self.static_gcfg, ex,
                    )
                    bj = bj + (0 if is_img else len(raw))  # bank order: images, then texts
                else:
                    qi, bj = G.query_bank_edges_all(
                        h, qmod, bank.states[i], bank.modality, bank.taus[i], self.gcfg, exclude
                    )
                    if exclude is not None and self.gcfg.exclude_pair:
                        # a bank member's own partner (its image or text) is not linked either, as in training
                        m0 = len(bank.modality) // 2
                        partner = torch.where(exclude >= 0, (exclude + m0) % (2 * m0), exclude)
                        keep = bj != partner[qi]
                        qi, bj = qi[keep], bj[keep]
                edge_index = torch.stack([torch.cat([bj + q, ar]), torch.cat([qi, ar])])
                align = None
                if self.use_tokens:
                    align = torch.zeros(edge_index.shape[1], device=dev, dtype=h.dtype)
                    cross = torch.cat([bank.modality[bj] != modality, torch.zeros(q, dtype=torch.bool, device=dev)])
                    if bool(cross.any()):
                        qc, bc = qi[cross[: len(qi)]], bj[cross[: len(qi)]]
                        rows = bank.token_row[bc]
                        if is_img:
                            vals = G.region_word_alignment(toks[qc], bank.words[rows], bank.mask[rows])
                        else:
                            vals = G.region_word_alignment(bank.regions[rows], toks[qc], part["text_mask"][qc])
                        align = align.masked_scatter(cross, vals.to(align.dtype))
            h, alpha = layer.forward_to_queries(h, bank.sources[i], edge_index, align)
            # bank_index -1 marks the query's self-loop
            src = edge_index[0]
            bank_index = torch.where(src >= q, src - q, torch.full_like(src, -1))
            attention.append({"query_index": edge_index[1], "bank_index": bank_index, "alpha": alpha})
        res = self._heads(h, h)
        return {"z": res["z_img"], "h": res["h_img"], "logits": res["logits_img"]}, attention


# ---------------------------------------------------------------------------------------------- weights on disk


def save_weights(model: nn.Module, path) -> None:
    """safetensors, written atomically so a kill never leaves half a file."""
    from dcmfg.fileio import save_safetensors_atomic

    save_safetensors_atomic(model.state_dict(), path)


def load_weights(model: nn.Module, path) -> None:
    """Load safetensors weights; a file from another model or config is refused, naming what differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        detail = "; ".join(
            s
            for s in (
                f"missing {', '.join(missing[:5])}" if missing else "",
                f"unexpected {', '.join(extra[:5])}" if extra else "",
                f"shape {', '.join(shapes[:5])}" if shapes else "",
            )
            if s
        )
        raise ConfigError(f"{path}: checkpoint does not fit this model/config ({type(model).__name__}): {detail}")
    model.load_state_dict(state)
