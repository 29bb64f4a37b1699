"""The book's figures: each function takes results (a dataset, report frames) and returns a matplotlib figure.

Notebooks show them with `dcmfg.study.show_figure(fig, caption)`; the caption (what to look at) stays in the notebook.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


def _sns():
    """seaborn with the book's theme, set when a seaborn figure is drawn (it restyles every figure after it)."""
    sns.set_theme(style="whitegrid", context="notebook")
    return sns


def label_frequencies(dataset):
    """Items per label (bars) and labels per item (histogram)."""
    sns = _sns()
    labels = np.asarray(dataset.labels, dtype=np.int64)
    n, c = labels.shape
    freq = pd.DataFrame({"label": dataset.label_names, "items": labels.sum(0)}).sort_values("items", ascending=False)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 0.22 * c)), gridspec_kw={"width_ratios": [2, 1]})
    sns.barplot(data=freq, y="label", x="items", ax=axes[0], color="#4c72b0")
    axes[0].set_title(f"Items per label ({dataset.name}, N = {n})")
    sns.histplot(labels.sum(1), discrete=True, ax=axes[1], color="#dd8452")
    axes[1].set_xlabel("labels per item")
    axes[1].set_title("Labels per item")
    fig.tight_layout()
    return fig


def example_items(dataset, n: int = 8, seed: int = 0, cols: int = 4):
    """A grid of random items: the image with its id, text and labels."""
    rng = np.random.default_rng(seed)
    show = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    rows = int(np.ceil(len(show) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), show):
        ax.imshow(dataset.image(int(i)))
        text = dataset.text(int(i))
        text = text if len(text) < 60 else text[:57] + "..."
        labs = ", ".join(name for name, v in zip(dataset.label_names, dataset.labels[i]) if v)
        ax.set_title(f"{dataset.ids[i]}\ntext: {text}\nlabels: {labs}", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def similarity_densities(frame: pd.DataFrame):
    """KDE of query-database cosines, relevant against irrelevant pairs, one panel per pair kind
    (frame: cosine, relevant, pair; see dcmfg.study.tables.raw_similarities)."""
    sns = _sns()
    g = sns.displot(data=frame, x="cosine", hue="relevant", col="pair", kind="kde", common_norm=False, height=3.2,
                    aspect=1.4, facet_kws={"sharex": False})
    return g.figure


def _pr_points(records: pd.DataFrame) -> pd.DataFrame:
    """P and R at each K per model, distance, direction and seed, side by side."""
    pr = records[records["metric"].isin(["P", "R"])]
    wide = pr.pivot_table(index=["model", "distance", "direction", "seed", "k"], columns="metric", values="value")
    wide = wide.reset_index()
    wide["run"] = wide["model"] + " (" + wide["distance"] + ")"
    return wide


def _by_direction(data: pd.DataFrame, x: str, y: str, **kw):
    """One line per run, one panel per direction (seaborn relplot)."""
    g = _sns().relplot(data=data, x=x, y=y, hue="run", col="direction", kind="line", marker="o", height=3.6,
                       aspect=1.2, **kw)
    g.set_titles("{col_name}")
    return g


def precision_at_k(records: pd.DataFrame):
    """P@K against K (log scale; band = 1 std over seeds), one panel per direction."""
    g = _by_direction(_pr_points(records), "k", "P", errorbar="sd")
    g.set(xscale="log", ylabel="precision@K")
    return g.figure


def rank_pr_curves(records: pd.DataFrame):
    """Rank-based precision-recall curves (P and R at each reported K, mean over seeds)."""
    wide = _pr_points(records).groupby(["run", "direction", "k"], as_index=False)[["P", "R"]].mean()
    g = _by_direction(wide, "R", "P", sort=False)
    g.set(xlabel="recall@K", ylabel="precision@K")
    return g.figure


def hamming_pr_curves(records: pd.DataFrame):
    """Hamming-radius PR curves of the hash codes (one point per radius), or None without hash codes."""
    sns = _sns()
    h = records[records["metric"].isin(["PR-hamming-P", "PR-hamming-R"])]
    if h.empty:
        return None
    wide = h.pivot_table(index=["model", "direction", "k"], columns="metric", values="value").reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, direction in zip(axes, ["I->T", "T->I"]):
        part = wide[wide["direction"] == direction]
        sns.lineplot(data=part, x="PR-hamming-R", y="PR-hamming-P", hue="model", marker="o", sort=False, ax=ax)
        ax.set(title=direction, xlabel="recall within radius", ylabel="precision within radius")
    fig.tight_layout()
    return fig


def reported_vs_measured(points: pd.DataFrame):
    """Reported and measured mAP side by side (points: label, direction, map, source), one panel per direction."""
    sns = _sns()
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.38 * points["label"].nunique() + 1.5), sharey=True)
    for ax, direction in zip(axes, ["I->T", "T->I"]):
        part = points[points["direction"] == direction]
        sns.scatterplot(data=part, x="map", y="label", hue="source", style="source", s=70, ax=ax)
        ax.set(title=f"{direction}, mAP", xlabel="mAP", ylabel="")
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig
