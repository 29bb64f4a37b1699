"""DCMFG (method.md sections 1-4): projections, attention-guided edges, GNN layers, real and hash heads.

Every model in the harness (DCMFG and the baselines in `baselines.py`) has the same surface, so training and
evaluation never branch on the model:

- `forward(batch, gather=None, return_attention=False) -> ModelOutput` on a training mini-batch of B pairs;
- `build_bank(feats, inference=None) -> Bank | None`: the reference bank (training nodes) the inference graph
  attaches to;
- `embed(feats, modality, bank, return_attention=False, exclude=None) -> dict(z, h, logits[, attention], graph)`:
  inductive embeddings, one item's result independent of the other items it is embedded with.

`batch`/`feats` are dicts of float tensors: image_global (N, Di), image_regions (N, R, Di), text_global (N, Dt),
text_words (N, W, Dt), text_mask (N, W) bool.

The graph (`dcmfg.graph.batch`) has two implementations, the batch graph (training, and the bank's own graph) and the bank
graph (queries against the bank); `DCMFG.propagate` is the one loop that walks either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_geometric.nn import GATv2Conv, SAGEConv
from torch_geometric.utils import degree, scatter, softmax

from dcmfg.graph import batch as G
from dcmfg.config import Config
from dcmfg.errors import ConfigError
from dcmfg.graph.stats import GraphTally
from dcmfg.modality import IMAGE, TEXT

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


class AlignedGATv2Conv(GATv2Conv):
    """PyG's GATv2Conv whose edge logits also receive `align_scale * align_ij` (method.md section 3), align_ij the
    region-word alignment of a cross-modal edge (0 on same-modality edges and self-loops), passed as `edge_attr`
    (E,). Without edge_attr it is GATv2Conv (share_weights=False, no self-loops added: the graph has them).

    Attention dropout acts on the messages (as in GATv2Conv, dropout of the coefficients), so the coefficients it
    returns are the softmax itself: they sum to 1 per target in training too, which the graph statistics read."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, align_scale: float = 0.0):
        super().__init__(dim, dim // heads, heads=heads, add_self_loops=False, share_weights=False, dropout=0.0)
        self.attention_dropout, self.align_scale = dropout, align_scale

    def edge_update(self, x_j, x_i, edge_attr, index, ptr, dim_size):
        logit = (F.leaky_relu(x_i + x_j, self.negative_slope) * self.att).sum(dim=-1)  # GATv2, (E, heads)
        if edge_attr is not None:
            logit = logit + self.align_scale * edge_attr.view(-1, 1)
        return softmax(logit, index, ptr, dim_size)

    def message(self, x_j: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return x_j * F.dropout(alpha, self.attention_dropout, self.training).unsqueeze(-1)


class GraphLayer(nn.Module):
    """One propagation step (method.md section 4): messages from `sources` to the targets `h`, residual
    connection, LayerNorm. attention "alignment" (GATv2 + alignment term) | "gatv2" | "none" (mean of the
    neighbours, self-loop included: PyG's SAGEConv without root weight)."""

    def __init__(self, dim: int, heads: int, mode: str, dropout: float, align_scale: float):
        super().__init__()
        self.mode, self.heads = mode, heads
        if mode == "none":
            self.conv = SAGEConv(dim, dim, aggr="mean", root_weight=False)
        else:
            self.conv = AlignedGATv2Conv(dim, heads, dropout, align_scale if mode == "alignment" else 0.0)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, sources: torch.Tensor, h: torch.Tensor, edges: G.Edges) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (new target states (N, dim), alpha (E, heads)): each edge's attention coefficient."""
        if self.mode == "none":
            m = self.conv((sources, h), edges.index, size=(len(sources), len(h)))
            dst = edges.index[1]
            alpha = (1.0 / degree(dst, len(h), dtype=h.dtype).clamp(min=1.0)[dst])[:, None].expand(-1, self.heads)
        else:
            align = edges.align if self.mode == "alignment" else None
            m, (_, alpha) = self.conv((sources, h), edges.index, edge_attr=align, return_attention_weights=True)
        return self.norm(h + self.drop(F.gelu(m))), alpha


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
    stats: dict[str, float] = field(default_factory=dict)  # graph statistics (graphstats), keys graph_*

    def map(self, fn: Callable) -> "ModelOutput":
        """The same output with `fn` applied to every tensor field (e.g. a gather across ranks)."""
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


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
        self.use_tokens = m.attention == "alignment"
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
        """Run the layers over a graph (`graph.BatchGraph` or `graph.BankGraph`): the edges are built before the
        first layer and, with graph.rebuild_per_layer, again from the current states before every layer."""
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

    def _batch_graph(self, enc: dict, density: float = 1.0) -> G.BatchGraph:
        tokens = G.Tokens.unit(enc["regions"], enc["words"], enc["mask"]) if self.use_tokens else None
        raw = (enc["raw_img"], enc["raw_txt"]) if self.gcfg.relation == "static" else None
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
        graph = self._batch_graph(enc)
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
        mode = "bank" if mode == "transductive" else mode  # transductive numbers are added by evaluate
        if mode not in ("bank", "none", "smooth"):
            raise ConfigError(f"graph.inference={mode!r} is not one of bank, none, smooth, transductive")
        enc = self.encode(feats)
        n = len(enc["p_img"])
        dev = enc["p_img"].device
        modality = torch.cat([torch.full((n,), IMAGE, device=dev), torch.full((n,), TEXT, device=dev)]).long()
        density = G.bank_density(self.gcfg, n, self.cfg.train.batch_size)
        bank = G.Bank(n_pairs=n, modality=modality, inference=mode, density=density)
        if mode == "none" or (mode == "bank" and not self.layers):
            return bank
        if self.use_tokens:
            bank.tokens = G.Tokens.unit(enc["regions"], enc["words"], enc["mask"])
        graph = self._batch_graph(enc, density)
        h = torch.cat([enc["p_img"], enc["p_txt"]])
        tally = GraphTally()
        if mode == "smooth":
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
        only), `degree` (bank neighbours), and `graph` (a GraphTally of the query step); with `return_attention`, per layer: query_index, bank_index (-1: self-loop), alpha
        (E, heads), mutual (E,) bool (a genuine mutual edge; False for fallback edges and self-loops)."""
        key = "image" if modality == IMAGE else "text"
        n = len(feats[f"{key}_global"])
        tally = GraphTally(shared_candidates=True)
        outs, attn = [], []
        for s in range(0, n, chunk):
            part = {k: v[s : s + chunk] for k, v in feats.items() if k.startswith(key)}
            ex = None if exclude is None else exclude[s : s + chunk]
            o, a = self._embed_chunk(part, modality, bank, ex, tally)
            outs.append(o)
            for entry in a:  # shift query indices to the full set
                entry["query_index"] = entry["query_index"] + s
            attn.append(a)
        res = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
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
        mode = "none" if bank is None else bank.inference
        if mode == "none" or (mode == "bank" and not self.layers):
            return self._heads(h), []
        tokens = None
        if self.use_tokens:
            tokens = (G.Tokens.unit(regions=self.tok_img(part["image_regions"])) if is_img
                      else G.Tokens.unit(words=self.tok_txt(part["text_words"]), mask=part["text_mask"]))
        graph = G.BankGraph(self.gcfg, bank, modality, tokens=tokens, raw=g if self.gcfg.relation == "static" else None,
                            centre=self.centre, exclude=exclude)
        if mode == "smooth":
            edges = graph.edges(0, h)
            tally.add(edges)
            src, dst = edges.index[:, ~edges.self_loop]
            mean = scatter(graph.sources(0, h, edges)[src], dst, dim=0, dim_size=len(h), reduce="mean")  # 0 if none
            return {**self._heads(h + mean), **_item_stats([edges], len(h))}, []
        h, trace = self.propagate(h, graph, tally)
        attention = [{"query_index": s.edges.index[1], "bank_index": graph.bank_index(s.edges), "alpha": s.alpha,
                      "mutual": s.edges.mutual} for s in trace]
        return {**self._heads(h), **_item_stats([s.edges for s in trace], len(h))}, attention


def _item_stats(steps: list[G.Edges], n: int) -> dict:
    """Per target, a mean over the graph steps (layers): `mutual` (had >= 1 genuine mutual neighbour), `fallback`
    (was served by the fallback edge only), `degree` (non-self in-edges). Per item, so they can be sliced to a
    split part and gathered across ranks like the embeddings."""
    out = {"mutual": [], "fallback": [], "degree": []}
    for e in steps:
        tgt, other = e.index[1], ~e.self_loop
        genuine = torch.bincount(tgt[other & ~e.fallback], minlength=n) > 0
        out["mutual"].append((torch.bincount(tgt[e.mutual & other], minlength=n) > 0).float())
        out["fallback"].append(((torch.bincount(tgt[e.fallback & other], minlength=n) > 0) & ~genuine).float())
        out["degree"].append(torch.bincount(tgt[other], minlength=n).float())
    return {k: torch.stack(v).mean(0) for k, v in out.items()}
