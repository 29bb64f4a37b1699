"""DCMFG (docs/method.md sections 1-4): projections, the dynamic graph, GNN layers, real and hash heads.

It has the surface every model of the harness has (`dcmfg.models.base.RetrievalModel`: `forward`, `build_bank`,
`embed`) and the graph model's (`GraphModel`: `encode`, `batch_graph`, `propagate`). The graph (`dcmfg.graph`) has
two implementations, the batch graph (training, and the bank's own graph) and the bank graph (queries against the
bank); `DCMFG.propagate` is the one loop that walks either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_geometric.utils import scatter

from dcmfg import graph as G
from dcmfg.choices import Attention, Inference, Relation, values
from dcmfg.config import Config
from dcmfg.errors import ConfigError
from dcmfg.graph.stats import GraphTally, item_stats
from dcmfg.modality import IMAGE, TEXT
from dcmfg.models.base import ModelOutput, Projection, concat_chunks, modality_chunks
from dcmfg.models.layers import GraphLayer


@dataclass
class Step:
    """One layer of a propagation: its input states, its edges, the attention coefficients."""

    input: torch.Tensor
    edges: G.Edges
    alpha: torch.Tensor


# ---------------------------------------------------------------------------------------------- DCMFG


class DCMFG(nn.Module):
    """Dynamic cross-modal feature graph network."""

    def __init__(self, cfg: Config, image_dim: int, text_dim: int, num_labels: int):
        super().__init__()
        m = cfg.model
        self.cfg, self.gcfg = cfg, cfg.graph
        self.proj_img = Projection(image_dim, m.hidden, m.dim, m.dropout)
        self.proj_txt = Projection(text_dim, m.hidden, m.dim, m.dropout)
        self.use_tokens = m.attention == Attention.ALIGNMENT
        if self.use_tokens:
            self.tok_img = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, m.token_dim))
            self.tok_txt = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, m.token_dim))
        self.layers = nn.ModuleList(
            GraphLayer(m.dim, m.heads, m.attention, m.dropout, m.align_scale) for _ in range(m.layers)
        )
        # one running mean per graph build (every layer with rebuild_per_layer, else the first)
        builds = max(1, m.layers if cfg.graph.rebuild_per_layer else 1)
        self.centre = nn.ModuleList(G.ModalityCentre(m.dim) for _ in range(builds)) if cfg.graph.centre else None
        self.hash_head = nn.Linear(m.dim, m.hash_bits)
        self.label_head = nn.Linear(m.dim, num_labels)

    # -- the one propagation loop ----------------------------------------------------------------------

    def propagate(self, h: torch.Tensor, graph, tally: GraphTally | None = None) -> tuple[torch.Tensor, list[Step]]:
        """Run the layers over a graph (`dcmfg.graph.BatchGraph` or `dcmfg.graph.BankGraph`): the edges are built
        before the first layer and, with graph.rebuild_per_layer, again from the current states before every layer.
        `tally` (a `GraphTally`) counts each step. Returns (output states, one `Step` per layer)."""
        trace: list[Step] = []
        edges = None
        for i, layer in enumerate(self.layers):
            if edges is None or self.gcfg.rebuild_per_layer:
                edges = graph.edges(i, h)
            out, alpha = layer(graph.sources(i, h, edges), h, edges)
            trace.append(Step(h, edges, alpha))
            if tally is not None:
                tally.add(edges, alpha, layer=i)
            h = out
        return h, trace

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

    def batch_graph(self, enc: dict, density: float = 1.0) -> G.BatchGraph:
        """The graph over the n pairs of `encode`'s output (a training batch, or the bank's own graph): the unit
        tokens for the alignment score, the frozen globals for the static relation, the model's centring.
        `density` scales k' of the reverse test (`dcmfg.graph.bank_density`)."""
        tokens = G.Tokens.unit(enc["regions"], enc["words"], enc["mask"]) if self.use_tokens else None
        raw = (enc["raw_img"], enc["raw_txt"]) if self.gcfg.relation == Relation.STATIC else None
        return G.BatchGraph(self.gcfg, len(enc["p_img"]), tokens=tokens, raw=raw, centre=self.centre,
                            density=density, device=enc["p_img"].device)

    def forward(self, batch: dict, gather: Callable | None = None, return_attention: bool = False) -> ModelOutput:
        enc = self.encode(batch)
        if gather is not None:
            enc = {k: gather(v) for k, v in enc.items()}
        b = len(enc["p_img"])
        out = ModelOutput(p_img=enc["p_img"], p_txt=enc["p_txt"])
        if self.use_tokens and self.cfg.loss.alignment:
            # Alignment loss over the first pairs of the (random) batch only: the dense image x text score tensor
            # is B*B*R*W, by far the largest cost of a step; the graph's edges are scored one by one.
            a = min(b, self.cfg.loss.alignment_batch)
            out.align = G.alignment_matrix_dense(enc["regions"][:a], enc["words"][:a], enc["mask"][:a])
        graph = self.batch_graph(enc)
        h = torch.cat([enc["p_img"], enc["p_txt"]])
        if not self.layers and self.centre is not None and self.training:
            self.centre[0](h.detach(), graph.modality)  # keep the running means for bank smoothing
        tally = GraphTally()
        h, trace = self.propagate(h, graph, tally)
        heads = self._heads(h)
        out.z_img, out.z_txt = heads["z"][:b], heads["z"][b:]
        out.h_img, out.h_txt = heads["h"][:b], heads["h"][b:]
        out.logits_img, out.logits_txt = heads["logits"][:b], heads["logits"][b:]
        out.stats = tally.summary()
        if return_attention:
            out.attention = [{"edge_index": s.edges.index, "alpha": s.alpha.detach(), "mutual": s.edges.mutual}
                             for s in trace]
            out.modality = graph.modality
        return out

    def _heads(self, h: torch.Tensor) -> dict:
        return {"z": F.normalize(h, dim=1), "h": torch.tanh(self.hash_head(h)), "logits": self.label_head(h)}

    # -- inference graph: a fixed bank of training nodes ---------------------------------------------

    @torch.no_grad()
    def build_bank(self, feats: dict, inference: str | None = None) -> G.Bank:
        """Embed the training pairs as one graph (eval mode) and keep every layer's input states and the relation
        state (tau, r) the queries' mutual test needs. `inference` (default graph.inference): "bank" (the learned
        layers over the bank graph), "none" (no graph: the projections alone, same weights), "smooth" (no learned
        layer: each query's projection plus the mean of its bank neighbours' projections)."""
        mode = inference or self.gcfg.inference
        mode = Inference.BANK if mode == Inference.TRANSDUCTIVE else mode  # transductive numbers are added by evaluate
        if mode not in (Inference.BANK, Inference.NONE, Inference.SMOOTH):
            raise ConfigError(f"graph.inference={mode!r} is not one of {', '.join(values(Inference))}")
        enc = self.encode(feats)
        n = len(enc["p_img"])
        dev = enc["p_img"].device
        modality = torch.cat([torch.full((n,), IMAGE, device=dev), torch.full((n,), TEXT, device=dev)]).long()
        density = G.bank_density(self.gcfg, n, self.cfg.train.batch_size)
        bank = G.Bank(n_pairs=n, modality=modality, inference=mode, density=density)
        if mode == Inference.NONE or (mode == Inference.BANK and not self.layers):
            return bank
        if self.use_tokens:
            bank.tokens = G.Tokens.unit(enc["regions"], enc["words"], enc["mask"])
        graph = self.batch_graph(enc, density)
        h = torch.cat([enc["p_img"], enc["p_txt"]])
        tally = GraphTally()
        if mode == Inference.SMOOTH:
            edges = graph.edges(0, h)
            tally.add(edges)
            bank.states, bank.relations = [h], [edges.relation]
        else:
            _, trace = self.propagate(h, graph, tally)
            bank.states = [s.input for s in trace]
            bank.relations = [s.edges.relation for s in trace]
        bank.stats = tally.summary()
        return bank

    @torch.no_grad()
    def embed(
        self,
        feats: dict,
        modality: int,
        bank: G.Bank | None,
        return_attention: bool = False,
        chunk: int = 1024,
        exclude: torch.Tensor | None = None,
    ) -> dict:
        """Embed items of one modality against the bank; chunks only bound memory (queries never interact).

        `exclude` (N,) long: per item, the bank node that is the item itself (-1 if none); neither it nor (with
        graph.exclude_pair) its paired node is linked. Returns z, h, logits; with a graph also per item (N,) means
        over the layers `mutual` (had >= 1 genuine mutual bank neighbour), `fallback` (served by the fallback edge
        only), `degree` (bank neighbours), and `graph` (a GraphTally of the query step); with `return_attention`,
        per layer: query_index, bank_index (-1: self-loop), alpha (E, heads), mutual (E,) bool (a genuine mutual
        edge; False for fallback edges and self-loops)."""
        tally = GraphTally(shared_candidates=True)
        outs, attn = [], []
        for s, part in modality_chunks(feats, modality, chunk):
            ex = None if exclude is None else exclude[s : s + chunk]
            o, a = self._embed_chunk(part, modality, bank, ex, tally)
            outs.append(o)
            for entry in a:  # shift query indices to the full set
                entry["query_index"] = entry["query_index"] + s
            attn.append(a)
        res = concat_chunks(outs)
        res["graph"] = tally
        if return_attention:
            res["attention"] = [
                {k: torch.cat([a[layer][k] for a in attn]) for k in attn[0][layer]} for layer in range(len(attn[0]))
            ]
        return res

    def _embed_chunk(self, part: dict, modality: int, bank: G.Bank | None, exclude, tally: GraphTally):
        is_img = modality == IMAGE
        g = part["image_global" if is_img else "text_global"]
        h = (self.proj_img if is_img else self.proj_txt)(g)
        mode = Inference.NONE if bank is None else bank.inference
        if mode == Inference.NONE or (mode == Inference.BANK and not self.layers):
            return self._heads(h), []
        tokens = None
        if self.use_tokens:
            tokens = (G.Tokens.unit(regions=self.tok_img(part["image_regions"])) if is_img
                      else G.Tokens.unit(words=self.tok_txt(part["text_words"]), mask=part["text_mask"]))
        graph = G.BankGraph(self.gcfg, bank, modality, tokens=tokens, raw=g if self.gcfg.relation == Relation.STATIC else None,
                            centre=self.centre, exclude=exclude)
        if mode == Inference.SMOOTH:
            edges = graph.edges(0, h)
            tally.add(edges)
            src, dst = edges.index[:, ~edges.self_loop]
            mean = scatter(graph.sources(0, h, edges)[src], dst, dim=0, dim_size=len(h), reduce="mean")  # 0 if none
            return {**self._heads(h + mean), **item_stats([edges])}, []
        h, trace = self.propagate(h, graph, tally)
        attention = [{"query_index": s.edges.index[1], "bank_index": graph.bank_index(s.edges), "alpha": s.alpha,
                      "mutual": s.edges.mutual} for s in trace]
        return {**self._heads(h), **item_stats([s.edges for s in trace])}, attention
