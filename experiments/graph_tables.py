"""Tables of issue 10 from the JSON lines of experiments/graph_runs.py: the controls (paired over seeds, Student-t
95% intervals and computed verdicts from dcmfg.study.tables), the relation switches on VALIDATION mAP (the shipped default
is chosen there), graph statistics and run costs.

    .venv/bin/python experiments/graph_tables.py /tmp/h1/sweep.jsonl [--reference base]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from dcmfg.study.stats import format_interval, paired_difference


def load(paths: list[str]) -> pd.DataFrame:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows).drop_duplicates(["name", "seed"], keep="last")


def arm(df: pd.DataFrame, name: str, col: str) -> pd.Series:
    return df[df["name"] == name].set_index("seed")[col]


def paired(a: pd.Series, b: pd.Series) -> dict:
    common = sorted(set(a.dropna().index) & set(b.dropna().index))
    return {**paired_difference(a[common], b[common]), "seeds": common}


def controls(df: pd.DataFrame, dcmfg: str) -> pd.DataFrame:
    """DCMFG against its controls on the query split, one row per (comparison, direction)."""
    specs = [
        (f"{dcmfg} (bank) - layers=0", (dcmfg, "bank"), ("flat", "bank")),
        (f"{dcmfg} (bank) - same weights, inference none", (dcmfg, "bank"), (dcmfg, "none")),
        (f"{dcmfg} (bank) - linear, loss-matched", (dcmfg, "bank"), ("linear", "bank")),
        ("layers=0 + bank smoothing - layers=0", ("flat", "smooth"), ("flat", "bank")),
        (f"{dcmfg} (smooth, same weights) - {dcmfg} (none)", (dcmfg, "smooth"), (dcmfg, "none")),
    ]
    rows = []
    for label, (a, ma), (b, mb) in specs:
        for d in ("i2t", "t2i"):
            ca, cb = f"map_{d}_{ma}", f"map_{d}_{mb}"
            if ca not in df or cb not in df:
                continue
            r = paired(arm(df, a, ca), arm(df, b, cb))
            if r["n"] == 0:
                continue
            rows.append({"comparison": label, "direction": "I->T" if d == "i2t" else "T->I", "n seeds": r["n"],
                         "difference [95% CI]": format_interval(r), "verdict": r["verdict"]})
    return pd.DataFrame(rows)


def switches(df: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Every arm against the reference on validation mAP (mean of both directions) at each run's best epoch."""
    rows = []
    ref = arm(df, reference, "val_map_mean")
    for name in df["name"].unique():
        cur = arm(df, name, "val_map_mean")
        gq = df[df["name"] == name]
        qms = [r["query_mutual_share"] for r in gq.get("graph_bank", pd.Series(dtype=object)) if isinstance(r, dict) and r.get("query_mutual_share") is not None]
        row = {"arm": name, "n": len(cur), "val mAP (mean)": cur.mean(),
               "query mutual share": sum(qms) / len(qms) if qms else float("nan"),
               "best epoch": ", ".join(str(int(x)) for x in gq["best_epoch"]),
               "CPU s / run": gq["train_cpu_s"].mean(), "wall s / run": gq["train_wall_s"].mean()}
        if name != reference:
            r = paired(cur, ref)
            row[f"- {reference} [95% CI]"] = format_interval(r) if r["n"] else ""
            row["verdict"] = r["verdict"] if r["n"] else ""
        rows.append(row)
    return pd.DataFrame(rows).sort_values("val mAP (mean)", ascending=False)


def graph_stats(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Mean over seeds of the graph statistics: training batches, the bank's own graph, the query step."""
    g = df[df["name"] == name]["graph_bank"].dropna()
    out = {}
    for part in ("train", "bank", "query"):
        out[part] = pd.DataFrame([r[part] for r in g]).mean()
    return pd.DataFrame(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--reference", default="base")
    a = p.parse_args()
    df = load(a.results)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    print("== relation switches, validation mAP@all (mean of I->T and T->I), paired against", a.reference)
    print(switches(df, a.reference).to_string(index=False, float_format="%.4f"))
    print("\n== controls (query split mAP@all)")
    print(controls(df, a.reference).to_string(index=False))
    print(f"\n== graph statistics of {a.reference} (mean over seeds)")
    print(graph_stats(df, a.reference).to_string(float_format="%.3f"))


if __name__ == "__main__":
    main()
