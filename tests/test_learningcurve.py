"""The learning curve's tables (dcmfg.study.learningcurve) on frames whose answer is known, and the nested pools
it relies on (dcmfg.data.splits.make_split): the same queries and database at every size."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from dcmfg.data.splits import make_split
from dcmfg.data.synthetic import load_synthetic
from dcmfg.study import learningcurve as lc

SIZES = [500, 1000, 2000, 4000]


def _frame(slopes, base=0.70, offset=-0.01, noise=0.0) -> pd.DataFrame:
    """Both arms per (size, seed): the control flat at `base`, DCMFG above it by offset + slope * log2(size / 500)
    (the same in both directions), so each seed's gain per doubling is its slope."""
    rng = np.random.default_rng(0)
    rows = []
    for seed, b in enumerate(slopes):
        for n in SIZES:
            gain = offset + b * np.log2(n / SIZES[0]) + noise * rng.standard_normal()
            for arm, v in ((lc.REFERENCE, base + gain), (lc.CONTROL, base)):
                rows.append({"train pairs": n, "arm": arm, "seed": seed, "I->T": v, "T->I": v, "val mAP": v,
                             "best epoch": 10, "epochs run": 20, "steps run": 400, "converged": True,
                             "query mutual share": 0.3 if arm == lc.REFERENCE else np.nan, "CPU seconds": 1.0})
    return pd.DataFrame(rows)


def oracle_slope(x, y) -> float:
    """Least-squares slope, cov(x, y) / var(x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def test_a_gain_that_grows_with_every_doubling_is_called_growing():
    frame = _frame([0.010, 0.012, 0.008, 0.011, 0.009])
    slopes = lc.trend(frame).set_index("measure")
    assert list(slopes["verdict"]) == [lc.GROWS, lc.GROWS]
    assert slopes.loc["I->T", "difference [95% t interval]"].startswith("+0.0100 [")
    assert (slopes["seeds"] == 5).all()


def test_a_flat_noisy_gain_has_no_detectable_trend_and_a_falling_one_shrinks():
    assert set(lc.trend(_frame([0.004, -0.003, 0.002, -0.004, 0.001]))["verdict"]) == {lc.NO_TREND}
    assert set(lc.trend(_frame([-0.010, -0.012, -0.008]))["verdict"]) == {lc.SHRINKS}


def test_trend_slopes_are_least_squares_on_log2_size():
    frame = _frame([0.0], noise=0.01)  # one seed, noisy: the slope is its least-squares fit, with no interval
    row = lc.trend(frame).iloc[0]
    part = frame[frame["seed"] == 0].pivot_table(index="train pairs", columns="arm", values="I->T")
    expect = oracle_slope(np.log2(part.index.to_numpy()), part[lc.REFERENCE] - part[lc.CONTROL])
    assert row["difference [95% t interval]"] == f"{expect:+.4f}" and row["seeds"] == 1


def test_the_gain_table_pairs_each_size_and_the_note_quotes_its_verdicts():
    frame = _frame([0.010, 0.012, 0.008, 0.011, 0.009])
    gains = lc.gain_table(frame)
    assert len(gains) == 2 * len(SIZES)
    assert list(dict.fromkeys(gains["comparison"])) == [f"DCMFG - layers=0, {n} training pairs" for n in SIZES]
    first = gains[gains["train pairs"] == SIZES[0]]
    assert set(first["verdict"]) == {"worse"}  # -0.01 at the smallest size, every seed
    last = gains[gains["train pairs"] == SIZES[-1]]
    assert set(last["verdict"]) == {"better"}
    note = lc.closing_note(gains, lc.trend(frame), frame)
    assert f"At {SIZES[-1]} training pairs, DCMFG against the same model without graph layers is better in both" in note
    assert "grows" in note and "none was still improving when it ended" in note
    table = lc.curve_table(frame)
    assert len(table) == 2 * len(SIZES) and table.iloc[0]["size, arm"] == f"{SIZES[0]} pairs, DCMFG"
    lc.curve_figure(frame, gains)  # draws


def test_unconverged_runs_are_named_in_the_note():
    frame = _frame([0.01, 0.01, 0.01])
    frame.loc[0, "converged"] = False
    assert "1 of 24 runs ended at their best epoch" in lc.closing_note(lc.gain_table(frame), lc.trend(frame), frame)


@pytest.mark.parametrize("protocol", ["random", "dcmht"])
def test_pools_of_every_size_share_the_queries_and_database_and_are_nested(protocol):
    ds = load_synthetic(n=400, seed=0)
    splits = [make_split(ds, protocol=protocol, query=80, train=n, val=0.1, seed=3) for n in (50, 100, 320)]
    for s in splits[1:]:
        assert np.array_equal(s["query"], splits[0]["query"]) and np.array_equal(s["database"], splits[0]["database"])
    pools = [set(s["train"].tolist()) | set(s["val"].tolist()) for s in splits]
    assert pools[0] < pools[1] < pools[2]
    assert [len(p) for p in pools] == [50, 100, 320]


def test_the_trend_table_draws_as_a_forest_plot_with_its_own_verdicts():
    from dcmfg.study import forest

    slopes = lc.trend(_frame([0.010, 0.012, 0.008, 0.011, 0.009]))
    assert forest.is_paired(slopes)
    data = forest.intervals(slopes)
    assert list(data["verdict"]) == [lc.GROWS, lc.GROWS] and list(data["measure"]) == ["I->T", "T->I"]
    forest.forest_figure(slopes, "slope")  # draws, the legend naming "grows"
