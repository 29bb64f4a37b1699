"""The reproducibility appendix's logic: the bit-exact comparison of two runs (dcmfg.study.bitexact), the spread of
the numbers under a perturbation of the float summation order, and which of chapter 5's verdicts it leaves fragile
(dcmfg.study.reproducibility)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from dcmfg import study
from dcmfg.config import Config
from dcmfg.study import bitexact as bx
from dcmfg.study import reproducibility as rp
from dcmfg.study.tables import BETTER, NO_DIFFERENCE, NO_INTERVAL, paired_difference


# ------------------------------------------------------------------------------------------ the arms
def test_arms_are_chapter_5s_controls_by_label():
    arms = rp.select_arms(["layers=0", "DCMFG"])
    assert arms == [("layers=0", "dcmfg", {"model.layers": 0}), ("DCMFG", "dcmfg", {})]
    with pytest.raises(ValueError, match=r"unknown arm\(s\) 'dcmfg'; chapter 5's arms are: DCMFG, layers=0, linear"):
        rp.select_arms(["dcmfg"])


def test_run_labels_name_the_changed_setting_in_both_runs():
    cfg = Config()
    cfg.train.threads = 1
    assert rp.run_labels(cfg, {"train.threads": 2}) == ("threads=1", "threads=2")
    assert rp.run_labels(cfg, {"train.threads": 2, "train.batch_size": 8}) == (
        f"threads=1, batch_size={cfg.train.batch_size}", "threads=2, batch_size=8")


# ------------------------------------------------------------------------------------------ bit-exact rerun
def _report(**change) -> dict:
    r = {"records": [{"metric": "mAP", "k": None, "direction": "I->T", "value": 0.61},
                     {"metric": "mAP", "k": 50, "direction": "T->I", "value": 0.58}],
         "best_epoch": 4, "best_val": 0.6, "epochs_run": 6,
         "graph": {"bank": {"mutual_share": 0.7}, "query_in_degree": 2.5},
         "history": [{"epoch": e, "loss": 10.0 / e, "seconds": 1.0 + e, "val_map_i2t": 0.5 + e / 100} for e in (1, 2)]}
    r.update(change)
    return r


def test_flat_numbers_keep_every_number_and_skip_names():
    flat = bx.flat_numbers({"a": [1, {"b": 2.5, "name": "x", "ok": True, "none": None}], "c": 3})
    assert flat == {"a/0": 1.0, "a/1/b": 2.5, "c": 3.0}


def test_compare_numbers_counts_identical_values_and_the_largest_difference():
    assert bx.compare_numbers({"x": 1.0, "y": float("nan")}, {"x": 1.0, "y": float("nan")}) == {
        "values": 2, "identical": 2, "max |difference|": 0.0}
    c = bx.compare_numbers({"x": 1.0, "y": 2.0, "only_a": 5.0}, {"x": 1.0, "y": 2.0 + 1e-12})
    assert c["values"] == 3 and c["identical"] == 1 and c["max |difference|"] == pytest.approx(1e-12, rel=1e-3)


def test_compare_weights_element_by_element():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    assert bx.compare_weights(a, copy.deepcopy(a)) == {"values": 9, "identical": 9, "max |difference|": 0.0}
    b = copy.deepcopy(a)
    b["w"][1, 2] = torch.nextafter(b["w"][1, 2], torch.tensor(100.0))  # the last bit of one element
    c = bx.compare_weights(a, b)
    assert c["values"] == 9 and c["identical"] == 8 and 0 < c["max |difference|"] < 1e-5
    c = bx.compare_weights(a, {"w": a["w"], "b": torch.zeros(4)})  # another shape: all of that tensor differs
    assert c["values"] == 10 and c["identical"] == 6


def test_two_identical_runs_are_bit_identical_and_timings_do_not_count():
    first = _report()
    second = copy.deepcopy(first)
    for row in second["history"]:
        row["seconds"] += 7.0  # another machine load: not a computed value
    w = {"w": torch.ones(2, 2)}
    table = bx.compare_runs(first, second, w, copy.deepcopy(w))
    assert list(table["compared"].str.split(" ").str[0]) == ["query", "per-epoch", "selected", "graph", "trained"]
    assert bx.bit_identical(table)
    assert table["identical"].sum() == table["values"].sum() == 3 + 6 + 3 + 2 + 4  # the records hold k too
    assert "identical to the last bit" in bx.rerun_sentence(table, "DCMFG, seed 0")
    assert bx.bit_identical(bx.compare_runs(first, copy.deepcopy(first)))  # without weights: the report alone


def test_a_single_changed_loss_is_found_and_named():
    first = _report()
    second = copy.deepcopy(first)
    second["history"][1]["loss"] += 1e-9
    table = bx.compare_runs(first, second)
    assert not bx.bit_identical(table)
    bad = table[~table["bit-identical"]]
    assert list(bad["compared"].str.split(" ").str[0]) == ["per-epoch"]
    sentence = bx.rerun_sentence(table, "DCMFG, seed 0")
    assert "did NOT give the same numbers" in sentence and "1 of 6 differ" in sentence
    assert not bx.bit_identical(bx.compare_runs(first, _report(best_epoch=8)))
    assert not bx.bit_identical(pd.DataFrame(columns=["compared", "values", "identical", "bit-identical"]))


# ------------------------------------------------------------------------------------------ spread
LABELS = ("threads=1", "threads=2")


def _frame(values: dict) -> pd.DataFrame:
    """controls_frame-like rows from {(arm, seed): (I->T, T->I, best epoch)}."""
    return pd.DataFrame([{"arm": arm, "seed": seed, "I->T": i2t, "T->I": t2i, "best epoch": epoch}
                         for (arm, seed), (i2t, t2i, epoch) in values.items()])


BASE = _frame({
    **{("DCMFG", s): (0.80 + 0.01 * s, 0.78 + 0.01 * s, 60) for s in range(5)},
    **{("layers=0", s): (0.79 + 0.01 * s, 0.78 + 0.01 * s + 0.001 * (s % 2), 40) for s in range(5)},
})


def test_spread_pairs_each_arm_seed_by_seed():
    rerun = _frame({("DCMFG", 0): (0.80, 0.78, 60), ("DCMFG", 1): (0.812, 0.789, 72), ("DCMFG", 2): (0.817, 0.80, 56)})
    spread = rp.spread_frame(BASE, rerun, LABELS)
    assert list(spread["arm"]) == ["DCMFG"] * 3 and list(spread["seed"]) == [0, 1, 2]
    assert list(spread["best epoch, threads=2"]) == [60, 72, 56]
    assert spread["I->T difference"].tolist() == pytest.approx([0.0, 0.002, -0.003])
    summary = rp.spread_table(spread, LABELS)
    row = summary.iloc[0]
    assert row["seeds"] == 3 and row["best epoch changed"] == "2 of 3" and row["seeds unchanged"] == "1 of 3"
    assert row["I->T mean difference"] == pytest.approx(-0.001 / 3)
    assert row["I->T max |difference|"] == pytest.approx(0.003)
    assert row["T->I max |difference|"] == pytest.approx(0.001)


def test_arms_not_trained_again_enter_with_the_study_runs_on_the_rerun_seeds():
    rerun = _frame({("DCMFG", 0): (0.80, 0.78, 60), ("DCMFG", 2): (0.82, 0.80, 60)})
    both = rp.with_unperturbed(rerun, BASE)
    assert sorted(map(tuple, both[["arm", "seed"]].to_numpy().tolist())) == [
        ("DCMFG", 0), ("DCMFG", 2), ("layers=0", 0), ("layers=0", 2)]
    assert both.loc[both["arm"] == "layers=0", "I->T"].tolist() == BASE.loc[
        (BASE["arm"] == "layers=0") & BASE["seed"].isin([0, 2]), "I->T"].tolist()


# ------------------------------------------------------------------------------------------ fragility
def _row(low, high, verdict):
    return {"ci_low": low, "ci_high": high, "verdict": verdict}


def test_fragility_rules():
    assert rp.touches_zero(0.00008, 0.004) and rp.touches_zero(-0.01, -0.0001) and not rp.touches_zero(0.0002, 0.01)
    assert not rp.touches_zero(float("nan"), float("nan"))
    far = _row(0.002, 0.009, BETTER)
    assert rp.fragility(far, _row(0.001, 0.01, BETTER), LABELS) == rp.STABLE
    assert rp.fragility(_row(-0.02, 0.03, NO_DIFFERENCE), _row(-0.01, 0.02, NO_DIFFERENCE), LABELS) == rp.STABLE
    flipped = _row(-0.0011, 0.01, NO_DIFFERENCE)
    assert rp.fragility(far, flipped, LABELS) == rp.FRAGILE
    assert rp.fragility_reasons(far, flipped, LABELS) == ["the verdicts differ"]
    assert rp.fragility(far, _row(0.00005, 0.01, BETTER), LABELS) == rp.FRAGILE
    assert rp.fragility_reasons(far, _row(0.00005, 0.01, BETTER), LABELS) == [
        "the threads=2 interval ends within 0.0001 of zero"]
    assert rp.fragility_reasons(_row(-0.0001, 0.004, NO_DIFFERENCE), _row(0.0011, 0.002, BETTER), LABELS) == [
        "the verdicts differ", "the threads=1 interval ends within 0.0001 of zero"]
    one = _row(float("nan"), float("nan"), NO_INTERVAL)
    assert rp.fragility(one, one, LABELS) == rp.UNJUDGED


def test_verdicts_are_recomputed_under_both_runs_and_a_flip_is_fragile():
    # DCMFG - layers=0 I->T is +0.01 on every seed under the study's runs (better); the rerun moves seed 1's DCMFG
    # down by 0.02, so the difference is +0.01, -0.01, +0.01 on seeds 0-2 (no detectable difference)
    rerun = _frame({("DCMFG", 0): (0.80, 0.78, 60), ("DCMFG", 1): (0.79, 0.79, 64), ("DCMFG", 2): (0.82, 0.80, 60)})
    verdicts = rp.verdict_table(BASE, rp.with_unperturbed(rerun, BASE), LABELS)
    assert list(verdicts["comparison"]) == ["DCMFG - layers=0"] * 2 and list(verdicts["measure"]) == ["I->T", "T->I"]
    i2t = verdicts.iloc[0]
    assert i2t["seeds"] == 3 and i2t["threads=1 verdict"] == BETTER and i2t["threads=2 verdict"] == NO_DIFFERENCE
    assert i2t["status"] == rp.FRAGILE and i2t["why"] == "the verdicts differ"
    expected = paired_difference([0.80, 0.79, 0.82], [0.79, 0.80, 0.81])
    assert i2t["threads=2 [95% t interval]"] == (f"{expected['mean']:+.4f} [{expected['ci_low']:+.4f}, "
                                                 f"{expected['ci_high']:+.4f}]")
    assert i2t["threads=1, all 5 seeds verdict"] == BETTER  # chapter 5's verdict over all its seeds, for reference
    t2i = verdicts.iloc[1]  # the rerun left T->I as it was: the same verdict, its interval well clear of zero's edge
    assert t2i["threads=1 verdict"] == t2i["threads=2 verdict"] == NO_DIFFERENCE and t2i["status"] == rp.STABLE
    assert list(rp.status_table(verdicts).columns) == [
        "comparison", "measure", "threads=1, all 5 seeds verdict", "threads=1 verdict", "threads=2 verdict", "status"]

    same = rp.verdict_table(BASE, rp.with_unperturbed(BASE[BASE["arm"] == "DCMFG"], BASE), LABELS)
    assert not any("all 5 seeds" in c for c in same.columns)  # the rerun covers every seed: nothing else to show
    assert (same["threads=1 verdict"] == same["threads=2 verdict"]).all()

    long = rp.intervals_side_by_side(verdicts)
    assert list(long["comparison"][:3]) == ["DCMFG - layers=0, threads=1, all 5 seeds", "DCMFG - layers=0, threads=1",
                                            "DCMFG - layers=0, threads=2"]
    assert list(long["seeds"][:3]) == [5, 3, 3]
    from dcmfg.study import forest

    drawn = forest.intervals(long)  # what the forest plot reads: three bars per comparison and measure
    assert len(drawn) == 6 and set(drawn["verdict"]) == {BETTER, NO_DIFFERENCE}
    study_run = paired_difference([0.80, 0.81, 0.82], [0.79, 0.80, 0.81])  # threads=1 on seeds 0-2
    assert drawn.loc[1, "low"] == pytest.approx(round(study_run["ci_low"], 4)) and study_run["ci_low"] > 0


def test_the_sentences_quote_the_computed_spread_and_verdicts():
    rerun = _frame({("DCMFG", 0): (0.80, 0.78, 60), ("DCMFG", 1): (0.79, 0.79, 64), ("DCMFG", 2): (0.82, 0.80, 60)})
    spread = rp.spread_frame(BASE, rerun, LABELS)
    summary = rp.spread_table(spread, LABELS)
    verdicts = rp.verdict_table(BASE, rp.with_unperturbed(rerun, BASE), LABELS)
    text = rp.spread_sentences(summary, verdicts, LABELS, not_rerun=["layers=0"])
    assert text.startswith("With threads=2 instead of threads=1, nothing else changed (3 seeds)")
    assert "DCMFG: by up to 0.0200 (I->T) and " in text and "the mean by -0.0067 and " in text
    assert "selected epoch changed on 1 of 3 seeds" in text and "Not trained again" in text
    assert "1 of the 2 paired verdicts recomputed is FRAGILE: DCMFG - layers=0, I->T (threads=1: better" in text
    assert "]: the verdicts differ). The other 1 hold under both runs." in text
    assert "The other 1 hold under both runs" in text
    same = _report()
    rerun_table = bx.compare_runs(same, copy.deepcopy(same))
    note = rp.closing_note(rerun_table, "DCMFG, seed 0", summary, verdicts, LABELS)
    assert note.startswith("Same seed, same numbers holds on one machine: the same run (DCMFG, seed 0) trained twice")
    assert "It does not hold across summation orders" in note
    assert "query mAP@all moved most for DCMFG: by up to 0.0200 (I->T)" in note
    assert note.endswith("1 of the 2 paired verdicts recomputed is FRAGILE: DCMFG - layers=0, I->T. The other 1 hold "
                         "under both runs.")

    both = _frame({("DCMFG", 0): (0.80, 0.78, 60), ("DCMFG", 1): (0.79, 0.79, 64), ("DCMFG", 2): (0.82, 0.80, 60),
                   ("layers=0", 0): (0.79 + 3e-6, 0.78, 40), ("layers=0", 1): (0.80, 0.791, 40),
                   ("layers=0", 2): (0.81, 0.80, 40)})  # layers=0 moves on one seed by a last-bit-sized 3e-06
    note = rp.closing_note(rerun_table, "x", rp.spread_table(rp.spread_frame(BASE, both, LABELS), LABELS),
                           rp.verdict_table(BASE, both, LABELS), LABELS)
    assert "query mAP@all moved most for DCMFG: by up to 0.0200 (I->T)" in note
    assert "; the other arms by at most 3e-06 (layers=0)." in note

    quiet = rp.spread_table(rp.spread_frame(BASE, BASE[BASE["arm"] == "DCMFG"], LABELS), LABELS)
    stable = rp.verdict_table(BASE, rp.with_unperturbed(BASE[BASE["arm"] == "DCMFG"], BASE), LABELS)
    note = rp.closing_note(rerun_table, "DCMFG, seed 0", quiet, stable, LABELS)
    assert "It also held with threads=2" in note and "None of the 2 paired verdicts recomputed is fragile" in note
    changed = copy.deepcopy(same)
    changed["history"][0]["loss"] += 1.0
    assert rp.closing_note(bx.compare_runs(same, changed), "x", quiet, stable, LABELS).startswith(
        "Same seed, same numbers did NOT hold on this machine")


def test_shifts_are_shown_without_hiding_a_last_bit_move():
    assert [rp.shift_text(x) for x in (0.0, 0.0123, 3.2e-6)] == ["0", "0.0123", "3e-06"]
    assert [rp.shift_text(x, signed=True) for x in (-0.0123, 3.2e-6)] == ["-0.0123", "+3e-06"]
    spread = rp.spread_frame(BASE, _frame({("DCMFG", 0): (0.80 + 3e-6, 0.78, 60)}), LABELS)
    table = rp.shown(rp.spread_table(spread, LABELS))
    assert table.loc[0, "I->T mean difference"] == "+3e-06" and table.loc[0, "T->I max |difference|"] == "0"
    assert rp.shown(spread).loc[0, "I->T difference"] == "+3e-06"


def test_shift_figure_draws_one_dot_per_seed_and_arm():
    rerun = _frame({(a, s): (0.8, 0.8, 60 + s) for a in ("DCMFG", "layers=0") for s in range(3)})
    spread = rp.spread_frame(BASE, rerun, LABELS)
    fig = rp.shift_figure(spread, LABELS)
    for ax in fig.axes:
        dots = sum(len(line.get_xdata()) for line in ax.get_lines() if line.get_marker() == "o")
        assert dots == 6
    import matplotlib.pyplot as plt

    plt.close(fig)


# ------------------------------------------------------------------------------------------ a real rerun
TINY = {"dataset": "synthetic", "synthetic_n": 48, "seeds": [0], "epochs": 2, "patience": 2,
        "settings": {"train.batch_size": 16, "graph.k": 4, "model.dim": 64, "model.hidden": 64}}


@pytest.fixture
def tiny_study(tmp_path, monkeypatch):
    shared = Path(os.environ["DCMFG_CACHE"])
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("weights", "features"):
        (shared / name).mkdir(exist_ok=True)
        (cache / name).symlink_to(shared / name, target_is_directory=True)
    monkeypatch.setenv("DCMFG_CACHE", str(cache))
    return study.Study.from_parameters(TINY)


@pytest.mark.slow
def test_the_same_run_trained_twice_is_bit_identical_and_threads_make_another_run(tiny_study):
    table = bx.rerun_check(tiny_study, "dcmfg", 0, {"train.epochs": 2})
    assert bx.bit_identical(table), table.to_string()
    assert "trained weights (every element of the selected checkpoint)" in set(table["compared"])
    assert table.set_index("compared")["values"].min() > 0
    # the perturbation is a run of its own (threads are part of a run's identity), not the cached one read back
    assert tiny_study.run_dir("dcmfg", 0, rp.PERTURBATION)[1] != tiny_study.run_dir("dcmfg", 0)[1]
