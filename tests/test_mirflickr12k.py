"""The 12,274-pair real MIRFlickr-25K set (../shared/data-12k/mirflickr-12k): read in place, counted, split at the
MITH/DCMHT protocol size, and one tiny end-to-end run on a 300-item slice of it. Nothing here extracts the whole set:
the study's 12k edition does that (configs/study-mirflickr12k.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dcmfg.data import load_dataset
from dcmfg.data.splits import make_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root12k() -> Path:
    root = Path(os.environ.get("DCMFG_DATA_12K", REPO.parent / "shared" / "data-12k" / "mirflickr-12k"))
    if not (root / "mirflickr").is_dir():
        pytest.skip("the 12k MIRFlickr set is not here (../shared/data-12k/mirflickr-12k)")
    return root


@pytest.fixture(scope="module")
def ds12k(root12k):
    return load_dataset("mirflickr25k", root12k)


def test_the_12k_set_is_read_as_it_is(ds12k):
    assert len(ds12k) == 12274
    assert ds12k.labels.shape == (12274, 24)
    assert (ds12k.labels.sum(1) >= 1).all()  # the cleaned set: every pair has a label and a common tag
    assert min(len(t.split()) for t in ds12k.texts) >= 1


def test_the_protocol_split_sizes(ds12k):
    s = make_split(ds12k, protocol="random", query=2000, train=5000, val=0.1, seed=0)
    assert s.sizes() == {"query": 2000, "database": 10274, "train": 4500, "val": 500}
    q, db, tr, va = (set(s[p].tolist()) for p in ("query", "database", "train", "val"))
    assert not q & db and not tr & va and tr | va <= db


def _slice(root: Path, dest: Path, n: int) -> Path:
    """The first `n` items (by id) of the set in the same raw layout: images linked, tags and annotations filtered."""
    from dcmfg.data.mirflickr import CONCEPTS

    src_img, src_ann = root / "mirflickr", root / "mirflickr25k_annotations_v080"
    ids = sorted(int(p.stem[2:]) for p in src_img.glob("im*.jpg"))[:n]
    img, ann = dest / "mirflickr", dest / "mirflickr25k_annotations_v080"
    (img / "meta" / "tags").mkdir(parents=True)
    (img / "doc").mkdir()
    ann.mkdir()
    (img / "doc" / "common_tags.txt").symlink_to(src_img / "doc" / "common_tags.txt")
    for i in ids:
        (img / f"im{i}.jpg").symlink_to(src_img / f"im{i}.jpg")
        (img / "meta" / "tags" / f"tags{i}.txt").symlink_to(src_img / "meta" / "tags" / f"tags{i}.txt")
    keep = set(ids)
    for c in CONCEPTS:
        lines = [x for x in (src_ann / f"{c}.txt").read_text().split() if int(x) in keep]
        (ann / f"{c}.txt").write_text("".join(f"{x}\n" for x in lines))
    return dest


@pytest.mark.slow
def test_a_tiny_run_on_a_300_item_slice(root12k, tmp_path):
    from dcmfg.cli import main

    data = _slice(root12k, tmp_path / "slice", 300)
    assert len(load_dataset("mirflickr25k", data)) == 300
    split = tmp_path / "split.json"
    assert main(["data", "split", "mirflickr25k", "--root", str(data), "--query", "60", "--train", "200", "--val",
                 "0.1", "--seed", "0", "--out", str(split)]) == 0
    run = tmp_path / "run"
    sets = ["data.name=mirflickr25k", f"data.root={data}", f"data.split={split}", "train.epochs=2", "train.val_every=1",
            "train.progress=false", "model.dim=64", "model.hidden=128", "model.token_dim=32", "train.threads=1"]
    argv = ["train", "--config", str(REPO / "configs" / "dcmfg.yaml"), "--out", str(run)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    import json

    report = json.loads((run / "report.json").read_text())
    assert report["n_query"] == 60 and report["n_bank_pairs"] == 180
    assert 0 < report["map_i2t"] <= 1 and 0 < report["map_t2i"] <= 1
