"""Split protocols and split files: invariants, determinism, errors."""

from __future__ import annotations

import re

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


# ---------------------------------------------------------------------------------------------- hand-edited files


def _edited(syn, tmp_path, edit, dataset=None, train=None):
    """Save a seeded split of `syn`, apply `edit(obj)` to its JSON as a user would by hand, and load it back."""
    import json

    split = make_split(dataset or syn, "random", query=60, train=train, val=0.1, seed=2)
    path = save_split(split, tmp_path / "edited.json")
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    return load_split(path, dataset or syn)


def _move(obj, src, dst, k=0, ids=True):
    """Copy the k-th item of part `src` into part `dst` (with its id, so only the overlap is wrong)."""
    obj["parts"][dst].append(obj["parts"][src][k])
    if ids:
        obj["ids"][dst].append(obj["ids"][src][k])


def _set(obj, part, pos, value):
    obj["parts"][part][pos] = value


CASES = {
    "duplicate": (lambda o: _move(o, "train", "train", 3), r"part 'train', position \d+: index \d+ is listed twice \(also at position 3\)"),
    "query leaked into train": (lambda o: [_move(o, "query", "train", k) for k in range(5)], r"part 'train', position \d+: index \d+ \('syn\d+[^']*'\) is also in part 'query'"),
    "query in database": (lambda o: _move(o, "query", "database"), r"part 'database', position \d+: index \d+ .*is also in part 'query'"),
    "val in train": (lambda o: _move(o, "val", "train"), r"part 'train', position \d+: index \d+ .*is also in part 'val'"),
    "float index 3.0": (lambda o: _set(o, "train", 2, 3.0), r"part 'train', position 2: 3\.0 is not an integer index"),
    "float index 3.5": (lambda o: _set(o, "val", 0, 3.5), r"part 'val', position 0: 3\.5 is not an integer index"),
    "string index": (lambda o: _set(o, "query", 1, "7"), r"part 'query', position 1: '7' is not an integer index"),
    "bool index": (lambda o: _set(o, "query", 1, True), r"part 'query', position 1: True is not an integer index"),
    "out of range": (lambda o: _set(o, "database", 4, 300), r"part 'database', position 4: index 300 is outside 0\.\.299"),
    "huge index": (lambda o: _set(o, "database", 4, 2**70), r"part 'database', position 4: index 1180591620717411303424 is outside"),
    "negative": (lambda o: _set(o, "train", 0, -1), r"part 'train', position 0: index -1 is outside 0\.\.299"),
    "wrong id": (lambda o: o["ids"]["train"].__setitem__(5, "nope"), r"part 'train', position 5: index \d+ is item 'syn\d+[^']*' in the dataset, but the split file names it 'nope'"),
    "ids swapped": (lambda o: o["ids"]["query"].reverse(), r"part 'query', position 0: index \d+ is item 'syn\d+[^']*' in the dataset, but the split file names it"),
    "index without id": (lambda o: _move(o, "query", "train", ids=False), r"part 'train' has \d+ indices but \d+ ids"),
    "parts as a list": (lambda o: o.__setitem__("parts", list(o["parts"].values())), r"'parts' must be a mapping of part name to index list, got list"),
    "part as a mapping": (lambda o: o["parts"].__setitem__("val", {"0": 1}), r"part 'val' must be a list of indices, got dict"),
    "missing val": (lambda o: [o["parts"].pop("val"), o["ids"].pop("val")], r"split lacks part\(s\) val; a split needs query, database, train, val"),
    "empty val": (lambda o: [o["parts"].__setitem__("val", []), o["ids"].__setitem__("val", [])], r"part 'val' is empty"),
    "seed as text": (lambda o: o.__setitem__("seed", "two"), r"'seed' must be an integer, got str"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hand_edited_split_is_refused_in_one_line(syn, tmp_path, case):
    edit, message = CASES[case]
    with pytest.raises(DatasetError) as err:
        _edited(syn, tmp_path, edit)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "edited.json") + ": ")
    assert re.search(message, msg), msg


def test_dropped_database_item_is_refused(syn, tmp_path):
    """The protocols made here define the database as every item not in the query: none may go missing."""

    def drop(o):
        k = next(k for k, i in enumerate(o["parts"]["database"]) if i not in o["parts"]["train"] + o["parts"]["val"])
        o["parts"]["database"].pop(k)
        o["ids"]["database"].pop(k)

    with pytest.raises(DatasetError, match=r"part 'database' lacks index \d+, which is not in the query either"):
        _edited(syn, tmp_path, drop, train=150)

    def drop_train(o):  # train is drawn from the database: it must still be inside it
        k = o["parts"]["database"].index(o["parts"]["train"][0])
        o["parts"]["database"].pop(k)
        o["ids"]["database"].pop(k)

    with pytest.raises(DatasetError, match=r"part 'train', position 0: index \d+ .* is not in part 'database'"):
        _edited(syn, tmp_path, drop_train)


def test_caption_group_straddling_parts_is_refused(syn, tmp_path):
    import dataclasses

    grouped = dataclasses.replace(syn, groups=np.arange(len(syn)) // 3)

    def split_a_group(o):  # move one caption of a training image to validation
        i = next(i for i in o["parts"]["train"] if i % 3 == 0)
        k = o["parts"]["train"].index(i)
        o["parts"]["val"].append(o["parts"]["train"].pop(k))
        o["ids"]["val"].append(o["ids"]["train"].pop(k))

    with pytest.raises(DatasetError, match=r"part 'train', position \d+: index \d+ \('syn\d+[^']*'\) shares its image with index \d+, which is not in part 'train'"):
        _edited(syn, tmp_path, split_a_group, dataset=grouped)


def test_valid_split_still_loads_and_keeps_order(syn, tmp_path):
    """A hand-made split that follows the rules (unsorted, an extra part) loads as written."""
    s = _edited(syn, tmp_path, lambda o: [o["parts"]["train"].reverse(), o["ids"]["train"].reverse(),
                                           o["parts"].__setitem__("extra", [0]), o["ids"].__setitem__("extra", [syn.ids[0]])])
    assert s["train"][0] > s["train"][-1] and list(s.parts) == ["query", "database", "train", "val", "extra"]


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(query=0), r"query=0 leaves the query part empty \(a count must be >= 1\)"),
        (dict(query=0.0), r"query=0\.0 leaves the query part empty \(a fraction must be in \(0, 1\)\)"),
        (dict(query=1.0), r"query=1\.0 leaves no item for the database and training"),
        (dict(query=float("nan")), r"query=nan a fraction must be a finite number"),
        (dict(train=0), r"train=0 leaves no training item"),
        (dict(train=1.0), r"train=1\.0 is more than the database"),
        (dict(val=0), r"val=0 leaves the validation part empty"),
        (dict(val=1.0), r"val=1\.0 takes the whole training pool"),
        (dict(val=None), r"val=None a size is required"),
        (dict(query=0.001), r"query=0\.001 gives an empty query part for synthetic \(300 items\)"),
        (dict(val=0.001), r"val=0\.001 gives an empty validation part \(the training pool has 240 items\)"),
        (dict(protocol="class_balanced", query=1.0), r"query=1\.0 leaves no item"),
    ],
)
def test_sizes_that_leave_a_part_empty_are_refused(syn, sizes, message):
    with pytest.raises(DatasetError, match=message):
        make_split(syn, **sizes)
