"""Model introspection: what a trained DCMFG model attends to, read from the model itself (docs/method.md).

- `region_word_map(model, image_regions, text_words, text_mask) -> RegionWordMap`: the region-word alignment
  A(v, t) of one image (regions (R, Di)) and one text (words (W, Dt), mask (W,)) in the model's token space, the
  term the attention receives. Needs a model with token projections (`model.attention: alignment`).
- `neighbourhood(model, feats, modality, bank)`: each item's in-edges in the inference graph with their attention
  weights and whether each edge is mutual, one row per (item, layer, neighbour).
- `words_of(tokenizer, text)`: the words of a text as the text encoder pools them, in word-slot order.

Nothing here trains or changes a model. `dcmfg.search` (the search command) and the book's interpretability
chapter and explorer (`dcmfg.study.interpret`, `dcmfg.study.explorer`) read these.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from dcmfg.errors import ConfigError
from dcmfg.modality import IMAGE


@dataclass
class RegionWordMap:
    matrix: torch.Tensor  # (R, W) cosine of projected region r and word w (valid words only)
    best_region: torch.Tensor  # (W,) index of each word's best-aligned region
    score: float  # the alignment score the attention receives: per-word max over regions, mean over words
    grid: int  # regions form a grid x grid raster (row-major), for drawing over the image


def _need_tokens(model) -> None:
    if not getattr(model, "use_tokens", False):
        raise ConfigError(
            f"{type(model).__name__} has no region/word token projections (model.attention must be 'alignment')"
        )


@torch.no_grad()
def region_word_map(model, image_regions: torch.Tensor, text_words: torch.Tensor, text_mask: torch.Tensor) -> RegionWordMap:
    """A(v, t) for one image (regions (R, Di)) and one text (words (W, Dt), mask (W,)) in the model's token space."""
    _need_tokens(model)
    model.eval()
    r = F.normalize(model.tok_img(image_regions.float()[None])[0], dim=-1)
    w = F.normalize(model.tok_txt(text_words.float()[None])[0], dim=-1)[text_mask.bool()]
    if len(w) == 0:
        raise ConfigError("the text has no valid word tokens (empty mask)")
    A = r @ w.T
    best = A.max(dim=0)
    return RegionWordMap(A, best.indices, float(best.values.mean()), int(round(len(r) ** 0.5)))


@torch.no_grad()
def neighbourhood(model, feats: dict, modality: int, bank, *, layer: int | None = None) -> pd.DataFrame:
    """Each item's in-edges in the inference graph with their attention (the model's forward with
    return_attention=True), one row per (item, layer, neighbour).

    feats: features of the items in `modality` (dict as for `model.embed`); bank: from `model.build_bank`.
    Columns: item, layer, neighbour ('self' or 'bank'), bank_index, bank_modality ('image'/'text'),
    bank_row (the neighbour's position in the bank's training list), mutual (a genuine mutual edge; False for the
    fallback edge and the self-loop), alpha (mean over heads), alpha_h<i>.
    """
    if bank is None:
        raise ConfigError(f"{type(model).__name__} has no inference graph (no bank): nothing to show")
    model.eval()
    emb = model.embed(feats, modality, bank, return_attention=True)
    rows = []
    layers = range(len(emb["attention"])) if layer is None else [layer % len(emb["attention"])]
    for li in layers:
        a = emb["attention"][li]
        alpha = a["alpha"].float()
        bi = a["bank_index"]
        is_bank = bi >= 0
        safe = bi.clamp(min=0)
        df = pd.DataFrame(
            {
                "item": a["query_index"].numpy(),
                "layer": li,
                "neighbour": ["bank" if x else "self" for x in is_bank.tolist()],
                "bank_index": bi.numpy(),
                "bank_modality": [
                    ("image" if m == IMAGE else "text") if x else ("image" if modality == IMAGE else "text")
                    for m, x in zip(bank.modality[safe].tolist(), is_bank.tolist())
                ],
                "bank_row": torch.where(is_bank, bank.token_row[safe], torch.full_like(bi, -1)).numpy(),
                "mutual": a["mutual"].numpy(),
                "alpha": alpha.mean(1).numpy(),
            }
        )
        for h in range(alpha.shape[1]):
            df[f"alpha_h{h}"] = alpha[:, h].numpy()
        rows.append(df)
    return pd.concat(rows, ignore_index=True).sort_values(["item", "layer", "alpha"], ascending=[True, True, False]).reset_index(drop=True)


def words_of(tokenizer, text: str) -> list[str]:
    """The words as the text encoder pooled them (its tokenizer's word ids), in order."""
    enc = tokenizer(text, truncation=True)
    out, seen = [], set()
    for wid in enc.word_ids():
        if wid is None or wid in seen:
            continue
        seen.add(wid)
        span = enc.word_to_chars(wid)
        out.append(text[span.start : span.end])
    return out
