"""Forest plots of paired differences: one row a comparison, its mean paired difference with the 95% Student-t
interval, zero marked, each point coloured by its computed verdict (the legend names the verdicts).

The plot reads a paired table as the page shows it, so the figure and the table beside it say the same thing:

- long tables (`dcmfg.study.tables.headline_pairs`, `dcmfg.study.graphstudy.paired_against`): one row per
  comparison and measure, the interval in "difference [95% t interval]", the measure in `direction` or `measure`,
  optionally a `distance`;
- wide tables (`graphstudy.versus`, `graphstudy.switch_table`): one row per variant, for each value column X an
  "X: variant - REF [95% t interval]" and an "X verdict" column.

An interval cell reads "+0.0123 [-0.0040, +0.0286]" (`tables.format_interval`); a single seed gives the mean alone
and the verdict "one seed: no interval", drawn as a point without a bar. The verdict is the table's own, computed
from the interval; nothing here decides one.
"""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import HTML, display
from matplotlib.lines import Line2D

from dcmfg.study.display import show_figure
from dcmfg.study.page import details_html, prose, table_html
from dcmfg.study.stats import BETTER, GROWS, NO_DIFFERENCE, NO_INTERVAL, NO_TREND, SHRINKS, WORSE
from dcmfg.study.tables import INTERVAL as LONG_INTERVAL
_WIDE_INTERVAL = re.compile(r"^(?P<measure>.+): variant - (?P<reference>.+) \[95% t interval\]$")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?nan|[+-]?inf"
_CELL = re.compile(rf"^\s*(?P<mean>{_NUMBER})\s*(?:\[\s*(?P<low>{_NUMBER})\s*,\s*(?P<high>{_NUMBER})\s*\])?\s*$")

COLOURS = {BETTER: "#1a9850", WORSE: "#d73027", NO_DIFFERENCE: "#4575b4", NO_INTERVAL: "#7f7f7f",
           GROWS: "#1a9850", SHRINKS: "#d73027", NO_TREND: "#4575b4"}
MEANING = {BETTER: "the whole interval above 0", WORSE: "the whole interval below 0",
           NO_DIFFERENCE: "the interval contains 0", NO_INTERVAL: "",
           GROWS: "the whole interval above 0", SHRINKS: "the whole interval below 0", NO_TREND: "the interval contains 0"}


def parse_interval(cell) -> tuple[float, float, float]:
    """(mean, low, high) of an interval cell; low and high are NaN when the cell holds the mean alone."""
    m = _CELL.match(str(cell))
    if m is None:
        raise ValueError(f"not an interval cell: {cell!r} (expected '+0.0123 [-0.0040, +0.0286]' or '+0.0123')")
    low, high = (float(m["low"]), float(m["high"])) if m["low"] is not None else (np.nan, np.nan)
    return float(m["mean"]), low, high


def is_paired(table: pd.DataFrame) -> bool:
    """Whether a table holds paired differences with t intervals (it gets a forest plot)."""
    return LONG_INTERVAL in table.columns or any(_WIDE_INTERVAL.match(str(c)) for c in table.columns)


def intervals(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (comparison, measure) of a paired table: label, measure, interval (the cell as shown), verdict,
    seeds, and the interval's mean, low and high as numbers.
    Rows without an interval cell (the reference row of a wide table) are left out."""
    rows = []
    if LONG_INTERVAL in table.columns:
        measure = next((c for c in ("direction", "measure", "value") if c in table.columns), None)
        for r in table.to_dict("records"):
            label = r["comparison"] + (f" ({r['distance']})" if "distance" in r else "")
            rows.append({"label": label, "measure": r[measure] if measure else "", "cell": r[LONG_INTERVAL],
                         "verdict": r["verdict"], "seeds": r.get("seeds")})
    else:
        wide = [(c, _WIDE_INTERVAL.match(str(c))) for c in table.columns]
        name = table.columns[0]
        for col, m in ((c, m) for c, m in wide if m):
            measure = m["measure"]
            for r in table.to_dict("records"):
                if not isinstance(r[col], str):  # the reference row: nothing to pair
                    continue
                rows.append({"label": f"{r[name]} - {m['reference']}", "measure": measure, "cell": r[col],
                             "verdict": r[f"{measure} verdict"], "seeds": r.get("seeds")})
    if not rows:
        return pd.DataFrame(columns=["label", "measure", "interval", "verdict", "seeds", "mean", "low", "high"])
    out = pd.DataFrame(rows)
    out[["mean", "low", "high"]] = [parse_interval(c) for c in out["cell"]]
    return out.rename(columns={"cell": "interval"})


def verdict_sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per comparison of a paired table, with the table's computed verdict of each measure:
    "dcmfg - linear (cosine): I->T better (+0.0123 [+0.0040, +0.0206], 5 seeds); T->I no detectable difference (...)"."""
    data = intervals(table)
    out = []
    for label, part in data.groupby("label", sort=False):
        bits = [f"{r['measure']} {r['verdict']} ({r['interval']}"
                + (f", {int(r['seeds'])} seed{'s' if int(r['seeds']) != 1 else ''})" if pd.notna(r["seeds"]) else ")") for r in part.to_dict("records")]
        out.append(f"{label}: " + "; ".join(bits) + ".")
    return out


def short_labels(labels) -> list[str]:
    """Row labels without the side every comparison shares ("DCMFG - layers=0", "DCMFG - linear" -> "layers=0",
    "linear"; "static - default", "csls - default" -> "static", "csls"): the axis label names it once."""
    labels = [str(x) for x in labels]
    pairs = [x.split(" - ", 1) if " - " in x else None for x in labels]
    if len(labels) < 2 or any(p is None for p in pairs):
        return labels
    left = {p[0] for p in pairs}
    right = {re.sub(r" \([^)]*\)$", "", p[1]) for p in pairs}  # "linear (cosine)": the distance stays on the row
    if len(left) == 1:
        return [p[1] for p in pairs]
    if len(right) == 1:
        ref = right.pop()
        return [p[0] + p[1][len(ref):] for p in pairs]
    return labels


def forest_figure(table: pd.DataFrame, xlabel: str, width: float = 8.0):
    """The forest plot of a paired table: one panel per measure (e.g. I->T, T->I), one row per comparison (the side
    all comparisons share is left to `xlabel`, e.g. "DCMFG minus the arm"), the mean as a dot and the interval as a
    bar, a dashed line at zero; the legend names each verdict shown."""
    data = intervals(table)
    if data.empty:
        raise ValueError("the table holds no paired difference to plot")
    data["label"] = short_labels(data["label"])
    measures = list(dict.fromkeys(data["measure"]))
    labels = list(dict.fromkeys(data["label"]))
    height = 1.6 + 0.34 * len(labels)
    fig, axes = plt.subplots(1, len(measures), figsize=(width, height), squeeze=False, sharey=True, sharex=True,
                             layout="constrained")
    ys = {label: len(labels) - 1 - i for i, label in enumerate(labels)}  # the table's first row on top
    span = np.nanmax(np.abs(data[["low", "high", "mean"]].to_numpy(dtype=float)))
    span = 1.15 * span if np.isfinite(span) and span > 0 else 1e-3
    for ax, measure in zip(axes[0], measures):
        for r in data[data["measure"] == measure].to_dict("records"):
            colour = COLOURS.get(r["verdict"], "#000000")
            y = ys[r["label"]]
            if not np.isnan(r["low"]):
                ax.plot([r["low"], r["high"]], [y, y], color=colour, lw=2.2, solid_capstyle="butt")
            ax.plot([r["mean"]], [y], "o", color=colour, markersize=6.5,
                    markerfacecolor=colour if r["verdict"] != NO_INTERVAL else "white", markeredgewidth=1.6)
        ax.axvline(0.0, color="black", lw=1.0, ls="--", zorder=0)
        ax.set_title(str(measure), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8.5)
    # one scale for every panel, zero in the middle: the side of each bar and the sizes compare at a glance
    fig.supxlabel(xlabel, fontsize=9)
    axes[0][0].set_xlim(-span, span)
    axes[0][0].set_yticks(list(ys.values()), list(ys.keys()), fontsize=9)
    axes[0][0].set_ylim(-0.6, len(labels) - 0.4)
    shown = [v for v in (BETTER, NO_DIFFERENCE, WORSE, GROWS, NO_TREND, SHRINKS, NO_INTERVAL) if v in set(data["verdict"])]
    shown += sorted(set(data["verdict"]) - set(shown))
    handles = [Line2D([0], [0], color=COLOURS.get(v, "#000000"), marker="o", lw=2.2,
                      markerfacecolor=COLOURS.get(v, "#000000") if v != NO_INTERVAL else "white",
                      label=f"{v} ({MEANING[v]})" if MEANING.get(v) else v) for v in shown]
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 2), fontsize=8.5, frameon=False,
               title="verdict", title_fontsize=9)
    return fig


def show_paired(table: pd.DataFrame, caption: str, xlabel: str, name: str, summary: str = "") -> None:
    """Show a paired table as its forest plot with the table beside it, collapsed under `summary`.

    caption: the table's caption (protocol, seeds); the figure's caption says what to look at and names the table.
    name: the figure's id on the page (unique per page)."""
    if table.empty:
        prose("No paired difference could be computed: " + caption)
        return
    show_figure(forest_figure(table, xlabel),
                "Paired differences: each dot is the mean difference over split seeds, the bar its 95% Student-t "
                "interval, the dashed line zero; the colour is the verdict computed from the interval (legend). Look "
                "at which side of zero each bar lies: a bar across the line is no detectable difference. "
                + caption, name=f"forest-{name}")
    # an interval reads as one unit: the cells wrap between words, never inside "+0.0123 [-0.0040, +0.0286]"
    shown = table.copy()
    for col in [c for c in shown.columns if c == LONG_INTERVAL or _WIDE_INTERVAL.match(str(c))]:
        shown[col] = shown[col].map(lambda v: v.replace(" ", "\u00a0") if isinstance(v, str) else v)
    display(HTML(details_html(summary or "The table of these differences (each interval as numbers)",
                              table_html(shown, caption, css_class="dcmfg-table dcmfg-paired-table"),
                              css_class="dcmfg-details dcmfg-paired")))
