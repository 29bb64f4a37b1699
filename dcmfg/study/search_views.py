"""HTML views of search results: what a query retrieves from a trained run, and why.

Every view is an HTML string built from `dcmfg.search` results (thumbnails and figures inlined as data URIs), so the
book's static pages and the live explorer (`dcmfg.study.explorer`) show the same thing:

- `query_html`: what was asked (the text or image, and for a dataset item its labels and tags);
- `results_html`: the top results as thumbnails (or texts) with their scores and relevance marks;
- `compare_html`: two runs side by side on the same query, each result marked with its rank in the other run;
- `region_word_html`: for a selected result, which image regions each word of the pair aligns with;
- `neighbourhood_html`: the query's neighbours in the inference graph, their modality, attention weights and
  whether each edge is a genuine mutual edge or a fallback.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from dcmfg import search as Q
from dcmfg.explain import region_word_map
from dcmfg.modality import IMAGE, TEXT
from dcmfg.study.display import png_data_uri

MARKS = {True: ("&#10003;", "#1a7f37", "shares a label with the query"),
         False: ("&#10007;", "#cf222e", "shares no label with the query")}
ERROR_CLASS = "dcmfg-explorer-error"

# ---------------------------------------------------------------------------------------------- pictures


def _jpeg_uri(image, size: int) -> str:
    im = image.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


_THUMBS: dict = {}  # (image key, size) -> data URI: the same thumbnails come back query after query


def item_thumb(dataset, row: int, size: int = 128) -> str:
    """A dataset item's image as a JPEG data URI."""
    key = (dataset.image_key(int(row)), int(size))
    uri = _THUMBS.get(key)
    if uri is None:
        if len(_THUMBS) >= 4096:
            _THUMBS.clear()
        uri = _THUMBS[key] = _jpeg_uri(dataset.image(int(row)), size)
    return uri


def esc(x) -> str:
    """Text made safe for HTML (attributes included)."""
    return html.escape(str(x), quote=True)


def error_html(message: str) -> str:
    return (f'<div class="{ERROR_CLASS}" style="color:#cf222e;border:1px solid #cf222e;padding:4px 8px;'
            f'border-radius:4px">{esc(message)}</div>')


# ---------------------------------------------------------------------------------------------- results


def query_html(res: Q.SearchResult, size: int = 128) -> str:
    """What was asked: the query text or image (and for a dataset item, its id, labels and tags)."""
    q, ds = res.query, res.run.dataset
    parts = []
    if q.kind == "image" and q.image is not None:
        parts.append(f'<img class="dcmfg-query-image" src="{_jpeg_uri(q.image, size)}" style="max-height:{size}px"/>')
    if q.item is not None:
        parts.append(f'<img src="{item_thumb(ds, q.item, size)}" style="max-height:{size}px"/>')
    desc = f"<b>query</b> {esc(q.description)}"
    if q.item is not None:
        labels = ", ".join(n for n, v in zip(ds.label_names, ds.labels[q.item]) if v)
        desc += f"<br/>labels: {esc(labels) or '(none)'}<br/>tags: {esc(ds.text(q.item)) or '(none)'}"
    parts.append(f'<div style="font-size:0.9em">{desc}<br/>against {len(res.run.db_idx)} database '
                 f"{esc(res.against)}, {esc(res.distance)}</div>")
    return '<div class="dcmfg-query" style="display:flex;gap:10px;align-items:center">' + "".join(parts) + "</div>"


def _score(res: Q.SearchResult, value) -> str:
    return f"cos {value:.3f}" if res.distance == "cosine" else f"ham {int(value)}"


def results_html(res: Q.SearchResult, size: int = 128, other: Q.SearchResult | None = None,
                 other_name: str = "", title: str = "") -> str:
    """The top results as cards: image thumbnail (or the text, with its image small), rank, score, relevance
    mark (for dataset-item queries) and, with `other`, the item's rank in the other run's list."""
    ds = res.run.dataset
    other_rank = {} if other is None else dict(zip(other.table["row"], other.table["rank"]))
    cards = []
    for r in res.table.itertuples(index=False):
        mark = ""
        if r.shares_label is not None:
            sym, colour, title = MARKS[bool(r.shares_label)]
            if r.is_query_item:
                sym, colour, title = "=", "#555", "the query item itself"
            mark = f'<span title="{title}" style="color:{colour};font-weight:bold">{sym}</span> '
        badge = ""
        if other is not None:
            o = other_rank.get(r.row)
            label = f"{esc(other_name or 'other')}: {o if o is not None else f'&gt;{len(other.table)}'}"
            badge = f'<div class="dcmfg-other-rank" style="font-size:0.75em;color:#555">{label}</div>'
        img = f'<img class="dcmfg-thumb" alt="{esc(r.id)}" src="{item_thumb(ds, r.row, size)}" '
        if res.against == "images":
            body = img + f'style="width:{size}px;height:{size}px;object-fit:cover"/>'
        else:
            text = esc(textwrap.shorten(r.text, 90, placeholder=" ...") or "(no tags)")
            body = (f'<div class="dcmfg-text-result" style="height:{size // 2}px;overflow:hidden;font-size:0.8em">{text}</div>'
                    + img + f'style="width:{size // 2}px;height:{size // 2}px;object-fit:cover;opacity:0.8" '
                    'title="the text\'s own image"/>')
        cards.append(
            f'<div class="dcmfg-card" data-row="{r.row}" style="width:{size}px;font-size:0.8em;line-height:1.2">'
            f"{body}<div>{mark}<b>{r.rank}</b> {esc(r.id)} <span style=\"color:#555\">{_score(res, getattr(r, res.distance))}</span></div>"
            f'<div style="color:#555;height:2.4em;overflow:hidden" title="{esc(r.labels)}">{esc(r.labels)}</div>{badge}</div>'
        )
    summary = ""
    if res.query.item is not None:
        rel = res.table["shares_label"].astype(bool)
        summary = f"{int(rel.sum())} of {len(rel)} share a label with the query item (precision@{len(rel)} {rel.mean():.2f})"
    head = f"{esc(title)} <span style=\"font-weight:normal;color:#555\">{esc(res.run.name)}</span>" if title else esc(res.run.name)
    head += "" if res.distance == "cosine" else ' <span style="font-weight:normal;color:#555">(Hamming)</span>'
    return (f'<div class="dcmfg-results"><div style="font-weight:bold">{head}</div>'
            f'<div style="font-size:0.8em;color:#555">{summary}</div>'
            '<div style="display:flex;flex-wrap:wrap;gap:6px">' + "".join(cards) + "</div></div>")


def compare_html(a: Q.SearchResult, b: Q.SearchResult, size: int = 112, names=("A", "B")) -> str:
    """Two runs on the same query, side by side; each card names its rank in the other run's top list."""
    overlap = len(set(a.rows) & set(b.rows))
    head = (f'<div style="font-size:0.85em">{overlap} of the top {len(a.table)} are in both lists; '
            f'a card\'s badge is its rank in the other run (&gt;{len(b.table)}: not in its top list).</div>')
    cols = [results_html(a, size, b, names[1], names[0]), results_html(b, size, a, names[0], names[1])]
    return head + '<div style="display:flex;gap:16px">' + "".join(
        f'<div style="flex:1;min-width:0">{c}</div>' for c in cols) + "</div>"


# ---------------------------------------------------------------------------------------------- region-word map


def region_word_html(res: Q.SearchResult, rank: int = 1, max_words: int = 6, size: float = 2.2) -> str:
    """Which regions of the image each word aligns with, for the query and its result at `rank` (one image and
    one text). Cosines in the model's projected token space, drawn over the image's r x r region grid."""
    run, q = res.run, res.query
    ds, feats = run.dataset, run.data.feats
    if not getattr(run.model, "use_tokens", False):
        return (f'<p class="dcmfg-note">{esc(run.name)} has no region/word token projections '
                "(model.attention is not 'alignment'): no region-word map.</p>")
    if (q.modality == TEXT) == (res.against == "texts"):
        return '<p class="dcmfg-note">The query and its results are of one modality: no region-word pair to map.</p>'
    if rank < 1 or rank > len(res.table):
        raise Q.QueryError(f"rank {rank} is not in the result list (1..{len(res.table)})")
    row = int(res.table["row"].iloc[rank - 1])
    if q.modality == TEXT:
        regions = feats["image_regions"][row].float()
        words, mask = q.feats["text_words"][0], q.feats["text_mask"][0]
        image, text = ds.image(row), q.text if q.text is not None else ds.text(q.item)
    else:
        regions = q.feats["image_regions"][0]
        words, mask = feats["text_words"][row].float(), feats["text_mask"][row]
        image = q.image if q.image is not None else ds.image(q.item)
        text = ds.text(row)
    m = region_word_map(run.model, regions, words, mask)
    names = Q.words_of(run, text)[: m.matrix.shape[1]]
    names += [f"word {i}" for i in range(len(names), m.matrix.shape[1])]
    A = m.matrix.numpy()  # (R, W)
    order = np.argsort(-A.max(0), kind="stable")[:max_words]
    g = m.grid
    fig, axes = plt.subplots(1, len(order) + 1, figsize=(size * (len(order) + 1), size * 1.15), squeeze=False)
    img = np.asarray(image.convert("RGB"))
    h, w = img.shape[:2]
    axes[0][0].imshow(img)
    axes[0][0].set_title("image", fontsize=9)
    lo, hi = float(A.min()), float(A.max())
    for ax, wi in zip(axes[0][1:], order):
        ax.imshow(img)
        ax.imshow(A[:, wi].reshape(g, g), cmap="magma", alpha=0.55, extent=(0, w, h, 0), vmin=lo, vmax=hi,
                  interpolation="nearest")
        ax.set_title(f"{names[wi][:14]} ({A[:, wi].max():.2f})", fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    fig.tight_layout()
    cap = (f"Region-word map of the query and result {rank} ({ds.ids[row]}): each panel colours the {g}x{g} regions "
           f"by their cosine with one word (brighter = closer; words ordered by their best region). The alignment "
           f"score the attention receives (best region per word, mean over words) is {m.score:.3f}.")
    return (f'<figure class="dcmfg-region-word"><img style="max-width:100%" alt="region-word map" src="{png_data_uri(fig, dpi=100)}"/>'
            f'<figcaption style="font-size:0.85em">{esc(cap)}</figcaption></figure>')


# ---------------------------------------------------------------------------------------------- neighbourhood


EDGE_STYLE = {"mutual": "-", "fallback": "--", "unknown": ":"}


def neighbourhood_html(res: Q.SearchResult, max_neighbours: int = 8, size: int = 64) -> str:
    """The query's neighbours in the inference graph, one drawing per layer (edge width = attention, solid =
    mutual edge, dashed = fallback edge, dotted = not reported by the model), and the table of every edge."""
    run, ds = res.run, res.run.dataset
    nb = res.neighbours()
    if nb.empty:
        return (f'<p class="dcmfg-note">{esc(run.name)} embeds each item on its own (no inference graph): '
                "no neighbourhood to show.</p>")
    layers = sorted(nb["layer"].unique())[:4]
    most = max(int(((nb["layer"] == li) & (nb["neighbour"] == "bank")).sum()) for li in layers)
    side = 4.4
    fig, axes = plt.subplots(1, len(layers), figsize=(side * len(layers), side * (0.6 if most <= 2 else 1.0)),
                             squeeze=False)
    for ax, li in zip(axes[0], layers):
        _star(ax, res, nb[nb["layer"] == li], int(li), max_neighbours, size)
    fig.tight_layout()
    uri = png_data_uri(fig, dpi=100)
    unknown = (" The model does not report whether an edge is mutual or a fallback ('unknown'): it is not guessed."
               if "unknown" in set(nb["edge"]) else "")
    cap = (f"The query's neighbourhood in {run.name}'s inference graph, one panel per layer (the graph is rebuilt "
           "before each layer when graph.rebuild_per_layer is on). Edge width and label: attention weight (mean "
           "over heads); solid = genuine mutual edge, dashed = fallback edge (no mutual neighbour), dotted = not "
           "reported. Frame colour for a dataset-item query: green shares a label with it, red shares none."
           + unknown)
    table = nb.drop(columns=[c for c in nb.columns if c.startswith("alpha_h")] + ["row"])
    table = table.assign(labels=[", ".join(n for n, v in zip(ds.label_names, ds.labels[r]) if v) if r >= 0 else ""
                                 for r in nb["row"]])
    return (f'<figure class="dcmfg-neighbourhood"><img style="max-width:100%" alt="neighbourhood" src="{uri}"/>'
            f'<figcaption style="font-size:0.85em">{esc(cap)}</figcaption></figure>'
            + table.to_html(index=False, float_format=lambda v: f"{v:.3f}", classes="dcmfg-table", border=0))


def _star(ax, res: Q.SearchResult, here, layer: int, max_neighbours: int, size: int) -> None:
    """One layer's neighbourhood: the query in the centre, its strongest neighbours around it."""
    q, ds = res.query, res.run.dataset
    self_alpha = float(here.loc[here["neighbour"] == "self", "alpha"].sum())
    edges = here[here["neighbour"] == "bank"].head(max_neighbours)
    few = len(edges) <= 2  # one or two neighbours (the usual fallback edge of a new query): side by side
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(*((-0.9, 0.9) if few else (-1.6, 1.6)))
    ax.set_aspect("equal")
    ax.axis("off")
    if few:  # query on the left, its one or two neighbours on the right: long enough edges to see their style
        cx, cy = -0.75, 0.0
        spots = [(0.95, 0.0)] if len(edges) == 1 else [(0.95, 0.45), (0.95, -0.45)]
    else:
        cx, cy = 0.0, 0.0
        angles = np.linspace(0, 2 * np.pi, len(edges), endpoint=False) + np.pi / 2
        spots = [(1.05 * np.cos(a), 1.05 * np.sin(a)) for a in angles]
    amax = max(float(edges["alpha"].max()) if len(edges) else 1.0, 1e-6)
    qrel = ds.labels[q.item] if q.item is not None else None
    for rec, (x, y) in zip(edges.itertuples(index=False), spots):
        ax.plot([cx, x], [cy, y], EDGE_STYLE.get(rec.edge, ":"), color="#444", lw=0.5 + 5.0 * rec.alpha / amax,
                zorder=1)
        ax.text(cx + 0.55 * (x - cx), cy + 0.55 * (y - cy), f"{rec.alpha:.2f}", fontsize=8, ha="center",
                va="center", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85), zorder=3)
        colour = "#555"
        if qrel is not None:
            colour = "#1a7f37" if bool((ds.labels[rec.row] & qrel).any()) else "#cf222e"
        if rec.modality == "image":
            thumb = ds.image(int(rec.row)).convert("RGB")
            thumb.thumbnail((size, size))
            ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(thumb), zoom=1.0), (x, y), frameon=True,
                                         bboxprops=dict(edgecolor=colour, lw=2), zorder=2))
        else:
            ax.text(x, y, "\n".join(textwrap.wrap(ds.text(int(rec.row)) or "(no tags)", 16)[:3]), fontsize=7,
                    ha="center", va="center", bbox=dict(boxstyle="round", fc="#f6f8fa", ec=colour, lw=2), zorder=2)
        ax.text(x, y - 0.42, f"{rec.id} ({rec.modality}, {rec.edge})", fontsize=7, ha="center", va="top", color="#333")
    if q.modality == IMAGE:
        im = (q.image if q.image is not None else ds.image(q.item)).convert("RGB")
        im.thumbnail((size, size))
        ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(im), zoom=1.0), (cx, cy), bboxprops=dict(lw=3), zorder=4))
    else:
        text = q.text if q.text is not None else ""
        ax.text(cx, cy, "\n".join(textwrap.wrap(text, 18)[:3]) or "query", fontsize=9, ha="center", va="center",
                bbox=dict(boxstyle="round", fc="#fff8c5", ec="#333", lw=2), zorder=4)
    n_all = int((here["neighbour"] == "bank").sum())
    shown = f"{len(edges)} strongest of {n_all}" if n_all > len(edges) else f"{n_all}"
    ax.set_title(f"layer {layer}: {shown} neighbour(s), self-loop {self_alpha:.2f}", fontsize=9)


def distance_for(run: Q.Run, distance: str | None) -> str | None:
    """A requested Hamming ranking falls back to cosine for a run without hash head (said in its header)."""
    if distance == "hamming" and not run.has_hash():
        return "cosine"
    return distance or None  # "" or None: the run's own eval.distance
