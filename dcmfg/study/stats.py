"""Statistics over split seeds: mean ± std, and paired differences with Student-t intervals and computed verdicts.

A claim that A beats B rests on the per-seed differences A - B (same split file, same seed), not on two separate
means: `paired_difference` gives their mean, the 95% Student-t interval (critical value for n - 1 degrees of freedom)
and a verdict word computed from the interval, never typed by hand. The tables built from these live in
`dcmfg.study.tables`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import t as student_t

BETTER, WORSE, NO_DIFFERENCE, NO_INTERVAL = "better", "worse", "no detectable difference", "one seed: no interval"
# the same interval read as a trend (a slope over seeds, e.g. of a gain against the training size)
GROWS, SHRINKS, NO_TREND = "grows", "shrinks", "no detectable trend"


def t_critical(n: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t critical value for a mean of n paired differences (n - 1 degrees of freedom)."""
    return float(student_t.ppf(0.5 + confidence / 2, n - 1)) if n > 1 else math.nan


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Per-pair differences a - b (pairs = seeds): mean, std, n, the t interval and the verdict for "a vs b".

    verdict: "better" when the whole interval is above 0, "worse" when below, else "no detectable difference".
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have the same length, got {a.shape} and {b.shape}")
    d = a - b
    n = int(len(d))
    mean = float(d.mean()) if n else math.nan
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    tc = t_critical(n, confidence)
    half = tc * std / math.sqrt(n) if n > 1 else math.nan
    lo, hi = mean - half, mean + half
    if n < 2:
        verdict = NO_INTERVAL
    elif lo > 0:
        verdict = BETTER
    elif hi < 0:
        verdict = WORSE
    else:
        verdict = NO_DIFFERENCE
    return {"mean": mean, "std": std, "n": n, "ci_low": lo, "ci_high": hi, "t_crit": tc,
            "confidence": confidence, "verdict": verdict}


def format_interval(row) -> str:
    """'+0.0123 [-0.0040, +0.0286]' for a row (or dict) of `paired_difference`."""
    if row["n"] < 2 or math.isnan(row["ci_low"]):
        return f"{row['mean']:+.4f}"
    return f"{row['mean']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"


def format_mean_std(mean: float, std: float | None = None) -> str:
    """'0.7006 ± 0.0265', or the mean alone when there is no std (one seed)."""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def mean_std(values) -> str:
    """'0.7006 ± 0.0265' (sample std over seeds), or the single value when there is one."""
    v = np.asarray(values, dtype=float)
    return format_mean_std(v.mean(), v.std(ddof=1) if len(v) > 1 else None)
