"""The graph chapter's tables: paired differences, sign of the switch comparison, verdict words from intervals."""

from __future__ import annotations

import pandas as pd
import pytest

from dcmfg.study import graphstudy as gs
from dcmfg.study import tables
from dcmfg.study.stats import format_mean_std, mean_std, paired_difference


def _frame():
    rows = []
    for seed, (a, b) in enumerate([(0.70, 0.69), (0.72, 0.70), (0.71, 0.70), (0.69, 0.68), (0.73, 0.71)]):
        rows.append({"arm": "DCMFG", "seed": seed, "I->T": a, "T->I": a - 0.05})
        rows.append({"arm": "layers=0", "seed": seed, "I->T": b, "T->I": a - 0.05 + (0.01 if seed % 2 else -0.01)})
    return pd.DataFrame(rows)


def test_paired_against_gives_intervals_and_computed_verdicts():
    t = gs.paired_against(_frame(), "DCMFG")
    i2t = t[t["measure"] == "I->T"].iloc[0]
    ref = paired_difference([0.70, 0.72, 0.71, 0.69, 0.73], [0.69, 0.70, 0.70, 0.68, 0.71])
    assert i2t["verdict"] == ref["verdict"] == "better" and i2t["seeds"] == 5
    assert f"{ref['mean']:+.4f}" in i2t["difference [95% t interval]"]
    assert t[t["measure"] == "T->I"].iloc[0]["verdict"] == "no detectable difference"
    assert gs.helps(t, "DCMFG - layers=0") == ("is better in one direction and makes no detectable difference in "
                                               "the other")
    assert "I->T better" in gs.verdict_sentence(t, "DCMFG - layers=0")


def test_switch_table_reports_variant_minus_reference_on_validation():
    rows = []
    for seed in range(3):
        rows.append({"variant": "default", "seed": seed, "val mAP": 0.80 + 0.01 * seed, "query mutual share": 0.7,
                     "bank mutual share": 0.8, "bank hubness": 2.0, "I->T": 0.7, "T->I": 0.6})
        rows.append({"variant": "csls", "seed": seed, "val mAP": 0.75 + 0.01 * seed + 0.001 * seed ** 2,
                     "query mutual share": 0.9, "bank mutual share": 0.9, "bank hubness": 1.0, "I->T": 0.7, "T->I": 0.6})
    t = gs.switch_table(pd.DataFrame(rows), "default").set_index("variant")
    cell = t.loc["csls", "val mAP: variant - default [95% t interval]"]
    assert cell.startswith("-0.04") and t.loc["csls", "val mAP verdict"] == "worse"
    assert t.loc["csls", "seeds"] == 3 and t.loc["csls", "query mutual share"] == pytest.approx(0.9)


def test_one_seed_is_not_judged():
    f = _frame()
    t = gs.paired_against(f[f["seed"] == 0], "DCMFG")
    assert set(t["verdict"]) == {"one seed: no interval"}
    assert gs.helps(t, "DCMFG - layers=0").startswith("cannot be judged")


def test_the_benchmark_and_graph_chapters_share_one_interval_table():
    """headline_pairs (chapter 4) and paired_against (chapter 5) are the same paired table, named for their chapter."""
    f = _frame().rename(columns={"arm": "model"})
    reports = [{"model": r["model"], "seed": r["seed"], "summaries": {"cosine": {"map_i2t": r["I->T"], "map_t2i": r["T->I"]}}}
               for r in f.to_dict("records")]
    head = tables.headline_pairs(reports, "DCMFG")
    graph = gs.paired_against(_frame(), "DCMFG")
    assert list(head.columns) == ["comparison", "distance", "direction", "difference [95% t interval]", "seeds", "verdict"]
    assert list(graph.columns) == ["comparison", "measure", "difference [95% t interval]", "seeds", "verdict"]
    assert head["difference [95% t interval]"].tolist() == graph["difference [95% t interval]"].tolist()
    assert head["verdict"].tolist() == graph["verdict"].tolist() == ["better", "no detectable difference"]


def test_mean_std_cells():
    assert mean_std([0.7]) == "0.7000" and mean_std([0.7, 0.8]) == "0.7500 ± 0.0707"
    assert format_mean_std(0.75, 0.0707) == "0.7500 ± 0.0707" and format_mean_std(0.75) == "0.7500"
    counts = pd.DataFrame({"arm": ["a", "a", "b"], "best epoch": [8.0, 12.0, 4.0], "I->T": [0.7, 0.8, 0.5]})
    t = gs.mean_table(counts, "arm", ["best epoch", "I->T"]).set_index("arm")
    assert t.loc["a", "best epoch"] == "8, 12" and t.loc["a", "I->T"] == "0.7500 ± 0.0707" and t.loc["b", "I->T"] == "0.5000"
    costs = pd.DataFrame({"arm": ["a", "a"], "steps run": [1400.0, 980.0], "CPU seconds": [1071.4, 2000.6]})
    c = gs.mean_table(costs, "arm", ["steps run", "CPU seconds"]).set_index("arm")
    assert c.loc["a", "steps run"] == "1400, 980" and c.loc["a", "CPU seconds"] == "1,536 ± 657"
