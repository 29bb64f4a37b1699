"""How far the book's numbers move when only the order of float sums changes, and which of chapter 5's verdicts
that leaves fragile (the reproducibility appendix, notebooks/11-reproducibility.ipynb).

Chapter 5's arms are trained again with one run setting changed that alters the order in which floats are added and
nothing else: `train.threads` = 2 instead of the study's 1 (torch splits reductions and matrix products between the
threads). Split, seed, data order, budget and every other setting stay the same. Another CPU changes the last bits of
sums the same way; the graph's discrete choices (top-k, the mutual test) can turn last-bit differences into other
edges, another trajectory and another selected epoch. `spread_frame` pairs each arm's two runs seed by seed,
`spread_table` sums that up per arm, and `verdict_table` recomputes chapter 5's paired verdicts
(`dcmfg.study.tables.paired_table`) under both and marks the fragile ones. What holds without the perturbation (the
same run twice: the same numbers) is `dcmfg.study.bitexact`.

Frames are `dcmfg.study.graphstudy.controls_frame` frames: one row per (arm, seed) with query mAP@all per direction
and the selected epoch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dcmfg.config import get_dotted
from dcmfg.study.bitexact import bit_identical, rerun_sentence
from dcmfg.study.graphstudy import CONTROLS, DIRECTIONS, REFERENCE
from dcmfg.study.tables import NO_INTERVAL, format_interval, paired_table

PERTURBATION = {"train.threads": 2}
# An interval end this close to zero touches it: one unit of the fourth decimal, the precision the tables show.
TOUCH = 1e-4
FRAGILE, STABLE, UNJUDGED = "FRAGILE", "stable", "not judged (one seed)"


# --------------------------------------------------------------------------------------------- the arms
def select_arms(labels, controls=CONTROLS) -> list[tuple[str, str, dict]]:
    """The (label, model, settings) arms of chapter 5 (`graphstudy.CONTROLS`) named in `labels`, in that order."""
    known = {c[0]: c for c in controls}
    unknown = [x for x in labels if x not in known]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}; chapter 5's arms are: "
                         + ", ".join(known))
    return [known[x] for x in labels]


def perturbed_runs(study, arms, seeds, settings: dict) -> list[dict]:
    """`study.runs(arms, seeds, settings)`, with the runs still missing trained first, one after the other in this
    process: a run of the perturbation may use more than one thread (train.threads = 2 takes both cores of a
    2-core machine), and the study's pool, one worker per core, would ask for more threads than there are cores."""
    for _, model, extra in arms:
        for seed in seeds:
            study.run(model, int(seed), {**settings, **extra})
    return study.runs(arms, seeds=seeds, settings=settings)


def run_labels(config, perturbation: dict) -> tuple[str, str]:
    """Short names of the two runs from the changed settings, e.g. ('threads=1', 'threads=2'): the value in the
    study's config (a `dcmfg.config.Config`) and the perturbed one."""
    values = config.to_dict()
    name = {k: k.rsplit(".", 1)[-1] for k in perturbation}
    return (", ".join(f"{name[k]}={get_dotted(values, k)}" for k in perturbation),
            ", ".join(f"{name[k]}={v}" for k, v in perturbation.items()))


# --------------------------------------------------------------------------------------------- the perturbation
def with_unperturbed(perturbed: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """The perturbed frame completed by the base rows of the arms that were not trained again, on the perturbed
    frame's seeds: the paired verdicts then hold the rerun arms against the others as the study ran them."""
    seeds = set(perturbed["seed"])
    rest = base[~base["arm"].isin(set(perturbed["arm"])) & base["seed"].isin(seeds)]
    return pd.concat([perturbed, rest], ignore_index=True)


def spread_frame(base: pd.DataFrame, perturbed: pd.DataFrame, labels=("study", "perturbed"),
                 values=DIRECTIONS) -> pd.DataFrame:
    """One row per (arm, seed) measured under both: the selected epoch and the query mAP of each run, and the
    difference perturbed minus study per value column. Arms in the base frame's order."""
    a, b = labels
    both = base.merge(perturbed, on=["arm", "seed"], suffixes=("_a", "_b"), sort=False)
    order = {arm: i for i, arm in enumerate(dict.fromkeys(base["arm"]))}
    both = both.sort_values(["arm", "seed"], key=lambda c: c.map(order) if c.name == "arm" else c, kind="stable")
    out = pd.DataFrame({"arm": both["arm"], "seed": both["seed"],
                        f"best epoch, {a}": both["best epoch_a"], f"best epoch, {b}": both["best epoch_b"]})
    for v in values:
        out[f"{v}, {a}"] = both[f"{v}_a"]
        out[f"{v}, {b}"] = both[f"{v}_b"]
        out[f"{v} difference"] = both[f"{v}_b"] - both[f"{v}_a"]
    return out.reset_index(drop=True)


def spread_table(spread: pd.DataFrame, labels=("study", "perturbed"), values=DIRECTIONS) -> pd.DataFrame:
    """Per arm of a spread_frame: the seeds, on how many the selected epoch changed, the seeds whose numbers did not
    move at all, and per value the mean difference (= how far the mean over seeds moved) and the largest absolute
    difference of one seed."""
    a, b = labels
    rows = []
    for arm, part in spread.groupby("arm", sort=False):
        moved = int((part[f"best epoch, {a}"] != part[f"best epoch, {b}"]).sum())
        still = (part[[f"{v} difference" for v in values]] == 0).all(axis=1) & (
            part[f"best epoch, {a}"] == part[f"best epoch, {b}"])
        row = {"arm": arm, "seeds": len(part), "best epoch changed": f"{moved} of {len(part)}",
               "seeds unchanged": f"{int(still.sum())} of {len(part)}"}
        for v in values:
            d = part[f"{v} difference"]
            row[f"{v} mean difference"] = float(d.mean())
            row[f"{v} max |difference|"] = float(d.abs().max())
        rows.append(row)
    return pd.DataFrame(rows)


def touches_zero(low: float, high: float, tol: float = TOUCH) -> bool:
    """Whether an interval end lies within `tol` of zero (a NaN interval does not touch anything)."""
    if math.isnan(low) or math.isnan(high):
        return False
    return min(abs(low), abs(high)) <= tol


def fragility_reasons(a: dict, b: dict, labels=("study", "perturbed"), tol: float = TOUCH) -> list[str]:
    """Why one paired verdict measured under two runs (rows of tables.paired_difference) is fragile: the verdicts
    differ, or an end of either run's interval lies within `tol` of zero. Empty: it is not."""
    why = ["the verdicts differ"] if a["verdict"] != b["verdict"] else []
    for row, label in ((a, labels[0]), (b, labels[1])):
        if touches_zero(row["ci_low"], row["ci_high"], tol):
            why.append(f"the {label} interval ends within {tol:g} of zero")
    return why


def fragility(a: dict, b: dict, labels=("study", "perturbed"), tol: float = TOUCH) -> str:
    """FRAGILE (fragility_reasons gives a reason), stable, or not judged when a run has no interval (one seed)."""
    if NO_INTERVAL in (a["verdict"], b["verdict"]):
        return UNJUDGED
    return FRAGILE if fragility_reasons(a, b, labels, tol) else STABLE


def paired_numbers(frame: pd.DataFrame, reference: str = REFERENCE, values=DIRECTIONS) -> pd.DataFrame:
    """`reference - arm` per arm and value, paired over seeds (tables.paired_table), numbers kept."""
    return paired_table(frame, arm="arm", reference=reference, values=list(values))


def verdict_table(base: pd.DataFrame, perturbed: pd.DataFrame, labels=("study", "perturbed"),
                  reference: str = REFERENCE, values=DIRECTIONS, tol: float = TOUCH) -> pd.DataFrame:
    """Chapter 5's paired verdicts (reference minus each arm) under the study's runs and under the perturbed ones,
    on the seeds both hold, side by side: per run 'RUN [95% t interval]' and 'RUN verdict', then the status
    (fragility) and why. When the base frame holds more seeds than that (chapter 5's all), the verdict on all of
    them comes too, as chapter 5 published it ('RUN, all N seeds ...'), for reference: the status compares the two
    runs on the same seeds."""
    a, b = labels
    seeds = sorted(set(base["seed"]) & set(perturbed["seed"]))
    published = {}
    if set(base["seed"]) != set(seeds):
        published = {(r["comparison"], r["value"]): r
                     for r in paired_numbers(base, reference, values).to_dict("records")}
    pa = paired_numbers(base[base["seed"].isin(seeds)], reference, values)
    pb = paired_numbers(perturbed[perturbed["seed"].isin(seeds)], reference, values)
    if pa.empty or pb.empty:
        return pd.DataFrame()
    rows = []
    other = {(r["comparison"], r["value"]): r for r in pb.to_dict("records")}
    for r in pa.to_dict("records"):
        q = other.get((r["comparison"], r["value"]))
        if q is None:
            continue
        row = {"comparison": r["comparison"], "measure": r["value"], "seeds": min(r["n"], q["n"])}
        runs = [(a, r), (b, q)]
        if published:
            full = published[(r["comparison"], r["value"])]
            runs.insert(0, (f"{a}, all {full['n']} seeds", full))
        for name, x in runs:
            row[f"{name} [95% t interval]"] = format_interval(x)
            row[f"{name} verdict"] = x["verdict"]
        row["status"] = fragility(r, q, labels, tol)
        row["why"] = "; ".join(fragility_reasons(r, q, labels, tol)) if row["status"] == FRAGILE else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _runs(verdicts: pd.DataFrame) -> list[str]:
    return [c.removesuffix(" verdict") for c in verdicts.columns if c.endswith(" verdict")]


def status_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """A verdict_table as the page shows it beside its forest plot: the verdict words of each run and the status."""
    return verdicts[["comparison", "measure", *[f"{run} verdict" for run in _runs(verdicts)], "status"]]


def intervals_side_by_side(verdicts: pd.DataFrame) -> pd.DataFrame:
    """A verdict_table as the long paired table `dcmfg.study.forest` draws: each comparison once per run (chapter
    5's own on all seeds first when present), next to each other."""
    rows = []
    for r in verdicts.to_dict("records"):
        for run in _runs(verdicts):
            rows.append({"comparison": f"{r['comparison']}, {run}", "measure": r["measure"],
                         "difference [95% t interval]": r[f"{run} [95% t interval]"],
                         "seeds": int(run.rsplit(" ", 2)[-2]) if run.endswith(" seeds") else r["seeds"],
                         "verdict": r[f"{run} verdict"]})
    return pd.DataFrame(rows)


def shift_figure(spread: pd.DataFrame, labels=("study", "perturbed"), values=DIRECTIONS):
    """Per-seed query mAP difference (perturbed minus study), one panel per direction, one row per arm, a dot per
    seed (hollow where the selected epoch changed), zero marked."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    a, b = labels
    arms = list(dict.fromkeys(spread["arm"]))
    fig, axes = plt.subplots(1, len(values), figsize=(9.0, 1.4 + 0.45 * len(arms)), squeeze=False, sharey=True)
    moved = spread[f"best epoch, {a}"] != spread[f"best epoch, {b}"]
    for ax, v in zip(axes[0], values):
        for y, arm in enumerate(reversed(arms)):
            part = spread["arm"] == arm
            for hollow in (False, True):
                sel = part & (moved == hollow)
                ax.plot(spread.loc[sel, f"{v} difference"], [y] * int(sel.sum()), "o", color="tab:blue", alpha=0.8,
                        markerfacecolor="white" if hollow else "tab:blue", markersize=6.5)
        ax.axvline(0.0, color="black", lw=1.0, ls="--", zorder=0)
        span = float(np.nanmax(np.abs(spread[f"{v} difference"].to_numpy(dtype=float)), initial=0.0))
        span = span if span > 0 else 1e-4
        ax.set_xlim(-1.2 * span, 1.2 * span)  # zero in the middle, each direction on its own scale
        ax.xaxis.set_major_locator(MaxNLocator(5, symmetric=True))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
        ax.set_yticks(range(len(arms)), list(reversed(arms)), fontsize=9)
        ax.set_ylim(-0.6, len(arms) - 0.4)
        ax.set_title(f"{v}: {b} minus {a}", fontsize=10)
        ax.set_xlabel("query mAP@all difference", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([0], [0], marker="o", lw=0, color="tab:blue", label="same selected epoch"),
               Line2D([0], [0], marker="o", lw=0, color="tab:blue", markerfacecolor="white",
                      label="another selected epoch")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def shift_text(x: float, signed: bool = False) -> str:
    """A difference as the prose and tables show it: '0' when exactly zero, four decimals from 0.0001 up, else one
    significant digit ('3e-06'): a last-bit move is not shown as a change of 0.0000."""
    if x == 0:
        return "0"
    if abs(x) >= 5e-5:
        return f"{x:+.4f}" if signed else f"{x:.4f}"
    return f"{x:+.0e}" if signed else f"{x:.0e}"


def shown(frame: pd.DataFrame) -> pd.DataFrame:
    """A spread_frame or spread_table with its difference columns as shift_text (signed, the largest unsigned)."""
    out = frame.copy()
    for col in out.columns:
        if col.endswith("|difference|"):
            out[col] = [shift_text(x) for x in out[col]]
        elif col.endswith("difference"):
            out[col] = [shift_text(x, signed=True) for x in out[col]]
    return out


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _moves(r: dict, values) -> str:
    return (" and ".join(f"{shift_text(r[f'{v} max |difference|'])} ({v})" for v in values)
            + " on one seed, the mean by "
            + " and ".join(shift_text(r[f"{v} mean difference"], signed=True) for v in values)
            + f"; its selected epoch changed on {r['best epoch changed']} {'seed' if r['seeds'] == 1 else 'seeds'}")


def _fragile_sentence(verdicts: pd.DataFrame, labels, detail: bool) -> str:
    a, b = labels
    judged = verdicts[verdicts["status"] != UNJUDGED]
    fragile = verdicts[verdicts["status"] == FRAGILE]
    if judged.empty:
        return "No paired verdict could be judged for fragility: one seed gives no interval."
    if fragile.empty:
        return (f"None of the {len(judged)} paired verdicts recomputed is fragile: each is the same under {a} and {b}, "
                f"and no interval ends within {TOUCH:g} of zero.")
    if detail:
        named = "; ".join(f"{r['comparison']}, {r['measure']} ({a}: {r[f'{a} verdict']} {r[f'{a} [95% t interval]']}; "
                          f"{b}: {r[f'{b} verdict']} {r[f'{b} [95% t interval]']}: {r['why']})"
                          for r in fragile.to_dict("records"))
    else:
        named = "; ".join(f"{r['comparison']}, {r['measure']}" for r in fragile.to_dict("records"))
    rest = len(judged) - len(fragile)
    return (f"{len(fragile)} of the {len(judged)} paired verdicts recomputed {'is' if len(fragile) == 1 else 'are'} "
            f"FRAGILE: {named}."
            + (f" The other {rest} hold under both runs." if rest else ""))


def spread_sentences(summary: pd.DataFrame, verdicts: pd.DataFrame, labels=("study", "perturbed"),
                     not_rerun=(), values=DIRECTIONS) -> str:
    """The perturbation's result in words, every number and status computed from spread_table and verdict_table."""
    a, b = labels
    lines = []
    if not summary.empty:
        n = int(summary["seeds"].max())
        lines.append(f"With {b} instead of {a}, nothing else changed ({_seeds(n)}), query mAP@all moved as follows.")
        lines += [f"{r['arm']}: by up to {_moves(r, values)}." for r in summary.to_dict("records")]
    if not_rerun:
        lines.append(f"Not trained again (the study's runs enter both sides): {', '.join(not_rerun)}.")
    if not verdicts.empty:
        lines.append(_fragile_sentence(verdicts, labels, detail=True))
    return "\n".join(lines)


def closing_note(rerun: pd.DataFrame, what: str, summary: pd.DataFrame, verdicts: pd.DataFrame,
                 labels=("study", "perturbed"), values=DIRECTIONS) -> str:
    """The appendix's conclusion on reproducibility: the rerun's result and the perturbation's spread quoted, every
    number and word computed from the tables above it."""
    a, b = labels
    n = int(rerun["values"].sum())
    if bit_identical(rerun):
        lines = [f"Same seed, same numbers holds on one machine: the same run ({what}) trained twice gave the same "
                 f"{n:,} numbers, trained weights included, to the last bit."]
    else:
        lines = ["Same seed, same numbers did NOT hold on this machine: " + rerun_sentence(rerun, what)]
    if not summary.empty:
        records = summary.to_dict("records")
        still = all(r[f"{v} max |difference|"] == 0 for r in records for v in values) and all(
            r["best epoch changed"].startswith("0 ") for r in records)
        if still:
            lines.append(f"It also held with {b} instead of {a}: no arm's query mAP@all or selected epoch moved.")
        else:
            def largest(r):
                return max(r[f"{v} max |difference|"] for v in values)

            first, *rest = sorted(records, key=largest, reverse=True)
            others = (f"; the other arms by at most {shift_text(largest(rest[0]))} ({rest[0]['arm']})" if rest else "")
            lines.append(f"It does not hold across summation orders. With {b} instead of {a}, nothing else changed, "
                         f"query mAP@all moved most for {first['arm']}: by up to {_moves(first, values)}{others}. "
                         "Another CPU changes the last bits of float sums in the same way, so numbers rebuilt on "
                         "another machine can be expected to differ by about as much.")
    if not verdicts.empty:
        lines.append(_fragile_sentence(verdicts, labels, detail=False))
    return "\n".join(lines)
