"""Does the graph's gain grow with the data? The learning curve (notebooks/05b-learning-curve.ipynb).

DCMFG and its primary control (the same model with `model.layers=0`: same projections, heads, losses and budget,
no graph) are trained at several training-pool sizes. Every size uses the same split seed's queries and database:
under the random protocol a seed's permutation fixes the queries, and the training pool of n pairs is the first n
database items of that permutation, so the pools are nested (dcmfg.data.splits.make_split). Validation is 10 % of
each pool (the `val` parameter), so model selection never sees the queries.

At each size the paired gain (DCMFG minus layers=0, per split seed) gets its 95 % Student-t interval and a verdict
(`dcmfg.study.stats`). Whether the gain grows is a paired question too: each seed's gains, regressed on log2 of the
size, give one slope per seed, and the slopes get their own interval and verdict (`trend`).

Budgets: give the runs a budget in optimizer steps (`train.max_steps`, `train.patience_steps`, ...; see
dcmfg.engine.train.epoch_budget) so that a small pool is not given fewer steps than a large one.
"""

from __future__ import annotations

import dataclasses
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from dcmfg.study.forest import COLOURS, intervals
from dcmfg.study.graphstudy import CONTROLS, DIRECTIONS, REFERENCE, helps, mean_table
from dcmfg.study.stats import (BETTER, GROWS, NO_DIFFERENCE, NO_TREND, SHRINKS, WORSE, format_interval,
                               paired_difference)
from dcmfg.study.study import Study, train_studies
from dcmfg.study.tables import ALL_CONVERGED, INTERVAL, interval_table

# chapter 5's DCMFG and its primary control, the same arms (so the protocol's own size reuses chapter 5's runs)
ARMS = CONTROLS[:2]
CONTROL = ARMS[1][0]
TREND = f"slope of ({REFERENCE} - {CONTROL}) on log2(training pairs)"


def size_studies(s: Study, sizes) -> list[Study]:
    """One Study per training-pool size (a count of pairs; None: the study's own `train`), largest last."""
    out = [dataclasses.replace(s, train=s.train if n is None else int(n)) for n in sizes]
    return sorted(out, key=lambda x: math.inf if x.train is None else x.train)


def curve_runs(studies: list[Study], seeds, settings: dict | None = None) -> list[dict]:
    """Both arms at every size on `seeds` (trained in one pool), each report with `pool` (training-pool pairs)
    and `train pairs` (the training part, validation carved off)."""
    train_studies([(st, [(ARMS, seeds, settings)]) for st in studies])
    out = []
    for st in studies:
        for r in st.runs(ARMS, seeds=seeds, settings=settings):
            out.append({**r, "train pairs": int(r["n_bank_pairs"])})  # the training part (the bank)
    return out


def curve_frame(reports: list[dict]) -> pd.DataFrame:
    """One row per (size, arm, seed): query mAP@all (cosine) per direction, validation mAP, the selected epoch
    against the epochs run, the optimizer steps run, the query mutual share (DCMFG) and the cost."""
    rows = []
    for r in reports:
        cos = r["summaries"]["cosine"]
        hist = r.get("history", [])
        g = r.get("graph") or {}
        rows.append({"train pairs": r["train pairs"], "arm": r["label"], "seed": r["seed"],
                     "I->T": cos["map_i2t"], "T->I": cos["map_t2i"], "val mAP": r["best_val"],
                     "best epoch": r["best_epoch"], "epochs run": len(hist),
                     "steps run": hist[-1]["step"] if hist else 0,
                     "converged": r["best_epoch"] < len(hist),
                     "query mutual share": g.get("query_mutual_share", np.nan),
                     "CPU seconds": r.get("cpu_seconds")})
    return pd.DataFrame(rows)


def curve_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Both arms at every size: mean ± std over seeds of the query and validation mAP, the mutual share and the CPU
    seconds; the best epoch and epochs run of each seed."""
    keyed = frame.assign(row=[f"{int(n)} pairs, {a}" for n, a in zip(frame["train pairs"], frame["arm"])])
    table = mean_table(keyed, "row", ["I->T", "T->I", "val mAP", "best epoch", "epochs run", "steps run",
                                      "query mutual share", "CPU seconds"])
    return table.rename(columns={"row": "size, arm"})


def comparison(n: int) -> str:
    """The name of the paired comparison at `n` training pairs (a row label of `gain_table`)."""
    return f"{REFERENCE} - {CONTROL}, {int(n)} training pairs"


def unconverged(frame: pd.DataFrame) -> list[str]:
    """The runs of `curve_frame` whose best validation epoch is their last (still improving at the cap)."""
    late = frame[~frame["converged"]]
    return [f"{r['arm']} seed {r['seed']} at {r['train pairs']} pairs" for r in late.to_dict("records")]


def gain_table(frame: pd.DataFrame) -> pd.DataFrame:
    """DCMFG minus layers=0 at each size, paired over seeds, per direction: the long paired table (one row per
    size and direction), its comparison named by the size."""
    table = interval_table(frame, arm="arm", reference=REFERENCE, values=list(DIRECTIONS), value_name="measure",
                           group=["train pairs"])
    if table.empty:
        return table
    table["comparison"] = [comparison(n) for n in table["train pairs"]]
    return table


def trend(frame: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Does the paired gain grow with the size? Per seed and direction, the least-squares slope of the gain on
    log2(training pairs) (gain per doubling of the data); the slopes over seeds, with their t interval and a
    verdict: "grows" (interval above 0), "shrinks" (below) or "no detectable trend". Seeds measured at fewer than
    two sizes are left out. A long paired table (comparison, measure, the interval, seeds, verdict): it gets a
    forest plot like the gains."""
    rows = []
    wide = frame.pivot_table(index=["seed", "train pairs"], columns="arm", values=list(DIRECTIONS))
    for d in DIRECTIONS:
        slopes = []
        for seed, part in wide.groupby(level="seed"):
            if (d, REFERENCE) not in part or (d, CONTROL) not in part:
                continue
            gain = (part[(d, REFERENCE)] - part[(d, CONTROL)]).dropna()
            if len(gain) < 2:
                continue
            x = np.log2(gain.index.get_level_values("train pairs").to_numpy(dtype=float))
            slopes.append(float(np.polyfit(x, gain.to_numpy(dtype=float), 1)[0]))
        stats = paired_difference(slopes, np.zeros(len(slopes)), confidence)
        verdict = {BETTER: GROWS, WORSE: SHRINKS, NO_DIFFERENCE: NO_TREND}.get(stats["verdict"], stats["verdict"])
        rows.append({"comparison": TREND, "measure": d, INTERVAL: format_interval(stats), "seeds": stats["n"],
                     "verdict": verdict})
    return pd.DataFrame(rows)


def curve_figure(frame: pd.DataFrame, gains: pd.DataFrame):
    """Three panels against the training size (log scale): query mAP@all of both arms (mean ± std over seeds), the
    paired gain with its 95 % t interval (zero dashed), and the share of queries with a genuine mutual bank
    neighbour (DCMFG)."""
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.6), layout="constrained")
    sizes = sorted(frame["train pairs"].unique())
    markers = {"I->T": "o", "T->I": "s"}
    for arm, colour in ((REFERENCE, "tab:blue"), (CONTROL, "tab:grey")):
        part = frame[frame["arm"] == arm].groupby("train pairs")
        for d in DIRECTIONS:
            m, sd = part[d].mean(), part[d].std().fillna(0)
            axes[0].errorbar(m.index, m, sd, marker=markers[d], color=colour, capsize=3, lw=1.4,
                             ls="-" if d == "I->T" else ":", label=f"{arm} {d}")
    axes[0].set_ylabel("query mAP@all (cosine)")
    axes[0].set_title("both arms", fontsize=10)
    axes[0].legend(fontsize=7.5)
    data = intervals(gains)
    data["train pairs"] = [int(n) for n in gains["train pairs"]]
    offset = {"I->T": 0.97, "T->I": 1.03}  # the two directions side by side at each size
    for d in DIRECTIONS:
        part = data[data["measure"] == d]
        for r in part.to_dict("records"):
            x = r["train pairs"] * offset[d]
            colour = COLOURS.get(r["verdict"], "black")
            if not np.isnan(r["low"]):
                axes[1].plot([x, x], [r["low"], r["high"]], color=colour, lw=2.2)
            axes[1].plot([x], [r["mean"]], markers[d], color=colour, markersize=6)
        axes[1].plot(part["train pairs"] * offset[d], part["mean"], color="black", lw=0.8,
                     ls="-" if d == "I->T" else ":", label=f"{d} (mean)")
    axes[1].axhline(0.0, color="black", ls="--", lw=1.0)
    axes[1].set_ylabel(f"{REFERENCE} minus {CONTROL}, mAP@all")
    axes[1].set_title("paired gain, 95% t interval (colour = verdict)", fontsize=10)
    axes[1].legend(fontsize=7.5)
    share = frame[frame["arm"] == REFERENCE].groupby("train pairs")["query mutual share"]
    axes[2].errorbar(share.mean().index, share.mean(), share.std().fillna(0), marker="o", color="tab:orange", capsize=3)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_ylabel("queries with a mutual bank neighbour")
    axes[2].set_title(f"{REFERENCE}: query mutual share", fontsize=10)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(int(n)) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training pairs")
        ax.grid(alpha=0.3)
    return fig


def curves_by_size_figure(reports: list[dict]):
    """Validation mAP (mean of both directions) against optimizer steps, one panel per size, both arms, one line per
    seed, the selected epoch marked: a run whose dot sits at its line's end was still improving."""
    sizes = sorted({r["train pairs"] for r in reports})
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.4 * len(sizes), 3.1), squeeze=False, sharey=True,
                             layout="constrained")
    colours = {REFERENCE: "tab:blue", CONTROL: "tab:grey"}
    for ax, n in zip(axes[0], sizes):
        for r in (r for r in reports if r["train pairs"] == n):
            hist = [h for h in r.get("history", []) if "val_map_mean" in h]
            if not hist:
                continue
            steps = [h["step"] for h in hist]
            vals = [h["val_map_mean"] for h in hist]
            ax.plot(steps, vals, color=colours.get(r["label"], "black"), lw=1.0, alpha=0.8)
            best = [h for h in hist if h["epoch"] == r["best_epoch"]]
            if best:
                ax.plot([best[0]["step"]], [best[0]["val_map_mean"]], "o", color=colours.get(r["label"], "black"),
                        markersize=4)
        ax.set_title(f"{n} training pairs", fontsize=10)
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation mAP@all (mean)")
    handles = [plt.Line2D([0], [0], color=c, label=a) for a, c in colours.items()]
    fig.legend(handles=handles, loc="outside upper center", ncol=2, fontsize=8.5, frameon=False)
    return fig


def closing_note(gains: pd.DataFrame, slopes: pd.DataFrame, frame: pd.DataFrame) -> str:
    """The chapter's conclusion, every verdict computed from the tables above."""
    lines = []
    for n in sorted(gains["train pairs"].unique()):
        part = gains[gains["comparison"] == comparison(n)]
        bits = "; ".join(f"{r['measure']} {r['verdict']} ({r[INTERVAL]}, {r['seeds']} seeds)"
                         for r in part.to_dict("records"))
        lines.append(f"At {int(n)} training pairs, DCMFG against the same model without graph layers "
                     f"{helps(gains, comparison(n))}: {bits}.")
    if not slopes.empty:
        bits = "; ".join(f"{r['measure']} {r['verdict']} ({r[INTERVAL]} mAP per doubling, "
                         f"{r['seeds']} seeds)" for r in slopes.to_dict("records"))
        lines.append(f"As the training data grow, the gain: {bits}.")
    late = unconverged(frame)
    lines.append(ALL_CONVERGED if not late else
                 f"{len(late)} of {len(frame)} runs ended at their best epoch (still improving): their sizes' gains "
                 f"are not those of converged models.")
    return "\n".join(lines)
