"""Same seed, same numbers, and how far they move when only the order of float sums changes (the reproducibility
appendix, notebooks/11-reproducibility.ipynb).

Two checks:

1. **Bit-exact rerun.** `rerun_check` trains a short run a second time, in a fresh folder, with the config of a run
   the study cached, and `compare_runs` compares the two number by number: every metric of the query report, every
   value of the per-epoch log (timings aside), the selected epoch, the graph statistics and every trained weight.
   CPU training is seeded and float32, so on one machine with the same thread count they agree to the last bit
   (docs/method.md, section 6).
2. **Another summation order, nothing else.** Chapter 5's arms trained again with one setting changed that alters
   the order in which floats are added and nothing else: `train.threads` = 2 instead of the study's 1 (torch splits
   reductions and matrix products between the threads). Split, seed, data order, budget and every other setting stay
   the same. Another CPU changes the last bits of sums the same way; the graph's discrete choices (top-k, the mutual
   test) can turn last-bit differences into other edges, another trajectory and another selected epoch.
   `spread_frame` pairs each arm's two runs seed by seed, `spread_table` sums that up per arm, and `verdict_table`
   recomputes chapter 5's paired verdicts (`dcmfg.study.tables.paired_table`) under both and marks the fragile ones.

Frames are `dcmfg.study.graphstudy.controls_frame` frames: one row per (arm, seed) with query mAP@all per direction
and the selected epoch. Reports are what `dcmfg.study.Study.run` returns.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from dcmfg.engine.train import train
from dcmfg.study.graphstudy import CONTROLS, DIRECTIONS, REFERENCE
from dcmfg.study.tables import NO_INTERVAL, format_interval, paired_table

PERTURBATION = {"train.threads": 2}
# An interval end this close to zero touches it: one unit of the fourth decimal, the precision the tables show.
TOUCH = 1e-4
FRAGILE, STABLE, UNJUDGED = "FRAGILE", "stable", "not judged (one seed: no interval)"
TIMING_KEYS = ("seconds",)  # per-epoch log values that measure time, not what was computed
WEIGHTS = Path("best") / "model.safetensors"


# --------------------------------------------------------------------------------------------- the arms
def select_arms(labels, controls=CONTROLS) -> list[tuple[str, str, dict]]:
    """The (label, model, settings) arms of chapter 5 (`graphstudy.CONTROLS`) named in `labels`, in that order."""
    known = {c[0]: c for c in controls}
    unknown = [x for x in labels if x not in known]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}; chapter 5's arms are: "
                         + ", ".join(known))
    return [known[x] for x in labels]


def run_labels(config, perturbation: dict) -> tuple[str, str]:
    """Short names of the two runs from the changed settings, e.g. ('threads=1', 'threads=2'): the value in the
    study's config (a `dcmfg.config.Config`) and the perturbed one."""
    values = config.to_dict()

    def get(dotted: str):
        node = values
        for part in dotted.split("."):
            node = node[part]
        return node

    name = {k: k.rsplit(".", 1)[-1] for k in perturbation}
    return (", ".join(f"{name[k]}={get(k)}" for k in perturbation),
            ", ".join(f"{name[k]}={v}" for k, v in perturbation.items()))


# --------------------------------------------------------------------------------------------- bit-exact rerun
def flat_numbers(value, prefix: str = "") -> dict[str, float]:
    """Every number in nested dicts and lists, keyed by its path ('records/3/value'); strings, bools and None are
    left out (they name things, they are not computed values)."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flat_numbers(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(flat_numbers(v, f"{prefix}/{i}" if prefix else str(i)))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


def compare_numbers(a: dict[str, float], b: dict[str, float]) -> dict:
    """How many values two flat number dicts hold, how many are identical (a key on one side only is not, NaN
    equals NaN) and the largest absolute difference between values present on both sides."""
    keys = list(dict.fromkeys([*a, *b]))
    same = sum(1 for k in keys if k in a and k in b and (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k]))))
    diffs = [abs(a[k] - b[k]) for k in keys if k in a and k in b and not (math.isnan(a[k]) or math.isnan(b[k]))]
    return {"values": len(keys), "identical": same, "max |difference|": max(diffs, default=0.0)}


def compare_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """compare_numbers for two state dicts, element by element (a tensor on one side only, or of another shape,
    counts all its elements as not identical)."""
    total = same = 0
    largest = 0.0
    for name in dict.fromkeys([*a, *b]):
        x, y = a.get(name), b.get(name)
        if x is None or y is None or x.shape != y.shape:
            total += max(t.numel() for t in (x, y) if t is not None)
            continue
        total += x.numel()
        same += int((x == y).sum())
        if x.numel():
            largest = max(largest, float((x.double() - y.double()).abs().max()))
    return {"values": total, "identical": same, "max |difference|": largest}


def _log(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def compare_runs(first: dict, second: dict, first_weights: dict | None = None, second_weights: dict | None = None):
    """Two reports of the same config (Study.run's shape: report.json plus `history`) compared number by number.

    One row per part: the query report's metrics, the per-epoch log (timings left out), the selected epoch with its
    validation mAP and the epochs run, the graph statistics, and the trained weights when given. Columns: values
    compared, identical, the largest absolute difference and whether the part is bit-identical."""
    parts = [
        ("query metrics (every row of the report)", compare_numbers(flat_numbers(first["records"]),
                                                                    flat_numbers(second["records"]))),
        ("per-epoch log (losses, validation, graph; timings left out)",
         compare_numbers(flat_numbers(_log(first.get("history", []))), flat_numbers(_log(second.get("history", []))))),
        ("selected epoch, its validation mAP, epochs run",
         compare_numbers(flat_numbers({k: first.get(k) for k in ("best_epoch", "best_val", "epochs_run")}),
                         flat_numbers({k: second.get(k) for k in ("best_epoch", "best_val", "epochs_run")}))),
    ]
    if first.get("graph") or second.get("graph"):
        parts.append(("graph statistics (bank and queries)", compare_numbers(flat_numbers(first.get("graph") or {}),
                                                                             flat_numbers(second.get("graph") or {}))))
    if first_weights is not None and second_weights is not None:
        parts.append(("trained weights (every element of the selected checkpoint)",
                      compare_weights(first_weights, second_weights)))
    rows = [{"compared": name, **c, "bit-identical": c["identical"] == c["values"]} for name, c in parts]
    return pd.DataFrame(rows)


def bit_identical(table: pd.DataFrame) -> bool:
    """Whether every part of a compare_runs table is identical (and there was something to compare)."""
    return bool(len(table)) and bool(table["bit-identical"].all()) and int(table["values"].sum()) > 0


def read_run(folder) -> dict:
    """A run folder's report.json with its per-epoch log (metrics.jsonl) as `history` and `run_dir`."""
    folder = Path(folder)
    history = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {**json.loads((folder / "report.json").read_text()), "history": history, "run_dir": str(folder)}


def load_weights(run_dir) -> dict[str, torch.Tensor]:
    """The selected checkpoint's weights of a run folder."""
    return load_file(str(Path(run_dir) / WEIGHTS))


def rerun_check(study, model: str, seed: int, settings: dict | None = None) -> pd.DataFrame:
    """Train `model` on `seed` with `settings` as the study does (the run is cached), train the same config once
    more into a fresh temporary folder, and compare the two (compare_runs, weights included)."""
    first = study.run(model, seed, settings)
    cfg, _ = study.run_dir(model, seed, settings)
    with tempfile.TemporaryDirectory(prefix="dcmfg-rerun-") as tmp:
        out = Path(tmp) / "run"
        train(cfg, out, data=study.bundle(cfg))
        return compare_runs(first, read_run(out), load_weights(first["run_dir"]), load_weights(out))


def rerun_sentence(table: pd.DataFrame, what: str) -> str:
    """What the bit-exact rerun showed, computed from its compare_runs table; `what` names the run."""
    n = int(table["values"].sum())
    if bit_identical(table):
        return (f"The same config trained twice on this machine ({what}): all {n:,} numbers compared, trained weights "
                "included, are identical to the last bit.")
    bad = table[~table["bit-identical"]]
    parts = "; ".join(f"{r['compared']}: {r['values'] - r['identical']:,} of {r['values']:,} differ (largest "
                      f"{r['max |difference|']:.3g})" for r in bad.to_dict("records"))
    return f"The same config trained twice on this machine ({what}) did NOT give the same numbers: {parts}."


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


def fragility(a: dict, b: dict, labels=("study", "perturbed"), tol: float = TOUCH) -> str:
    """The status of one paired verdict measured under two runs (rows of tables.paired_difference): FRAGILE when
    the verdicts differ or an interval end of either run lies within `tol` of zero, stable otherwise, not judged
    when a run has no interval (one seed)."""
    if NO_INTERVAL in (a["verdict"], b["verdict"]):
        return UNJUDGED
    why = []
    if a["verdict"] != b["verdict"]:
        why.append("the verdict differs")
    for row, label in ((a, labels[0]), (b, labels[1])):
        if touches_zero(row["ci_low"], row["ci_high"], tol):
            why.append(f"the {label} interval ends within {tol:g} of zero")
    return f"{FRAGILE}: " + "; ".join(why) if why else STABLE


def paired_numbers(frame: pd.DataFrame, reference: str = REFERENCE, values=DIRECTIONS) -> pd.DataFrame:
    """`reference - arm` per arm and value, paired over seeds (tables.paired_table), numbers kept."""
    return paired_table(frame, arm="arm", reference=reference, values=list(values))


def verdict_table(base: pd.DataFrame, perturbed: pd.DataFrame, labels=("study", "perturbed"),
                  reference: str = REFERENCE, values=DIRECTIONS, tol: float = TOUCH) -> pd.DataFrame:
    """Chapter 5's paired verdicts (reference minus each arm) under the study's runs and under the perturbed ones,
    on the seeds both hold, side by side, with each verdict's status (fragility). When the base frame holds more
    seeds than that (chapter 5's all), a last column gives the verdict on all of them, as chapter 5 published it."""
    a, b = labels
    seeds = sorted(set(base["seed"]) & set(perturbed["seed"]))
    published = {}
    if set(base["seed"]) != set(seeds):
        published = {(r["comparison"], r["value"]): r for r in paired_numbers(base, reference, values).to_dict("records")}
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
        rows.append({"comparison": r["comparison"], "measure": r["value"], "seeds": min(r["n"], q["n"]),
                     f"{a} [95% t interval]": format_interval(r), f"{a} verdict": r["verdict"],
                     f"{b} [95% t interval]": format_interval(q), f"{b} verdict": q["verdict"],
                     "status": fragility(r, q, labels, tol)})
        if published:
            full = published[(r["comparison"], r["value"])]
            rows[-1][f"{a}, all {full['n']} seeds"] = full["verdict"]
    return pd.DataFrame(rows)


def intervals_side_by_side(verdicts: pd.DataFrame, labels=("study", "perturbed")) -> pd.DataFrame:
    """A verdict_table as the long paired table `dcmfg.study.forest.forest_figure` draws: each comparison twice,
    once per run, next to each other."""
    rows = []
    for r in verdicts.to_dict("records"):
        for label in labels:
            rows.append({"comparison": f"{r['comparison']}, {label}", "measure": r["measure"],
                         "difference [95% t interval]": r[f"{label} [95% t interval]"],
                         "seeds": r["seeds"], "verdict": r[f"{label} verdict"]})
    return pd.DataFrame(rows)


def shift_figure(spread: pd.DataFrame, labels=("study", "perturbed"), values=DIRECTIONS):
    """Per-seed query mAP difference (perturbed minus study), one panel per direction, one row per arm, a dot per
    seed (hollow where the selected epoch changed), zero marked."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

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
        ax.set_xlim(-1.2 * span, 1.2 * span)
        ax.set_yticks(range(len(arms)), list(reversed(arms)), fontsize=9)
        ax.set_title(f"{v}: {b} minus {a}", fontsize=10)
        ax.set_xlabel("query mAP@all difference", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([0], [0], marker="o", lw=0, color="tab:blue", label="same selected epoch"),
               Line2D([0], [0], marker="o", lw=0, color="tab:blue", markerfacecolor="white",
                      label="another selected epoch")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def spread_sentences(summary: pd.DataFrame, verdicts: pd.DataFrame, labels=("study", "perturbed"),
                     not_rerun=(), values=DIRECTIONS) -> str:
    """The perturbation's result in words, every number and status computed from spread_table and verdict_table."""
    a, b = labels
    lines = []
    for r in summary.to_dict("records"):
        moves = ", ".join(f"{v} by {r[f'{v} mean difference']:+.4f} on the mean and at most "
                          f"{r[f'{v} max |difference|']:.4f} on one seed" for v in values)
        lines.append(f"{r['arm']} ({b} against {a}, {r['seeds']} seeds): query mAP@all moved {moves}; the selected "
                     f"epoch changed on {r['best epoch changed']} seeds, and {r['seeds unchanged']} seeds gave the "
                     "same numbers.")
    if not_rerun:
        lines.append(f"Not trained again (their runs as the study ran them): {', '.join(not_rerun)}.")
    if not verdicts.empty:
        fragile = verdicts[verdicts["status"].str.startswith(FRAGILE)]
        judged = verdicts[verdicts["status"] != UNJUDGED]
        if judged.empty:
            lines.append("No verdict could be judged: one seed gives no interval.")
        elif fragile.empty:
            lines.append(f"Every one of the {len(judged)} paired verdicts recomputed under {b} is the same as under "
                         f"{a}, and no interval ends within {TOUCH:g} of zero: none is fragile.")
        else:
            lines.append(f"{len(fragile)} of the {len(judged)} paired verdicts recomputed under {b} are FRAGILE: "
                         + "; ".join(f"{r['comparison']}, {r['measure']} ({a}: {r[f'{a} verdict']} "
                                     f"{r[f'{a} [95% t interval]']}; {b}: {r[f'{b} verdict']} "
                                     f"{r[f'{b} [95% t interval]']})" for r in fragile.to_dict("records"))
                         + f". The other {len(judged) - len(fragile)} hold under both.")
    return "\n".join(lines)


def closing_note(rerun: pd.DataFrame, what: str, summary: pd.DataFrame, verdicts: pd.DataFrame,
                 labels=("study", "perturbed"), values=DIRECTIONS) -> str:
    """The appendix's conclusion on reproducibility: the rerun's result and the perturbation's spread quoted, every
    number and word computed from the tables above it."""
    a, b = labels
    exact = bit_identical(rerun)
    lines = [("Same seed, same numbers holds on one machine at one thread count: " if exact else
              "Same seed, same numbers did NOT hold on this machine: ") + rerun_sentence(rerun, what)]
    if not summary.empty:
        moves = "; ".join(f"{r['arm']} by up to " + " and ".join(f"{r[f'{v} max |difference|']:.4f} ({v})" for v in values)
                          + f", its selected epoch changed on {r['best epoch changed']} seeds"
                          for r in summary.to_dict("records"))
        still = all(r[f"{v} max |difference|"] == 0 for r in summary.to_dict("records") for v in values) and all(
            r["best epoch changed"].startswith("0 ") for r in summary.to_dict("records"))
        if still:
            lines.append(f"It also held with {b} instead of {a}: no arm's query mAP@all or selected epoch moved on any "
                         "seed.")
        else:
            lines.append(f"It does not hold across summation orders: with {b} instead of {a} (nothing else changed) "
                         f"query mAP@all moved per seed: {moves}. Another CPU changes the last bits of float sums in "
                         "the same way, so numbers from another machine are expected to differ by about this much.")
    if not verdicts.empty:
        judged = verdicts[verdicts["status"] != UNJUDGED]
        fragile = verdicts[verdicts["status"].str.startswith(FRAGILE)]
        if judged.empty:
            lines.append("No paired verdict could be judged for fragility (one seed: no interval).")
        elif fragile.empty:
            lines.append(f"None of the {len(judged)} paired verdicts recomputed is fragile: each is the same under both "
                         f"runs and no interval ends within {TOUCH:g} of zero.")
        else:
            lines.append(f"{len(fragile)} of the {len(judged)} paired verdicts recomputed are FRAGILE (read them as not "
                         "settled by these seeds): " + "; ".join(f"{r['comparison']}, {r['measure']}"
                                                                 for r in fragile.to_dict("records")) + ".")
    return "\n".join(lines)
