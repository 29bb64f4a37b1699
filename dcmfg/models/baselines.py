"""Baselines in the same harness (docs/method.md section 7): same features, splits, losses module and metrics.

- `linear`: the projection heads of DCMFG with no graph (the static-alignment model the paper argues against).
- `dcmh`: DCMH-style dual-network hashing: one MLP per modality to b tanh bits, inner-product likelihood over
  label similarity + quantisation + bit balance (trained jointly per batch rather than DCMH's alternating steps).
- `dcmht`: DCMHT-style contrastive hashing: a small transformer over each item's token sequence (global token +
  regions or words) to b tanh bits, contrastive loss on the codes + quantisation.

They have the surface of every model (`dcmfg.models.base.RetrievalModel`: `forward`, `build_bank` -> None, `embed`);
the bank argument is ignored.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcmfg.config import Config
from dcmfg.modality import IMAGE, TEXT
from dcmfg.models.base import ModelOutput, Projection, concat_chunks, modality_chunks


class _NoGraph(nn.Module):
    """Shared plumbing: items are embedded one by one, so training and inference are the same function."""

    def item(self, feats: dict, modality: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: dict, gather: Callable | None = None, return_attention: bool = False) -> ModelOutput:
        i, t = self.item(batch, IMAGE), self.item(batch, TEXT)
        out = ModelOutput(**{f"{k}_img": v for k, v in i.items()}, **{f"{k}_txt": v for k, v in t.items()})
        return out.map(gather) if gather is not None else out

    def build_bank(self, feats: dict, inference: str | None = None):
        return None

    @torch.no_grad()
    def embed(
        self, feats: dict, modality: int, bank=None, return_attention: bool = False, chunk: int = 4096, exclude=None
    ) -> dict:
        res = concat_chunks([self.item(part, modality) for _, part in modality_chunks(feats, modality, chunk)])
        if "z" not in res:  # hashing models: the real-valued embedding is the tanh code
            res["z"] = F.normalize(res["h"], dim=1)
        return res


class LinearModel(_NoGraph):
    def __init__(self, cfg: Config, image_dim: int, text_dim: int, num_labels: int):
        super().__init__()
        m = cfg.model
        self.proj_img = Projection(image_dim, m.hidden, m.dim, m.dropout)
        self.proj_txt = Projection(text_dim, m.hidden, m.dim, m.dropout)
        self.hash_head = nn.Linear(m.dim, m.hash_bits)
        self.label_head = nn.Linear(m.dim, num_labels)

    def item(self, feats: dict, modality: int) -> dict:
        p = self.proj_img(feats["image_global"]) if modality == IMAGE else self.proj_txt(feats["text_global"])
        return {"z": F.normalize(p, dim=1), "h": torch.tanh(self.hash_head(p)), "logits": self.label_head(p)}


class DCMH(_NoGraph):
    def __init__(self, cfg: Config, image_dim: int, text_dim: int, num_labels: int):
        super().__init__()
        m = cfg.model
        self.img = Projection(image_dim, m.hidden, m.hash_bits, m.dropout)
        self.txt = Projection(text_dim, m.hidden, m.hash_bits, m.dropout)

    def item(self, feats: dict, modality: int) -> dict:
        x = self.img(feats["image_global"]) if modality == IMAGE else self.txt(feats["text_global"])
        return {"h": torch.tanh(x)}


class _TokenEncoder(nn.Module):
    """[global; tokens] -> width d -> transformer encoder -> first token -> b tanh bits."""

    GROUP = 32  # texts encoded together, grouped by length (see forward)

    def __init__(self, d_in: int, d: int, heads: int, layers: int, bits: int, dropout: float):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d))
        self.kind = nn.Parameter(torch.zeros(2, d))  # marks the global token vs the token set
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.hash = nn.Linear(d, bits)

    def forward(self, glob: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None or len(glob) <= self.GROUP:
            return self._encode(glob, tokens, mask)
        # Tag lists differ a lot in length and padding was most of a text batch (and of this baseline's cost): encode
        # groups of similar length, each padded to its own longest. Attention, norms and the feed-forward act per
        # sequence or per token, so a sequence's code does not depend on its group.
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        parts = []
        for rows in order.split(self.GROUP):
            width = max(int(lengths[rows].max()), 1)
            parts.append(self._encode(glob[rows], tokens[rows, :width], mask[rows, :width]))
        return torch.cat(parts)[torch.argsort(order)]

    def _encode(self, glob: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([self.inp(glob)[:, None] + self.kind[0], self.inp(tokens) + self.kind[1]], dim=1)
        pad = None
        if mask is not None:  # True = padding for nn.Transformer; the global token is never padding
            pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)
        return torch.tanh(self.hash(self.enc(x, src_key_padding_mask=pad)[:, 0]))


class DCMHT(_NoGraph):
    def __init__(self, cfg: Config, image_dim: int, text_dim: int, num_labels: int):
        super().__init__()
        m = cfg.model
        d = m.token_dim
        self.img = _TokenEncoder(image_dim, d, m.heads, max(m.layers, 1), m.hash_bits, m.dropout)
        self.txt = _TokenEncoder(text_dim, d, m.heads, max(m.layers, 1), m.hash_bits, m.dropout)

    def item(self, feats: dict, modality: int) -> dict:
        if modality == IMAGE:
            return {"h": self.img(feats["image_global"], feats["image_regions"], None)}
        return {"h": self.txt(feats["text_global"], feats["text_words"], feats["text_mask"].bool())}
