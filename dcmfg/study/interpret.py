"""What the interpretability chapter shows (docs/method.md section 3): which regions each word aligns with, which
neighbours (with which attention weight, mutual or fallback) shaped an item's embedding in the inference graph, and
where retrieval fails.

Everything reads a trained DCMFG model; nothing here trains or changes it. The figure functions return matplotlib
figures for `dcmfg.study.show_figure`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dcmfg.explain import neighbourhood, region_word_map, words_of


def _labels(dataset, i: int) -> str:
    return ", ".join(n for n, v in zip(dataset.label_names, dataset.labels[i]) if v)


def alignment_figure(model, feats: dict, dataset, items, tokenizer, words_per_item: int = 4):
    """For each item (dataset index): its image, then its best-aligned words, each with the cosine of that word with
    every region drawn over the image (bright = high; colour scale shared within a row)."""
    import textwrap

    import matplotlib.pyplot as plt

    items = [int(i) for i in items]
    fig, axes = plt.subplots(len(items), words_per_item + 1, figsize=(2.7 * (words_per_item + 1), 2.9 * len(items)),
                             squeeze=False)
    for row_axes, i in zip(axes, items):
        m = region_word_map(model, feats["image_regions"][i], feats["text_words"][i], feats["text_mask"][i])
        A, words = m.matrix.T, words_of(tokenizer, dataset.text(i))[: m.matrix.shape[1]]
        img = dataset.image(i)
        row_axes[0].imshow(img)
        row_axes[0].set_title("\n".join(textwrap.wrap(f"{dataset.ids[i]}: {_labels(dataset, i)}", 28)), fontsize=8)
        for ax, w in zip(row_axes[1:], torch.argsort(A.amax(1), descending=True)[:words_per_item].tolist()):
            ax.imshow(img)
            ax.imshow(A[w].reshape(m.grid, m.grid).numpy(), cmap="magma", alpha=0.55, interpolation="nearest",
                      extent=(0, img.width, img.height, 0), vmin=float(A.min()), vmax=float(A.max()))
            ax.set_title(f"'{words[w] if w < len(words) else '?'}'  max {A[w].max():.2f}", fontsize=9)
        for ax in row_axes:
            ax.axis("off")
    fig.tight_layout()
    return fig


@torch.no_grad()
def query_edges(model, feats: dict, items, modality: int, bank, train_idx, dataset, layer: int = 0) -> pd.DataFrame:
    """Every edge of the query items (dataset indices; `feats` holds all items) to the bank at one layer: query,
    neighbour item (dataset index), its node modality, kind (mutual / fallback / self), attention (mean over heads),
    and whether the two items share a label."""
    from dcmfg.engine.data import take

    items = [int(i) for i in items]
    nb = neighbourhood(model, take(feats, items), modality, bank, layer=layer)
    q = [items[i] for i in nb["item"]]
    other = [int(train_idx[r]) if r >= 0 else qi for r, qi in zip(nb["bank_row"], q)]
    kind = np.where(nb["neighbour"] == "self", "self", np.where(nb["mutual"], "mutual", "fallback"))
    labels = np.asarray(dataset.labels)
    share = (labels[q] * labels[other]).any(1)
    return pd.DataFrame({"query": q, "neighbour": other, "node": nb["bank_modality"], "kind": kind,
                         "alpha": nb["alpha"], "shares a label": share})


def edge_summary(edges: pd.DataFrame) -> pd.DataFrame:
    """Per edge kind: number of edges, share of the queries' edges, label precision (share of edges joining items
    that share a label) and mean attention."""
    e = edges[edges["kind"] != "self"]
    out = e.groupby("kind").agg(edges=("alpha", "size"), precision=("shares a label", "mean"), attention=("alpha", "mean"))
    out["share of edges"] = out["edges"] / max(len(e), 1)
    queries = edges["query"].nunique()
    out["queries with one"] = e.groupby("kind")["query"].nunique() / max(queries, 1)
    return out.reset_index()[["kind", "edges", "share of edges", "queries with one", "precision", "attention"]]


def neighbourhood_figure(edges: pd.DataFrame, dataset, query: int, max_neighbours: int = 8):
    """One query's bank neighbours as a star: thumbnails for image nodes, tag boxes for text nodes; edge width and
    number = attention; solid = genuine mutual edge, dashed = fallback edge; green = shares a label, red = not."""
    import textwrap

    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    mine = edges[edges["query"] == query]
    self_alpha = float(mine.loc[mine["kind"] == "self", "alpha"].sum())
    nb = mine[mine["kind"] != "self"].sort_values("alpha", ascending=False).head(max_neighbours)
    few = len(nb) <= 2
    fig, ax = plt.subplots(figsize=(7.5, 3.4) if few else (7.5, 5.6))
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(*((-0.6, 0.6) if few else (-1.35, 1.35)))
    ax.axis("off")
    centre = (-1.0, 0.0) if few else (0.0, 0.0)
    if few:  # one or two neighbours (the usual fallback edge): side by side, so the edge style shows
        spots = [(0.9, 0.0)] if len(nb) == 1 else [(0.9, 0.3), (0.9, -0.3)]
    else:
        spots = [(np.cos(a), np.sin(a)) for a in np.linspace(0, 2 * np.pi, len(nb), endpoint=False)]
    amax = max(float(nb["alpha"].max()) if len(nb) else 1.0, 1e-6)
    for rec, (x, y) in zip(nb.itertuples(), spots):
        colour = "#2f855a" if rec._6 else "#c53030"
        ax.plot([centre[0], x], [centre[1], y], color=colour, lw=1 + 7 * rec.alpha / amax, alpha=0.8, zorder=1,
                ls="-" if rec.kind == "mutual" else "--")
        ax.text((centre[0] + x) / 2, (centre[1] + y) / 2, f"{rec.alpha:.2f}", fontsize=8, ha="center", va="center",
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none"), zorder=3)
        if rec.node == "image":
            th = dataset.image(int(rec.neighbour))
            th.thumbnail((72, 72))
            ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(th)), (x, y), frameon=True,
                                         bboxprops=dict(ec=colour, lw=2), zorder=2))
        else:
            txt = "\n".join(textwrap.wrap(dataset.text(int(rec.neighbour)), 18)[:4])
            ax.text(x, y, txt, fontsize=7, ha="center", va="center", zorder=2,
                    bbox=dict(boxstyle="round", fc="#fff5eb", ec=colour, lw=2))
    th = dataset.image(int(query))
    th.thumbnail((110, 110))
    ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(th)), centre, frameon=True, bboxprops=dict(ec="black", lw=3),
                                 zorder=4))
    ax.set_title(f"query image {dataset.ids[int(query)]} ({_labels(dataset, int(query))}); self-loop weight "
                 f"{self_alpha:.2f}", fontsize=10)
    return fig


def failure_figure(dataset, q_idx, db_idx, zq: torch.Tensor, zdb: torch.Tensor, ap: torch.Tensor, n: int = 3):
    """The n queries with the lowest AP (image -> text), each with its labels (and how many items carry each) and
    the three top-ranked texts (+ relevant, - not)."""
    import textwrap

    import matplotlib.pyplot as plt

    worst = torch.argsort(ap)[:n].tolist()
    top = torch.topk(F.normalize(zq[worst], dim=1) @ F.normalize(zdb, dim=1).T, 3, dim=1).indices
    freq = np.asarray(dataset.labels).sum(0)
    fig, axes = plt.subplots(1, len(worst), figsize=(5.0 * len(worst), 6.0), squeeze=False)
    for ax, w, t in zip(axes[0], worst, top):
        i = int(q_idx[w])
        ax.imshow(dataset.image(i))
        ax.axis("off")
        labs = ", ".join(f"{nm} ({freq[c]})" for c, (nm, v) in enumerate(zip(dataset.label_names, dataset.labels[i])) if v)
        lines = [f"query {dataset.ids[i]}  AP {float(ap[w]):.2f}",
                 "\n".join(textwrap.wrap(f"labels (items with it): {labs}", 44)), f"own text: {dataset.text(i)[:40]}",
                 "top texts:"]
        for j in t.tolist():
            d = int(db_idx[j])
            ok = bool((np.asarray(dataset.labels[d]) * np.asarray(dataset.labels[i])).any())
            lines.append(f"{'+' if ok else '-'} {dataset.text(d)[:34]}")
        ax.set_title("\n".join(lines), fontsize=10, loc="left")
    fig.tight_layout()
    return fig
