"""Tables of the book: run reports, data and features, benchmark metrics, and paired comparisons over split seeds.

Each function takes results (run reports, a dataset, feature tensors, metric records) and returns a pandas frame the
notebooks show with `dcmfg.study.show_table`. The statistics behind the 'mean ± std' cells and the paired
differences (Student-t intervals, computed verdicts) are `dcmfg.study.stats`; they are re-exported here.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dcmfg.data.splits import load_split
from dcmfg.fileio import file_sha256
from dcmfg.metrics import mean_average_precision
# the statistics stay reachable as `report.<name>` (`from dcmfg.study import tables as report`)
from dcmfg.study.stats import (BETTER, NO_DIFFERENCE, NO_INTERVAL, WORSE, format_interval,  # noqa: F401
                               format_mean_std, mean_std, paired_difference, t_critical)

INTERVAL = "difference [95% t interval]"


# ---------------------------------------------------------------------------------------------- paired tables


def paired_table(frame: pd.DataFrame, *, arm: str, reference: str, values: Iterable[str], pair: str = "seed",
                 group: Sequence[str] = (), confidence: float = 0.95) -> pd.DataFrame:
    """Paired differences `reference - other` for every other arm of column `arm`, per value column and group.

    frame: one row per (arm, pair[, group]) with the value columns. Pairs missing on either side are dropped
    (and the row's n says how many remained). Returns one row per (group..., other arm, value column).
    """
    rows = []
    group = list(group)
    keys = group + [pair]
    for gkey, part in (frame.groupby(group, sort=False) if group else [((), frame)]):
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        ref = part[part[arm] == reference].set_index(keys)
        for other, opart in part[part[arm] != reference].groupby(arm, sort=False):
            oth = opart.set_index(keys)
            common = ref.index.intersection(oth.index)
            for col in values:
                stats = paired_difference(ref.loc[common, col], oth.loc[common, col], confidence)
                rows.append({**dict(zip(group, gkey)), "comparison": f"{reference} - {other}", "value": col, **stats})
    return pd.DataFrame(rows)


def interval_table(frame: pd.DataFrame, *, arm: str, reference: str, values: Iterable[str], value_name: str,
                   group: Sequence[str] = (), confidence: float = 0.95) -> pd.DataFrame:
    """`paired_table` as the book shows it: comparison, the group columns, the value column (named `value_name`),
    the difference with its interval ('+0.0123 [-0.0040, +0.0286]'), the number of seeds and the verdict."""
    table = paired_table(frame, arm=arm, reference=reference, values=values, group=group, confidence=confidence)
    if table.empty:
        return table
    table[INTERVAL] = [format_interval(r) for r in table.to_dict("records")]
    return table.rename(columns={"value": value_name, "n": "seeds"})[
        ["comparison", *group, value_name, INTERVAL, "seeds", "verdict"]]


# ---------------------------------------------------------------------------------------------- run tables
# `reports` below are what dcmfg.study.Study.run returns: report.json plus label, model, seed, history, seconds.

def runs_frame(reports: list[dict]) -> pd.DataFrame:
    """One row per training run: headline mAP@all per direction (the model's own distance), both distances when
    the model has a hash head, the selected epoch against the epochs run, and the cost."""
    rows = []
    for r in reports:
        summ = r["summaries"]
        rows.append({
            "model": r.get("label", r["model"]), "seed": r["seed"], "distance": r["distance"],
            "I->T": r["map_i2t"], "T->I": r["map_t2i"],
            "cosine I->T": summ.get("cosine", {}).get("map_i2t"), "cosine T->I": summ.get("cosine", {}).get("map_t2i"),
            "hamming I->T": summ.get("hamming", {}).get("map_i2t"), "hamming T->I": summ.get("hamming", {}).get("map_t2i"),
            "best epoch": r["best_epoch"], "epochs run": len(r.get("history", [])), "val mAP": r["best_val"],
            "seconds": r.get("seconds"), "CPU seconds": r.get("cpu_seconds"),
        })
    return pd.DataFrame(rows)


# What a page says when no run of it is in `unconverged` (chapters 3, 5 and 5b).
ALL_CONVERGED = "Every run’s best validation epoch comes before its last: none was still improving when it ended."


def unconverged(reports: list[dict]) -> list[str]:
    """Runs whose best validation epoch is their last one (still improving when the budget ended)."""
    out = []
    for r in reports:
        hist = r.get("history", [])
        stopped_early = r["best_epoch"] < len(hist)
        if not stopped_early:
            out.append(f"{r.get('label', r['model'])} seed {r['seed']} (best epoch {r['best_epoch']} of {len(hist)})")
    return out


def curves_frame(reports: list[dict]) -> pd.DataFrame:
    """Validation curves: one row per run and validated epoch (train.val_every): loss, val mAP per direction, whether
    it is the best epoch."""
    rows = []
    for r in reports:
        for h in (h for h in r.get("history", []) if "val_map_i2t" in h):
            rows.append({"model": r.get("label", r["model"]), "seed": r["seed"], "epoch": h["epoch"], "loss": h.get("loss"),
                         "val mAP I->T": h["val_map_i2t"], "val mAP T->I": h["val_map_t2i"],
                         "best": h["epoch"] == r["best_epoch"]})
    return pd.DataFrame(rows)


def records_frame(reports: list[dict]) -> pd.DataFrame:
    """Every metric row of every run's report (metric, k, variant, distance, direction, value) with model and seed."""
    frames = []
    for r in reports:
        f = pd.DataFrame(r["records"])
        f.insert(0, "seed", r["seed"])
        f.insert(0, "model", r.get("label", r["model"]))
        frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def mean_std_wide(frame: pd.DataFrame, index: list[str], column: str = "direction", value: str = "value") -> pd.DataFrame:
    """'mean ± std' over seeds, one row per `index` combination, one column per value of `column`."""
    cell = frame.groupby(index + [column], sort=False, dropna=False)[value].agg(mean_std)
    return cell.unstack(column).reset_index()


def headline_pairs(reports: list[dict], reference: str, confidence: float = 0.95) -> pd.DataFrame:
    """Paired mAP@all differences `reference - other` per direction and shared distance, with t intervals."""
    rows = []
    for r in reports:
        for dist, summ in r["summaries"].items():
            rows.append({"model": r.get("label", r["model"]), "seed": r["seed"], "distance": dist,
                         "I->T": summ["map_i2t"], "T->I": summ["map_t2i"]})
    frame = pd.DataFrame(rows)
    if frame.empty or reference not in set(frame["model"]):
        return pd.DataFrame()
    return interval_table(frame, arm="model", reference=reference, values=["I->T", "T->I"], value_name="direction",
                          group=["distance"], confidence=confidence)


# ---------------------------------------------------------------------------------------------- data and features


def dataset_table(dataset, source: str) -> pd.DataFrame:
    """What was loaded, from the dataset's own summary (counts, drops, words and labels per item)."""
    s = dataset.summary()
    rows = [("dataset", s["name"]), ("source", source), ("layout", s["layout"]),
            ("items (image-text pairs)", s["items"]), ("labels", s["labels"]),
            ("labels per item, mean / median", f"{s['labels_per_item']['mean']:.2f} / {s['labels_per_item']['median']:g}"),
            ("words per text, mean / median", f"{s['words_per_item']['mean']:.2f} / {s['words_per_item']['median']:g}"),
            ("fingerprint", s["fingerprint"]), *[(f"loader: {k}", v) for k, v in sorted(s["stats"].items())]]
    return pd.DataFrame({"property": [r[0] for r in rows], "value": [str(r[1]) for r in rows]})


def relevance_floor(labels) -> pd.DataFrame:
    """Share of relevant items per query over the whole dataset (the query excluded): a random ranking's precision."""
    L = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    rel = (L @ L.T > 0).float()
    rel.fill_diagonal_(0)
    frac = (rel.sum(1) / max(len(L) - 1, 1)).numpy()
    return pd.DataFrame([{"items": len(L), "mean fraction relevant (= random precision)": frac.mean(),
                          "min": frac.min(), "max": frac.max(),
                          "queries with no relevant item": int((rel.sum(1) == 0).sum())}])


def split_table(paths: dict) -> pd.DataFrame:
    """One row per split file (seed -> path): protocol, part sizes, and the first 16 hex digits of its SHA-256."""
    rows = []
    for seed, path in paths.items():
        sp = load_split(path)
        rows.append({"seed": seed, "protocol": sp.protocol, **sp.sizes(), "sha256": file_sha256(path)[:16]})
    return pd.DataFrame(rows)


def feature_table(fs) -> pd.DataFrame:
    """Shapes and dtypes of the cached feature tensors."""
    names = ("image_global", "image_regions", "text_global", "text_words", "text_mask", "valid")
    return pd.DataFrame([{"tensor": n, "shape": str(tuple(getattr(fs, n).shape)),
                          "dtype": str(getattr(fs, n).dtype).replace("torch.", "")} for n in names])


def raw_rankings(fs, labels, split) -> pd.DataFrame:
    """mAP@all of the frozen features on their own: image->image, text->text, the raw (unaligned) cross-modal
    rankings when both widths agree, and a random ranking, for the split's query part against its database."""
    q, db = torch.as_tensor(split["query"]), torch.as_tensor(split["database"])
    L = torch.as_tensor(np.asarray(labels))
    ig, tg = fs.image_global.float(), fs.text_global.float()
    pairs = [("I->I", ig, ig), ("T->T", tg, tg)]
    if ig.shape[1] == tg.shape[1]:
        pairs += [("I->T (raw, unaligned)", ig, tg), ("T->I (raw, unaligned)", tg, ig)]
    gen = torch.Generator().manual_seed(0)
    pairs.append(("random ranking", torch.randn(len(ig), 16, generator=gen), torch.randn(len(ig), 16, generator=gen)))
    return pd.DataFrame([{"ranking": name, "mAP@all": mean_average_precision(a[q], b[db], L[q], L[db])}
                         for name, a, b in pairs])


def raw_similarities(fs, labels, split, n: int = 20000) -> pd.DataFrame:
    """A random sample of query-database cosines of the frozen features, with whether the pair is relevant."""
    q, db = torch.as_tensor(split["query"]), torch.as_tensor(split["database"])
    L = torch.as_tensor(np.asarray(labels)).float()
    rel = (L[q] @ L[db].T > 0)
    gen = torch.Generator().manual_seed(0)
    frames = []
    for name, a in (("image-image", fs.image_global.float()), ("text-text", fs.text_global.float())):
        an = F.normalize(a, dim=1)
        sim = an[q] @ an[db].T
        pick = torch.randperm(sim.numel(), generator=gen)[:n]
        frames.append(pd.DataFrame({"cosine": sim.flatten()[pick].numpy(), "relevant": rel.flatten()[pick].numpy(),
                                    "pair": name}))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------- benchmark tables


def metric_rows(records: pd.DataFrame, metric: str, k=None, denominator: str | None = "relevant",
                ties: str = "stable") -> pd.DataFrame:
    """The rows of one metric from records_frame: mAP@all (k None) or @K, P/R/NDCG@K, for one tie rule (and one
    denominator for mAP), as the variant strings of dcmfg.metrics name them."""
    sel = records[records["metric"] == metric]
    sel = sel[sel["k"].isna()] if k is None else sel[sel["k"] == k]
    if metric == "mAP" and denominator is not None:
        sel = sel[sel["variant"].str.contains(f"denominator={denominator}", regex=False)]
    return sel[sel["variant"].str.contains(f"ties={ties}", regex=False)]


def measured_summary(reports: list[dict]) -> pd.DataFrame:
    """mAP@all per model, distance and direction over seeds (mean, std, n), for reported-vs-measured tables."""
    frame = records_frame(reports)
    maps = metric_rows(frame, "mAP")
    bits = {r.get("label", r["model"]): r["config"]["model"]["hash_bits"] for r in reports}
    out = maps.groupby(["model", "distance", "direction"], as_index=False)["value"].agg(
        mean="mean", std=lambda v: v.std(ddof=1) if len(v) > 1 else np.nan, seeds="count")
    out["bits"] = [bits[m] if d == "hamming" else None for m, d in zip(out["model"], out["distance"])]
    return out


# ---------------------------------------------------------------------------------------------- environment


def environment(repo) -> pd.DataFrame:
    """Python, platform, CPU, memory, GPU, git commit and the dcmfg environment variables of this build."""
    def first(path: str, key: str, cast=str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return cast(line.split(":", 1)[1].strip())
        except OSError:
            pass
        return "unknown"

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "CPU": first("/proc/cpuinfo", "model name"),
        "CPU cores (os.cpu_count)": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "memory (GiB)": first("/proc/meminfo", "MemTotal", lambda v: f"{int(v.split()[0]) / 2**20:.1f}"),
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run)",
        "git commit": git("rev-parse", "HEAD") or "not a git checkout",
        "uncommitted changes": "yes" if git("status", "--porcelain", "--untracked-files=no") else "no",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", ""),
        "DCMFG_DATA": "set" if os.environ.get("DCMFG_DATA") else "(unset)",
        "DCMFG_CACHE": "set" if os.environ.get("DCMFG_CACHE") else "(unset: ~/.cache/dcmfg)",
    }
    return pd.DataFrame({"item": list(env), "value": [str(v) for v in env.values()]})


def package_versions(requirements) -> pd.DataFrame:
    """The pins of requirements.txt with the version installed here."""
    rows = []
    for line in Path(requirements).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        name, pinned = line.split("==", 1)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        rows.append({"package": name, "pinned": pinned, "installed": installed, "match": installed == pinned})
    return pd.DataFrame(rows)


def map_at_k_table(records: pd.DataFrame) -> pd.DataFrame:
    """mAP@K under both denominators (stable ties), mean over seeds: one row per model, distance and denominator."""
    mk = records[(records["metric"] == "mAP") & records["k"].notna() & records["variant"].str.contains("ties=stable")]
    if mk.empty:
        return mk
    mk = mk.assign(denominator=mk["variant"].str.extract(r"denominator=(\w+)")[0], K=mk["k"].astype(int))
    t = mk.groupby(["model", "distance", "denominator", "direction", "K"])["value"].mean().unstack(["direction", "K"])
    t.columns = [f"{d} mAP@{k}" for d, k in t.columns]
    return t.reset_index()


def at_k_table(records: pd.DataFrame, metric: str) -> pd.DataFrame:
    """P@K or R@K (stable ties), mean over seeds: one row per model, distance and direction, one column per K."""
    rows = records[records["metric"] == metric]
    tab = rows.assign(K=rows["k"].astype(int)).groupby(["model", "distance", "direction", "K"])["value"].mean()
    tab = tab.unstack("K")
    tab.columns = [f"{metric}@{k}" for k in tab.columns]
    return tab.reset_index()


def reported_table(reported: pd.DataFrame) -> pd.DataFrame:
    """Published numbers (book/data/reported.csv) as one row per method, protocol and dataset, bits side by side."""
    cells = (reported.sort_values("bits").groupby(["method", "protocol", "dataset", "direction"], sort=False)["map"]
             .agg(lambda v: " / ".join(f"{x:.4f}".lstrip("0") for x in v)).unstack("direction").reset_index())
    cells.insert(0, "source", "reported")
    return cells.rename(columns={"I->T": "I->T (16 / 32 / 64 bits)", "T->I": "T->I (16 / 32 / 64 bits)"})


def measured_table(measured: pd.DataFrame, data: str, backbones: str) -> pd.DataFrame:
    """measured_summary as one row per model and distance, 'mean ± std' per direction, with the data and backbones."""
    cells = measured.assign(value=[format_mean_std(m, None if np.isnan(sd) else sd)
                                   for m, sd in zip(measured["mean"], measured["std"])])
    wide = cells.pivot_table(index=["model", "distance", "bits"], columns="direction", values="value",
                             aggfunc="first", dropna=False).reset_index().dropna(subset=["I->T", "T->I"], how="all")
    wide.insert(0, "source", "measured")
    return wide.assign(data=data, backbones=backbones)


def comparison_points(reported: pd.DataFrame, measured: pd.DataFrame, measured_source: str, bits: int = 64) -> pd.DataFrame:
    """Reported (at `bits`) and measured mAP as points (label, direction, map, source) for figures.reported_vs_measured."""
    r = reported[reported["bits"] == bits]
    r = r.assign(label=r["method"] + " [" + r["dataset"] + ", " + r["protocol"] + "]", source="reported (CLIP, full dataset)")
    m = measured.assign(label=[f"{mo} ({'real' if d == 'cosine' else f'{int(b)} bits'})"
                               for mo, d, b in zip(measured["model"], measured["distance"], measured["bits"].fillna(0))],
                        map=measured["mean"], source=measured_source)
    cols = ["label", "direction", "map", "source"]
    return pd.concat([r[cols], m[cols]], ignore_index=True)
