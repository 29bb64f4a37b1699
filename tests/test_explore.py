"""Searching a trained run with new queries (dcmfg.search, `dcmfg search`) and the explorer's views
(dcmfg.study.explorer), on runs trained on the real MIRFlickr subset."""

from __future__ import annotations

import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcmfg.study import explorer as X
from dcmfg import search as Q
from dcmfg.config import load_config
from dcmfg.engine.evaluate import codes, embed_parts
from dcmfg.metrics import mean_average_precision

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow  # trains real runs: the complete suite's tier, not the edit-test loop

def trained_run(root, model: str, *overrides) -> Path:
    """A run trained for 2 epochs on the real subset, kept under the cache by a hash of its config (deterministic on
    CPU), so the test modules that need one (and later test sessions) share it."""
    import hashlib

    from dcmfg.paths import cache_dir
    from dcmfg.engine.train import train

    cfg = load_config(REPO / "configs" / f"{model}.yaml",
                      [f"data.root={root}", "train.epochs=2", "train.progress=false", *overrides])
    out = cache_dir() / "test-runs" / f"{model}-{hashlib.sha256(cfg.to_json().encode()).hexdigest()[:12]}"
    if not (out / "report.json").is_file():
        train(cfg, out)
    return out


@pytest.fixture(scope="module")
def dcmfg_run(mirflickr_root):
    return Q.cached_run(trained_run(mirflickr_root, "dcmfg"))


@pytest.fixture(scope="module")
def linear_run(mirflickr_root):
    return Q.cached_run(trained_run(mirflickr_root, "linear"))


def _cli(argv, capsys) -> tuple[int, str, str]:
    """`dcmfg search ...` as the command runs it (argument parsing, one-line user errors, exit code)."""
    from dcmfg.cli import main

    rc = main(["search", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _evaluation(run: Q.Run, distance: str = "cosine"):
    """What evaluation ranks: query and database embedded together (embed_parts), query split against database."""
    data = run.data
    q_idx = data.part("query")
    emb = embed_parts(run.model, data, run.train_idx, np.concatenate([q_idx, run.db_idx]))
    nq = len(q_idx)
    q = {m: {k: v[:nq] for k, v in e.items()} for m, e in emb.items()}
    db = {m: {k: v[nq:] for k, v in e.items()} for m, e in emb.items()}
    return q_idx, q, db


def _ranking(qcode: torch.Tensor, dbcode: torch.Tensor, distance: str):
    """Scores (higher = closer) and the stable order (ties to the lower database position), computed here
    independently of dcmfg.graph.knn."""
    if distance == "cosine":
        s = F.normalize(qcode, dim=1) @ F.normalize(dbcode, dim=1).T
    else:
        s = -(qcode.shape[1] - qcode @ dbcode.T) / 2
    order = torch.sort(-s[0], stable=True).indices
    return s[0], order


# ---------------------------------------------------------------------------------------------- the ranking


def test_text_of_a_query_item_ranks_as_evaluation_ranks_that_item(dcmfg_run, capsys):
    """`dcmfg search --text <a query item's tags>`: the run's text backbone encodes the words anew, yet the list
    (ids, labels) and the scores (to 1e-5) are evaluation's T->I ranking of that item."""
    run = dcmfg_run
    ds = run.dataset
    q_idx, q, db = _evaluation(run)
    top = 20
    checked = 0
    for j, i in enumerate(q_idx.tolist()):
        if len(ds.text(i).split()) < 2:
            continue
        s, order = _ranking(q["text"]["z"][j : j + 1], db["image"]["z"], "cosine")
        ref = s[order[: top + 1]]
        if bool((ref[:-1] - ref[1:] < 1e-5).any()):
            continue  # a near-tie inside the list: float noise may swap it; such items are left out
        rc, out, err = _cli(["--run", str(run.path), "--text", ds.text(i), "--top", str(top), "--json"], capsys)
        assert rc == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["rank"] for r in rows] == list(range(1, top + 1))
        want = run.db_idx[order[:top].numpy()]
        assert [r["id"] for r in rows] == [ds.ids[k] for k in want]
        names = np.asarray(ds.label_names)
        assert [r["labels"] for r in rows] == [", ".join(names[ds.labels[k] > 0]) for k in want]
        np.testing.assert_allclose([r["cosine"] for r in rows], ref[:top].numpy(), atol=1e-5, rtol=0)
        assert all(r["shares_label"] is None for r in rows)  # a free text has no labels
        checked += 1
        if checked == 3:
            break
    assert checked == 3, "no query item with a clear top-20 margin"


@pytest.mark.parametrize("distance", ["cosine", "hamming"])
def test_item_query_is_evaluations_full_ranking_and_its_ap(dcmfg_run, distance):
    """An item query reproduces evaluation's whole ranking (ties to the lower database position), and the AP of its
    relevance marks is the metrics' per-query AP."""
    run = dcmfg_run
    ds = run.dataset
    q_idx, q, db = _evaluation(run)
    picks = [0, len(q_idx) // 2, len(q_idx) - 1]
    ql, dl = run.data.labels[q_idx[picks]], run.data.labels[run.db_idx]
    for side, against in (("text", "images"), ("image", "texts")):
        qc = codes(q[side], distance)[picks]
        dc = codes(db["image" if side == "text" else "text"], distance)
        _, ap = mean_average_precision(qc, dc, ql, dl, distance=distance, return_per_query=True)
        for n, j in enumerate(picks):
            res = Q.search(run, item=ds.ids[int(q_idx[j])], against=against, distance=distance, top=len(run.db_idx))
            s, order = _ranking(qc[n : n + 1].float(), dc.float(), distance)
            rows, want_rows = res.table["row"].to_numpy(), run.db_idx[order.numpy()]
            got = res.table[distance].to_numpy(dtype=float)
            want = s[order].numpy() if distance == "cosine" else -s[order].numpy()
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            if distance == "hamming":  # integer distances: the very same order, ties included
                assert rows.tolist() == want_rows.tolist()
            else:  # float noise (1e-7) may swap two items whose scores differ by less than that, nothing else
                gap = np.diff(want)
                clear = np.r_[gap[:1] < -1e-6, (gap[:-1] < -1e-6) & (gap[1:] < -1e-6), gap[-1:] < -1e-6]
                assert clear.mean() > 0.8 and (rows[clear] == want_rows[clear]).all()
            rel = res.table["shares_label"].to_numpy(dtype=bool)
            hits = np.cumsum(rel)
            mine = float((hits / np.arange(1, len(rel) + 1))[rel].sum() / max(rel.sum(), 1))
            assert mine == pytest.approx(float(ap[n]), abs=1e-6 if distance == "hamming" else 1e-3)
            assert res.query.modality.key == side


def test_hamming_ties_go_to_the_lower_database_position(dcmfg_run):
    res = Q.search(dcmfg_run, item=dcmfg_run.dataset.ids[int(dcmfg_run.data.part("query")[3])], distance="hamming",
                   top=len(dcmfg_run.db_idx))
    pos = {r: p for p, r in enumerate(dcmfg_run.db_idx.tolist())}
    t = res.table.assign(pos=[pos[r] for r in res.table["row"]])
    assert (t["hamming"].diff().dropna() >= 0).all()
    tied = t.groupby("hamming")["pos"].apply(lambda p: bool((np.diff(p.to_numpy()) > 0).all()))
    assert tied.all() and (t.groupby("hamming").size() > 1).any()  # there are ties, each in position order


def test_image_file_of_an_item_ranks_as_the_item(dcmfg_run):
    """A query image read from disk and encoded by the run's image backbone gives the item's own ranking."""
    run = dcmfg_run
    i = int(run.data.part("query")[5])
    by_file = Q.search(run, image=run.dataset.image_paths[i], top=15)
    by_item = Q.search(run, item=run.dataset.ids[i], against="texts", top=15)
    assert by_file.query.modality.key == "image" and by_file.against == "texts"
    assert by_file.table["row"].tolist() == by_item.table["row"].tolist()
    np.testing.assert_allclose(by_file.table["cosine"], by_item.table["cosine"], atol=1e-5, rtol=0)


def test_query_is_embedded_independently_of_other_queries(dcmfg_run):
    a = Q.search(dcmfg_run, text="sunset over the sea", top=10)
    Q.search(dcmfg_run, text="a dog", top=10)
    Q.search(dcmfg_run, image=dcmfg_run.dataset.image_paths[0], top=10)
    b = Q.search(dcmfg_run, text="sunset over the sea", top=10)
    assert a.table.equals(b.table)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_queries_are_one_line_errors(dcmfg_run, tmp_path, capsys):
    run = str(dcmfg_run.path)
    bad = tmp_path / "photo.jpg"
    bad.write_text("not a jpeg")
    cases = [
        (["--text", "   "], r"query text is empty"),
        (["--image", str(bad)], re.escape(str(bad)) + r": cannot read the query image"),
        (["--image", str(tmp_path / "missing.png")], r"missing.png: cannot read the query image \(file not found\)"),
        (["--item", "no-such-id"], r"no item 'no-such-id' in mirflickr25k"),
        (["--text", "x", "--top", "0"], r"top must be >= 1"),
    ]
    for argv, pattern in cases:
        rc, out, err = _cli(["--run", run, *argv], capsys)
        assert rc == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), err
    rc, _, err = _cli(["--run", str(tmp_path / "nope"), "--text", "x"], capsys)
    assert rc == 2 and "run or checkpoint folder not found" in err


def test_plain_output_names_query_run_and_marks_relevance(dcmfg_run, capsys):
    item = dcmfg_run.dataset.ids[int(dcmfg_run.data.part("query")[0])]
    rc, out, _ = _cli(["--run", str(dcmfg_run.path), "--item", item, "--top", "5"], capsys)
    lines = out.splitlines()
    assert rc == 0 and f"item {item} (text) against" in lines[0] and "database images, cosine" in lines[0]
    assert len(lines) == 1 + 5 + 1
    assert all(re.match(r"\s+\d+ [+=-] \S+\s+\d\.\d{4}  \[", ln) for ln in lines[1:6]), lines


# ---------------------------------------------------------------------------------------------- the explorer's views


def test_result_cards_and_comparison_of_two_runs(dcmfg_run, linear_run):
    item = dcmfg_run.dataset.ids[int(dcmfg_run.data.part("query")[1])]
    a = Q.search(dcmfg_run, item=item, top=6)
    b = Q.search(linear_run, item=item, top=6)
    page = X.results_html(a)
    assert page.count('class="dcmfg-thumb"') == 6 and page.count("data:image/jpeg;base64,") == 6
    marks = len(re.findall(r"&#1000[37];", page))
    assert marks == 6 - int(a.table["is_query_item"].sum())
    both = X.compare_html(a, b, names=("dcmfg", "linear"))
    badges = re.findall(r'class="dcmfg-other-rank"[^>]*>(\w+): (\d+|&gt;6)', both)
    assert len(badges) == 12
    # each badge is the item's rank in the other list
    rank_b = dict(zip(b.table["row"], b.table["rank"]))
    want = [str(rank_b.get(r, "&gt;6")) for r in a.table["row"]]
    assert [v for name, v in badges[:6]] == want and {n for n, _ in badges[:6]} == {"linear"}


def test_region_word_map_and_neighbourhood_of_a_dcmfg_query(dcmfg_run):
    res = Q.search(dcmfg_run, text="sunset over the sea", top=5)
    rw = X.region_word_html(res, rank=2)
    assert "data:image/png;base64," in rw and f"result 2 ({res.table['id'][1]})" in rw
    nb = res.neighbours()
    assert set(nb["layer"]) == set(range(dcmfg_run.cfg.model.layers))
    bank = nb[nb["neighbour"] == "bank"]
    assert len(bank) >= 1 and set(bank["modality"]) <= {"image", "text"}
    assert set(nb.loc[nb["neighbour"] == "self", "edge"]) == {"self"}
    # attention of each layer sums to 1 over the query's in-edges (softmax per target)
    np.testing.assert_allclose(nb.groupby("layer")["alpha"].sum(), 1.0, atol=1e-5)
    # mutual/fallback as the model reports it, never guessed
    att = res.attention[0]
    if "mutual" in att:
        on_bank = att["bank_index"] >= 0
        want = np.where(att["mutual"][on_bank].numpy(), "mutual", "fallback")
        got = nb[(nb["layer"] == 0) & (nb["neighbour"] == "bank")]
        assert sorted(got["edge"]) == sorted(want)
    else:
        assert set(bank["edge"]) == {"unknown"}
    html = X.neighbourhood_html(res)
    assert "data:image/png;base64," in html and "<table" in html


def test_graph_free_run_says_it_has_no_graph_or_token_map(linear_run):
    res = Q.search(linear_run, text="sunset over the sea", top=3)
    assert res.neighbours().empty
    assert "no inference graph" in X.neighbourhood_html(res)
    assert "no region-word map" in X.region_word_html(res)


def test_live_explorer_updates_on_a_new_text_and_shows_errors(dcmfg_run, linear_run):
    pytest.importorskip("ipywidgets")
    ex = X.Explorer({"dcmfg": dcmfg_run.path, "linear": linear_run.path}, text="sunset over the sea", top=4)
    before = re.findall(r'src="(data:image/jpeg[^"]+)"', ex.results.value)
    assert len(before) == 8 and "dcmfg-other-rank" in ex.results.value  # two runs side by side
    ex.text.value = "snow mountain winter"
    after = re.findall(r'src="(data:image/jpeg[^"]+)"', ex.results.value)
    assert len(after) == 8 and after != before
    assert X.ERROR_CLASS not in ex.status.value and "region-word" in ex.details.value
    ex.detail.value = 3
    assert "result 3" in ex.details.value
    ex.run_b.value = "(none)"
    assert "dcmfg-other-rank" not in ex.results.value
    ex.distance.value = "hamming"
    assert "ham " in ex.results.value
    # an uploaded image: an image query against texts, the item's own ranking when it is an item's photo
    i = int(dcmfg_run.data.part("query")[2])
    photo = dcmfg_run.dataset.image_paths[i].read_bytes()
    ex.distance.value = "cosine"
    ex.upload.value = ({"name": "photo.jpg", "type": "image/jpeg", "size": len(photo), "content": memoryview(photo),
                        "last_modified": datetime.now(timezone.utc)},)
    assert ex.kind.value == "image" and "uploaded image" in ex.status.value
    assert ex._last["a"].table["row"].tolist() == Q.search(dcmfg_run, item=dcmfg_run.dataset.ids[i], against="texts",
                                                           top=4).table["row"].tolist()
    assert ex.results.value.count('class="dcmfg-text-result"') == 4
    ex.upload.value = ({"name": "notes.jpg", "type": "image/jpeg", "size": 3, "content": memoryview(b"abc"),
                        "last_modified": datetime.now(timezone.utc)},)
    assert X.ERROR_CLASS in ex.status.value and "notes.jpg: cannot read the image" in ex.status.value
    ex.text.value = "   "
    assert ex.results.value == ""
    ex.kind.value = "item"
    ex.item.value = "no-such-id"
    assert X.ERROR_CLASS in ex.status.value and "no item 'no-such-id'" in html.unescape(ex.status.value)
    assert ex.item.options[0] == dcmfg_run.dataset.ids[int(dcmfg_run.data.part("query")[0])]  # query split suggested
    ex.item.value = ex.item.options[0]
    assert X.ERROR_CLASS not in ex.status.value and len(re.findall(r"&#1000[37];", ex.results.value)) == 4
