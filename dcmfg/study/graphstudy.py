"""Does the graph help? The arms, controls and tables of the graph chapter (notebooks/05-graph.ipynb).

A claim that the graph helps needs its control: the same model without the graph, with the same losses and
budget, trained to convergence, paired over split seeds, with Student-t intervals (`dcmfg.study.stats`). The arms:

- **DCMFG**: the shipped config, scored with its graph (bank inference);
- **DCMFG weights, no graph**: the same trained weights scored with `graph.inference=none` (the projections alone);
- **DCMFG weights, bank smoothing**: the same weights, each query's projection plus the mean of its bank
  neighbours' projections (`graph.inference=smooth`), no learned layer;
- **layers=0**: DCMFG trained with `model.layers=0` (same projections, heads and losses, no graph): the primary
  control; and the same with bank smoothing (memory of training items without learned message passing);
- **linear, loss-matched**: the linear baseline with the same total contrastive weight (configs/linear.yaml).

Every function reads run reports (`dcmfg.study.Study.run`: report.json plus run_dir, history, seed, label).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from dcmfg.config import get_dotted
from dcmfg.engine.evaluate import evaluate
from dcmfg.study.stats import BETTER, NO_DIFFERENCE, NO_INTERVAL, WORSE, format_interval, mean_std
from dcmfg.study.tables import interval_table, paired_table

REFERENCE = "DCMFG"
CONTROLS = [(REFERENCE, "dcmfg", {}), ("layers=0", "dcmfg", {"model.layers": 0}), ("linear, loss-matched", "linear", {})]
# the relation switches of configs/dcmfg.yaml, each a config change against the shipped default
SWITCHES = {
    "csls": ("CSLS hubness correction", {"graph.hubness": "csls"}),
    "centre": ("modality centring", {"graph.centre": True}),
    "ratio2": ("relaxed mutuality k' = 2k", {"graph.reverse_ratio": 2.0}),
    "matched": ("bank density matched", {"graph.bank_density": "matched"}),
    "knn": ("plain kNN (no mutual test)", {"graph.relation": "knn"}),
    "union": ("intra- plus cross-modal", {"graph.cross_modal_only": False, "graph.cross_k": 8}),
    "static": ("static graph (frozen features)", {"graph.relation": "static"}),
}
DIRECTIONS = ("I->T", "T->I")


def rescore(report: dict, inference: str) -> dict:
    """A run's selected checkpoint scored on the query split with graph.inference=`inference` (same weights),
    cached in the run folder as evaluate_query_<inference>.json."""
    path = Path(report["run_dir"]) / f"evaluate_query_{inference}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return evaluate(report["run_dir"], "query", out=path, overrides=[f"graph.inference={inference}"])


def controls_frame(reports: list[dict]) -> pd.DataFrame:
    """One row per (arm, seed): query mAP@all (cosine) per direction and the run's validation mAP. The DCMFG and
    layers=0 runs are also scored without the graph / with bank smoothing (same weights, rows of their own)."""
    rows = []

    def add(arm: str, r: dict, rep: dict, trained: bool):
        cos = rep["summaries"]["cosine"]
        rows.append({"arm": arm, "seed": r["seed"], "I->T": cos["map_i2t"], "T->I": cos["map_t2i"],
                     "val mAP": r["best_val"], "best epoch": r["best_epoch"], "epochs run": len(r.get("history", [])),
                     "CPU seconds": r.get("cpu_seconds") if trained else np.nan,
                     "seconds": r.get("seconds") if trained else np.nan})

    for r in reports:
        label = r.get("label", r["model"])
        add(label, r, r, True)
        if label == REFERENCE:
            add(f"{REFERENCE} weights, no graph", r, rescore(r, "none"), False)
            add(f"{REFERENCE} weights, bank smoothing", r, rescore(r, "smooth"), False)
        elif label == "layers=0":
            add("layers=0 + bank smoothing", r, rescore(r, "smooth"), False)
    return pd.DataFrame(rows)


def paired_against(frame: pd.DataFrame, reference: str, values=DIRECTIONS, arm: str = "arm") -> pd.DataFrame:
    """`reference - other` per other arm and value column, paired over seeds, with the t interval and verdict."""
    return interval_table(frame, arm=arm, reference=reference, values=list(values), value_name="measure")


# Columns shown as each seed's value ("8, 12") and columns of seconds shown whole, by `mean_table`.
COUNTS = ("best epoch", "epochs run", "steps run", "seeds")
SECONDS = ("CPU seconds", "seconds")


def mean_table(frame: pd.DataFrame, by: str, values) -> pd.DataFrame:
    """'mean ± std' over seeds per `by` value (in first-seen order); empty where a value was not measured."""

    def cell(v: pd.Series) -> str:
        v = v.dropna()
        if not len(v):
            return ""
        if bool((v == v.round()).all()) and v.name in COUNTS:
            return ", ".join(str(int(x)) for x in v)  # counts: each seed's value
        if v.name in SECONDS:  # costs: whole seconds, not the 4 decimals of an mAP
            return f"{v.mean():,.0f}" + (f" ± {v.std(ddof=1):,.0f}" if len(v) > 1 else "")
        return mean_std(v)

    return frame.groupby(by, sort=False)[list(values)].agg(cell).reset_index()


def graph_stats_table(reports: list[dict], label: str = REFERENCE) -> pd.DataFrame:
    """Graph statistics of one arm, mean ± std over seeds: training batches (metrics.jsonl at the selected epoch),
    the bank's own graph and the query step (report['graph'])."""
    parts: dict[str, list[dict]] = {"training batches": [], "bank graph": [], "queries": []}
    for r in reports:
        if r.get("label", r["model"]) != label or not r.get("graph"):
            continue
        best = next((h for h in r.get("history", []) if h["epoch"] == r["best_epoch"]), {})
        parts["training batches"].append({k.removeprefix("graph_"): v for k, v in best.items() if k.startswith("graph_")})
        parts["bank graph"].append(r["graph"]["bank"])
        g = r["graph"]
        parts["queries"].append({"mutual_share": g["query_mutual_share"], "fallback_share": g["query_fallback_share"],
                                 "in_degree": g["query_in_degree"]})
    cols = {}
    for where, rows in parts.items():
        if rows:
            cols[where] = pd.DataFrame(rows).agg(mean_std)
    out = pd.DataFrame(cols)
    out.index.name = "statistic"
    return out.reset_index()


def switch_frame(reports: list[dict]) -> pd.DataFrame:
    """One row per (variant, seed): validation mAP (selection), query mutual share, query mAP (information)."""
    rows = []
    for r in reports:
        g = r.get("graph") or {}
        rows.append({"variant": r.get("label", r["model"]), "seed": r["seed"], "val mAP": r["best_val"],
                     "query mutual share": g.get("query_mutual_share", np.nan),
                     "bank mutual share": (g.get("bank") or {}).get("mutual_share", np.nan),
                     "bank hubness": (g.get("bank") or {}).get("hubness", np.nan),
                     "I->T": r["summaries"]["cosine"]["map_i2t"], "T->I": r["summaries"]["cosine"]["map_t2i"],
                     "best epoch": r["best_epoch"], "CPU seconds": r.get("cpu_seconds")})
    return pd.DataFrame(rows)


def versus(frame: pd.DataFrame, reference: str, values, by: str = "variant") -> pd.DataFrame:
    """Each variant minus the reference, paired over seeds, per value column: '+0.0012 [-0.0030, +0.0054]' and the
    verdict of the variant against the reference; one row per variant (empty without another variant)."""
    rows = {}
    for col in values:
        t = paired_table(frame, arm=by, reference=reference, values=[col])
        flip = {BETTER: WORSE, WORSE: BETTER}
        for r in t.to_dict("records"):
            name = r["comparison"].split(" - ", 1)[1]
            neg = {**r, "mean": -r["mean"], "ci_low": -r["ci_high"], "ci_high": -r["ci_low"]}
            rows.setdefault(name, {by: name, "seeds": r["n"]})
            rows[name][f"{col}: variant - {reference} [95% t interval]"] = format_interval(neg)
            rows[name][f"{col} verdict"] = flip.get(r["verdict"], r["verdict"])
    return pd.DataFrame(list(rows.values()))


def switch_table(frame: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Each variant against the reference on VALIDATION mAP (the selection criterion), paired over seeds, beside
    its mean mutual share and hubness and its query mAP."""
    means = frame.groupby("variant", sort=False)[["val mAP", "query mutual share", "bank mutual share", "bank hubness",
                                                  "I->T", "T->I"]].mean().reset_index()
    diffs = versus(frame, reference, ["val mAP"])
    if diffs.empty:  # the reference alone: nothing to pair
        return means
    out = means.merge(diffs, on="variant", how="left")
    return out.assign(seeds=out["seeds"].astype("Int64"))  # the reference row has none: keep counts integers


# Ablations of the propagation itself (chapter 6); the relation and k are chapter 5's switches and sweep.
ABLATIONS = {
    "attention": [("GATv2 + alignment", {"model.attention": "alignment"}), ("GATv2 only", {"model.attention": "gatv2"}),
                  ("mean of neighbours (no attention)", {"model.attention": "none"})],
    "dynamic": [("rebuilt before every layer", {"graph.rebuild_per_layer": True}),
                ("built once per forward", {"graph.rebuild_per_layer": False})],
    "layers": [],  # filled from layer_values: L = v
    "relation": [("mutual kNN", {"graph.relation": "mutual"}), ("plain kNN", {"graph.relation": "knn"}),
                 ("static graph", {"graph.relation": "static"})],
}


def ablation_variants(group: str, layer_values=(1, 2, 3)) -> list[tuple[str, dict]]:
    """(label, settings) of one ablation group; the first is the shipped default's value."""
    if group == "layers":
        return [(f"L = {int(v)}", {"model.layers": int(v)}) for v in layer_values]
    if group not in ABLATIONS:
        raise ValueError(f"unknown ablation group {group!r}; available: {', '.join(sorted(ABLATIONS))}")
    return ABLATIONS[group]


def verdict_sentence(table: pd.DataFrame, comparison: str) -> str:
    """A sentence with the computed verdict words of one comparison of `paired_against` (both directions)."""
    part = table[table["comparison"] == comparison]
    bits = [f"{row['measure']} {row['verdict']} ({row['difference [95% t interval]']}, {row['seeds']} seeds)"
            for row in part.to_dict("records")]
    return f"{comparison}: " + "; ".join(bits) if bits else f"{comparison}: not measured"


def helps(table: pd.DataFrame, comparison: str) -> str:
    """What the verdicts of both directions of one comparison add up to, in words computed from them."""
    v = table.loc[table["comparison"] == comparison, "verdict"].tolist()
    if not v:
        return "was not measured"
    if NO_INTERVAL in v:
        return "cannot be judged (one seed: no interval)"
    if all(x == BETTER for x in v):
        return "is better in both directions"
    if all(x == WORSE for x in v):
        return "is worse in both directions"
    if all(x == NO_DIFFERENCE for x in v):
        return "makes no detectable difference in either direction"
    if set(v) <= {BETTER, NO_DIFFERENCE}:
        return "is better in one direction and makes no detectable difference in the other"
    if set(v) <= {WORSE, NO_DIFFERENCE}:
        return "is worse in one direction and makes no detectable difference in the other"
    return "gives mixed results (" + ", ".join(v) + ")"


def curves_figure(curves: pd.DataFrame):
    """Validation mAP (mean of both directions) per epoch, one panel per arm, one line per seed, the selected epoch
    marked."""
    curves = curves.assign(val=(curves["val mAP I->T"] + curves["val mAP T->I"]) / 2)
    arms = list(dict.fromkeys(curves["model"]))
    fig, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.3), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], arms):
        part = curves[curves["model"] == name]
        for seed, run in part.groupby("seed"):
            line, = ax.plot(run["epoch"], run["val"], lw=1.2, label=f"seed {seed}")
            best = run[run["best"]]
            ax.plot(best["epoch"], best["val"], "o", color=line.get_color())
        ax.set_title(name)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("validation mAP@all")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def k_sweep_figure(frame: pd.DataFrame):
    """Validation mAP and query mutual share against k (mean ± std over seeds)."""
    f = frame.assign(k=frame["variant"].str.extract(r"(\d+)")[0].astype(int))
    g = f.groupby("k")[["val mAP", "query mutual share"]].agg(["mean", "std"])
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ax.errorbar(g.index, g[("val mAP", "mean")], g[("val mAP", "std")].fillna(0), marker="o", label="validation mAP")
    ax.set_xlabel("k")
    ax.set_ylabel("validation mAP@all")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(g.index), [str(k) for k in g.index])
    ax2 = ax.twinx()
    ax2.errorbar(g.index, g[("query mutual share", "mean")], g[("query mutual share", "std")].fillna(0), marker="s",
                 color="tab:orange", label="query mutual share")
    ax2.set_ylabel("queries with a mutual neighbour")
    ax2.set_ylim(0, 1.05)
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def closing_note(controls: pd.DataFrame, stats: pd.DataFrame, seeds) -> str:
    """The chapter's conclusion, every verdict computed from the tables above."""
    no_graph = f"{REFERENCE} - layers=0"
    same = f"{REFERENCE} - {REFERENCE} weights, no graph"
    linear = f"{REFERENCE} - linear, loss-matched"
    lines = [
        f"Against the same model trained without graph layers, DCMFG with its graph {helps(controls, no_graph)}: "
        + verdict_sentence(controls, no_graph) + ".",
        f"Scored without its graph, the same trained weights: DCMFG with its graph {helps(controls, same)} "
        + "(" + verdict_sentence(controls, same) + ").",
        f"Against the loss-matched linear baseline, DCMFG {helps(controls, linear)} ("
        + verdict_sentence(controls, linear) + ").",
    ]
    if not stats.empty and "queries" in stats:
        row = stats.set_index("statistic")
        lines.append(f"Queries with a genuine mutual bank neighbour: {row.loc['mutual_share', 'queries']}; served by the "
                     f"fallback edge only: {row.loc['fallback_share', 'queries']} (mean ± std over split seeds {list(seeds)}).")
    return "\n".join(lines)


def default_variant(cfg, variants: list[tuple[str, dict]]) -> str | None:
    """The label of the variant whose settings the config already has (the shipped default), if any."""
    values = cfg.to_dict()
    return next((label for label, st in variants if all(get_dotted(values, k) == v for k, v in st.items())), None)


def ablation_figure(frame: pd.DataFrame, groups: list[str]):
    """Query mAP@all of each variant, one panel per group and direction, a dot per split seed and the mean."""
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 2.2 + 1.1 * len(groups) * 1.6), squeeze=False)
    for row, group in zip(axes, groups):
        part = frame[frame["group"] == group]
        names = list(dict.fromkeys(part["variant"]))
        for ax, d in zip(row, DIRECTIONS):
            for y, name in enumerate(names):
                v = part.loc[part["variant"] == name, d]
                ax.plot(v, [y] * len(v), "o", color="tab:blue", alpha=0.5)
                ax.plot([v.mean()], [y], "|", color="black", markersize=16, mew=2)
            ax.set_yticks(range(len(names)), names)
            ax.set_title(f"{group}: {d}", fontsize=10)
            ax.set_xlabel("query mAP@all")
    fig.tight_layout()
    return fig
