"""Same seed, same numbers: a run trained a second time and compared with the first, number by number (the
reproducibility appendix, notebooks/11-reproducibility.ipynb).

`rerun_check` trains a run as the study does (cached), trains the same config once more into a fresh temporary folder,
and `compare_runs` compares the two: every metric of the query report, every value of the per-epoch log (timings
aside), the selected epoch with its validation mAP, the graph statistics and every element of the trained weights.
CPU training is seeded and float32 (docs/method.md, section 6), so on one machine with the same settings, thread
count included, the two agree to the last bit; `dcmfg.study.reproducibility` measures what another summation order
does instead.

Reports are what `dcmfg.study.Study.run` returns: report.json plus `history` (the metrics.jsonl rows) and `run_dir`.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from dcmfg.engine.train import train

TIMING_KEYS = ("seconds",)  # per-epoch log values that measure time, not what was computed
WEIGHTS = Path("best") / "model.safetensors"


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
