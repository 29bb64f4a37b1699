"""Split protocols and split files: invariants, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from dcmfg.data import DatasetError, load_dataset
from dcmfg.data.splits import PROTOCOLS, load_split, make_split, save_split


@pytest.fixture(scope="module")
def syn():
    return load_dataset("synthetic", None, n=300, seed=0, image_size=16)


def _check_invariants(split, n):
    q, db, tr, va = (split[p] for p in ("query", "database", "train", "val"))
    assert np.array_equal(np.sort(np.concatenate([q, db])), np.arange(n))  # database = all but query
    assert len(np.intersect1d(q, db)) == 0
    assert np.isin(tr, db).all() and np.isin(va, db).all()  # train and val come from the database
    assert len(np.intersect1d(tr, va)) == 0  # train excludes val
    for idx in (q, db, tr, va):
        assert len(np.unique(idx)) == len(idx)


@pytest.mark.parametrize("protocol", ["random", "dcmh", "dcmht"])
def test_protocols_sizes_and_invariants(syn, protocol):
    s = make_split(syn, protocol, query=60, train=150, val=0.2, seed=1)
    _check_invariants(s, len(syn))
    assert s.sizes() == {"query": 60, "database": 240, "train": 120, "val": 30}
    s = make_split(syn, protocol, query=0.2, train=None, val=0.1, seed=1)  # fractions; train = whole database
    _check_invariants(s, len(syn))
    assert s.sizes() == {"query": 60, "database": 240, "train": 216, "val": 24}
    assert s.ids["query"] == [syn.ids[i] for i in s["query"]]


def test_dcmh_is_fixed_slices(syn):
    s = make_split(syn, "dcmh", query=50, train=100, val=10, seed=5)
    assert np.array_equal(s["query"], np.arange(50))
    assert np.array_equal(np.sort(np.concatenate([s["train"], s["val"]])), np.arange(50, 150))


def test_random_split_seeds_differ(syn):
    a, b = make_split(syn, seed=0), make_split(syn, seed=1)
    assert not np.array_equal(a["query"], b["query"])
    assert not np.array_equal(a["val"], b["val"])
    assert np.array_equal(a["query"], make_split(syn, seed=0)["query"])


def test_split_file_is_byte_identical_for_same_seed(syn, tmp_path):
    p1 = save_split(make_split(syn, "random", seed=7), tmp_path / "a.json")
    p2 = save_split(make_split(syn, "random", seed=7), tmp_path / "b.json")
    p3 = save_split(make_split(syn, "random", seed=8), tmp_path / "c.json")
    assert p1.read_bytes() == p2.read_bytes() != p3.read_bytes()
    back = load_split(p1, syn)
    orig = make_split(syn, "random", seed=7)
    assert back.protocol == "random" and back.seed == 7 and back.fingerprint == syn.fingerprint()
    for part in ("query", "database", "train", "val"):
        assert np.array_equal(back[part], orig[part]) and back.ids[part] == orig.ids[part]
    assert list(tmp_path.glob("*.tmp")) == []  # atomic write leaves no temp file


def test_load_split_refuses_other_dataset(syn, tmp_path):
    path = save_split(make_split(syn, seed=0), tmp_path / "s.json")
    other = load_dataset("synthetic", None, n=300, seed=1, image_size=16)
    with pytest.raises(DatasetError) as err:
        load_split(path, other)
    msg = str(err.value)
    assert str(path) in msg and syn.fingerprint() in msg and other.fingerprint() in msg


def test_load_split_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json"):
        load_split(bad)
    with pytest.raises(DatasetError, match="not found"):
        load_split(tmp_path / "missing.json")


def test_too_large_sizes_name_both_numbers(syn):
    with pytest.raises(DatasetError, match=r"query=2000.*300"):
        make_split(syn, query=2000)
    with pytest.raises(DatasetError, match=r"train=290.*240"):
        make_split(syn, query=60, train=290)
    with pytest.raises(DatasetError, match="fraction"):
        make_split(syn, query=1.5)
    with pytest.raises(DatasetError, match="unknown split protocol"):
        make_split(syn, protocol="nope")


def test_class_balanced_respects_per_class_counts(syn):
    s = make_split(syn, "class_balanced", query=10, train=20, val=0.1, seed=3)
    _check_invariants(s, len(syn))
    q_counts = syn.labels[s["query"]].sum(0)
    assert (q_counts >= 10).all()
    # greedy: a class already covered by earlier (rarer) picks adds nothing, so the query is small
    assert len(s["query"]) < 10 * syn.num_labels
    pool = np.concatenate([s["train"], s["val"]])
    assert (syn.labels[pool].sum(0) >= 20).all()
    # fractions are per class
    f = make_split(syn, "class_balanced", query=0.1, seed=3)
    assert (syn.labels[f["query"]].sum(0) >= np.round(0.1 * syn.labels.sum(0))).all()
    with pytest.raises(DatasetError, match="has only"):
        make_split(syn, "class_balanced", query=10_000)


def test_splits_work_for_any_dataset_size():
    tiny = load_dataset("synthetic", None, n=20, seed=0, image_size=16)
    for protocol in PROTOCOLS:
        size = 2 if protocol == "class_balanced" else 0.25
        _check_invariants(make_split(tiny, protocol, query=size, seed=0), 20)


def test_grouped_rows_stay_together(syn):
    """Rows sharing an image (several captions) land in one part; sizes count groups."""
    import dataclasses

    grouped = dataclasses.replace(syn, groups=np.arange(len(syn)) // 3)  # 100 groups of 3 rows
    for protocol in ("random", "dcmht", "dcmh"):
        s = make_split(grouped, protocol, query=20, train=50, val=10, seed=0)
        _check_invariants(s, len(syn))
        assert s.sizes() == {"query": 60, "database": 240, "train": 120, "val": 30}
        for a in ("query", "train", "val"):
            for b in ("query", "train", "val"):
                if a != b:
                    assert not set(grouped.groups[s[a]]) & set(grouped.groups[s[b]])
        assert not set(grouped.groups[s["query"]]) & set(grouped.groups[s["database"]])
    with pytest.raises(DatasetError, match=r"query=200.*100 groups"):
        make_split(grouped, query=200)
