"""The graph layers of DCMFG (docs/method.md sections 3-4): attention with the alignment term, and one propagation
step with residual and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_geometric.nn import GATv2Conv, SAGEConv
from torch_geometric.utils import degree, softmax

from dcmfg.choices import Attention
from dcmfg.graph import Edges


class AlignedGATv2Conv(GATv2Conv):
    """PyG's GATv2Conv whose edge logits also receive `align_scale * align_ij` (docs/method.md section 3), align_ij the
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
    """One propagation step (docs/method.md section 4): messages from `sources` to the targets `h`, residual
    connection, LayerNorm. attention "alignment" (GATv2 + alignment term) | "gatv2" | "none" (mean of the
    neighbours, self-loop included: PyG's SAGEConv without root weight)."""

    def __init__(self, dim: int, heads: int, mode: str, dropout: float, align_scale: float):
        super().__init__()
        self.mode, self.heads = mode, heads
        if mode == Attention.NONE:
            self.conv = SAGEConv(dim, dim, aggr="mean", root_weight=False)
        else:
            self.conv = AlignedGATv2Conv(dim, heads, dropout, align_scale if mode == Attention.ALIGNMENT else 0.0)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, sources: torch.Tensor, h: torch.Tensor, edges: Edges) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (new target states (N, dim), alpha (E, heads)): each edge's attention coefficient."""
        if self.mode == Attention.NONE:
            m = self.conv((sources, h), edges.index, size=(len(sources), len(h)))
            dst = edges.index[1]
            alpha = (1.0 / degree(dst, len(h), dtype=h.dtype).clamp(min=1.0)[dst])[:, None].expand(-1, self.heads)
        else:
            align = edges.align if self.mode == Attention.ALIGNMENT else None
            m, (_, alpha) = self.conv((sources, h), edges.index, edge_attr=align, return_attention_weights=True)
        return self.norm(h + self.drop(F.gelu(m))), alpha
