"""Split protocols (docs/data.md) and split files.

Parts, as index arrays into the dataset (each sorted ascending):
- `query`: touched only for the final report;
- `database`: every item not in the query (the retrieval set), per docs/data.md;
- `train`: drawn from the database; `val`: carved out of the training pool, and `train` excludes it.

Sizes are counts (int >= 1) or fractions (float in (0, 1)); no part may end up empty. `query` and `train`
fractions are of the whole dataset, `val` fractions are of the training pool; for `class_balanced`, `query` /
`train` are per class (a fraction is of that class's items). Split files are JSON with sorted keys and fixed
formatting, written atomically, so one seed gives a byte-identical file and every reader uses the same split.
Reading one back (`load_split`) checks every rule above against the dataset, so a hand-edited file that breaks
one (a query item in training, a repeated or non-integer index, ids of other items) is refused, never trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dcmfg.choices import SplitProtocol, values
from dcmfg.errors import writing
from dcmfg.fileio import write_text_atomic

from .base import CrossModalDataset, DatasetError
from .captions import group_units
from .textfiles import not_utf8

PROTOCOLS = values(SplitProtocol)
FORMAT = "dcmfg-split/1"
PART_NAMES = ("query", "database", "train", "val")


@dataclass
class Split:
    protocol: str
    seed: int
    dataset_name: str
    fingerprint: str
    parts: dict[str, np.ndarray]  # part name -> sorted int64 indices into the dataset
    ids: dict[str, list[str]]  # part name -> the items' ids, so a reader can check it has the same items
    n_items: int = 0
    requested: dict = field(default_factory=dict)  # the sizes asked for: {"query": 0.2, "train": None, "val": 0.1}

    def sizes(self) -> dict[str, int]:
        return {name: int(len(idx)) for name, idx in self.parts.items()}

    def __getitem__(self, part: str) -> np.ndarray:
        if part not in self.parts:
            raise KeyError(f"split has no part {part!r}; parts: {', '.join(self.parts)}")
        return self.parts[part]


def size_problem(part: str, size) -> str | None:
    """What is wrong with a requested size for `part` (query | train | val) before any data is seen; None if
    nothing. Every part must end up non-empty, so a count of 0 and a fraction of 0 or of 1 (which leaves nothing
    for the parts drawn after it) are refused; only `train` may be None (all of the database)."""
    if size is None:
        return None if part == "train" else "a size is required (a count or a fraction)"
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        return f"must be a count or a fraction, got {type(size).__name__}"
    fraction = isinstance(size, (float, np.floating))
    if fraction and not np.isfinite(size):
        return "a fraction must be a finite number in (0, 1)"
    if size <= 0:
        return {
            "query": "leaves the query part empty",
            "train": "leaves no training item",
            "val": "leaves the validation part empty (model selection needs it)",
        }.get(part, "leaves the part empty") + (" (a fraction must be in (0, 1))" if fraction else " (a count must be >= 1)")
    if fraction and size >= 1:
        return {
            "query": "leaves no item for the database and training (a fraction must be in (0, 1))",
            "train": "is more than the database, which excludes the query (a fraction must be in (0, 1); "
            "none means all of the database)",
            "val": "takes the whole training pool and leaves no training item (a fraction must be in (0, 1))",
        }.get(part, "a fraction must be in (0, 1)")
    return None


def _count(size, total: int, what: str, of: str) -> int:
    """A size already checked by `size_problem` as a count: a fraction of `total` (rounded), or a count that must
    not exceed `total` (an error naming both numbers)."""
    if isinstance(size, (float, np.floating)):
        return int(round(float(size) * total))
    if size > total:
        raise DatasetError(f"{what}={size} asked but {of} has only {total}")
    return int(size)


def _carve_val(pool: np.ndarray, val, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split the training pool into (train, val) by a seeded draw."""
    n_val = _count(val, len(pool), "val", "the training pool")
    if n_val >= len(pool) and len(pool) > 0:
        raise DatasetError(f"val={n_val} would leave no training items (training pool has {len(pool)})")
    order = rng.permutation(len(pool))
    return pool[order[n_val:]], pool[order[:n_val]]


def _class_balanced(labels: np.ndarray, names: list[str], candidates: np.ndarray, per_class, rng, what: str) -> np.ndarray:
    """Greedy, rarest class first: add random candidates of class c until c has its count among those chosen."""
    cand_labels = labels[candidates].astype(bool)
    freq = cand_labels.sum(0)
    chosen = np.zeros(len(candidates), dtype=bool)
    for c in np.argsort(freq, kind="stable"):
        want = _count(per_class, int(freq[c]), f"{what} per class", f"class {names[c]!r} among the {what} candidates")
        have = int((chosen & cand_labels[:, c]).sum())
        if have >= want:
            continue
        free = np.flatnonzero(cand_labels[:, c] & ~chosen)
        chosen[rng.permutation(free)[: want - have]] = True
    return candidates[chosen]


def _units(dataset: CrossModalDataset) -> tuple[np.ndarray, np.ndarray]:
    """(unit index of each row, unit labels): units are rows, or caption groups in order of first appearance."""
    n = len(dataset)
    if dataset.groups is None:
        return np.arange(n, dtype=np.int64), dataset.labels
    first, unit_of_row = group_units(dataset.groups)
    unit_labels = np.zeros((len(first), dataset.labels.shape[1]), dtype=np.uint8)
    np.maximum.at(unit_labels, unit_of_row, dataset.labels)
    return unit_of_row, unit_labels


def make_split(
    dataset: CrossModalDataset,
    protocol: str = "random",
    query=0.2,
    train=None,
    val=0.1,
    seed: int = 0,
) -> Split:
    """Draw a split of `dataset` under `protocol` (random | dcmh | dcmht | class_balanced).

    train=None means the whole database is the training pool. Validation is always a seeded draw from the pool.
    """
    if protocol not in PROTOCOLS:
        raise DatasetError(f"unknown split protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    for part, size in (("query", query), ("train", train), ("val", val)):
        problem = size_problem(part, size)
        if problem:
            raise DatasetError(f"{part}={size!r} {problem}")
    # Rows that share an image (several captions) are drawn as one unit, so a query's siblings never sit in the
    # database or in training; sizes then count groups (images).
    unit_of_row, unit_labels = _units(dataset)
    n = len(unit_labels)
    all_idx = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    what = f"{dataset.name} ({n} {'items' if dataset.groups is None else 'groups'})"

    if protocol == "class_balanced":
        if query is None:
            raise DatasetError("class_balanced: a per-class query size is required")
        q_idx = _class_balanced(unit_labels, dataset.label_names, all_idx, query, rng, "query")
        database = np.setdiff1d(all_idx, q_idx)
        pool = database if train is None else _class_balanced(unit_labels, dataset.label_names, database, train, rng, "train")
    else:
        n_query = _count(query, n, "query", what)
        if protocol == "dcmh":  # fixed slices: query = first rows, train = the next rows
            order = all_idx
        elif protocol == "dcmht":  # DCHMT's code: one legacy-seeded permutation, train = the rows after the query
            order = np.random.RandomState(seed).permutation(n).astype(np.int64)
        else:  # random (torchcmh, MITH): one seeded permutation
            order = rng.permutation(n).astype(np.int64)
        q_idx = order[:n_query]
        database = np.sort(order[n_query:])
        n_train = len(database) if train is None else _count(train, n, "train", what)
        if n_train > len(database):
            raise DatasetError(f"train={n_train} asked but the database (all but the {n_query} queries) has {len(database)}")
        pool = order[n_query : n_query + n_train]
    if not len(q_idx):  # a fraction too small for this dataset
        raise DatasetError(f"query={query!r} gives an empty query part for {what}")
    if not len(database):  # class_balanced: every item was drawn into the query
        raise DatasetError(f"query={query!r} leaves no item for the database of {what}")
    if not len(pool):
        raise DatasetError(f"train={train!r} gives an empty training pool for {what}")
    train_idx, val_idx = _carve_val(np.asarray(pool, dtype=np.int64), val, rng)
    if not len(val_idx):
        raise DatasetError(f"val={val!r} gives an empty validation part (the training pool has {len(pool)} items)")
    parts = {
        name: np.flatnonzero(np.isin(unit_of_row, units)).astype(np.int64)
        for name, units in (("query", q_idx), ("database", database), ("train", train_idx), ("val", val_idx))
    }
    return Split(
        protocol=protocol,
        seed=int(seed),
        dataset_name=dataset.name,
        fingerprint=dataset.fingerprint(),
        parts=parts,
        ids={name: [dataset.ids[i] for i in idx] for name, idx in parts.items()},
        n_items=len(dataset),
        requested={"query": query, "train": train, "val": val, "unit": "row" if dataset.groups is None else "group"},
    )


def split_to_json(split: Split) -> str:
    obj = {
        "format": FORMAT,
        "protocol": split.protocol,
        "seed": split.seed,
        "dataset": split.dataset_name,
        "fingerprint": split.fingerprint,
        "n_items": split.n_items,
        "requested": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in split.requested.items()},
        "sizes": split.sizes(),
        "parts": {name: [int(i) for i in idx] for name, idx in split.parts.items()},
        "ids": {name: list(ids) for name, ids in split.ids.items()},
    }
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n"


def save_split(split: Split, path) -> Path:
    """Write the split file atomically. A write the disk refuses (full, read-only, a folder in the way) is one
    `WriteFailed` naming the file and the OS error; a file already at `path` is left as it was."""
    path = Path(path)
    with writing(path):
        write_text_atomic(path, split_to_json(split))
    return path


def load_split(path, dataset: CrossModalDataset | None = None) -> Split:
    """Read a split file and check it (see `check_split`); with `dataset`, also against that dataset.

    Every problem is a one-line DatasetError naming the file, the part and the first offending index: a split that
    leaks query items into training, repeats an item or points at other items would otherwise score silently wrong.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: split file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, not a split file") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not a split file (invalid JSON: {exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a split file (format {obj.get('format') if isinstance(obj, dict) else None!r}, expected {FORMAT!r})")
    missing = [k for k in ("protocol", "seed", "dataset", "fingerprint", "parts", "ids", "n_items") if k not in obj]
    if missing:
        raise DatasetError(f"{path}: split file lacks {', '.join(missing)}")
    obj.setdefault("requested", None)
    for key, types, what in (
        ("parts", dict, "a mapping of part name to index list"),
        ("ids", dict, "a mapping of part name to id list"),
        ("n_items", int, "an integer"),
        ("seed", int, "an integer"),
        ("protocol", str, "a string"),
        ("dataset", str, "a string"),
        ("fingerprint", str, "a string"),
        ("requested", (dict, type(None)), "a mapping of part name to the size asked for"),
    ):
        if not isinstance(obj[key], types) or isinstance(obj[key], bool):
            raise DatasetError(f"{path}: {key!r} must be {what}, got {type(obj[key]).__name__}")
    n = obj["n_items"]
    parts = {}
    order = [p for p in PART_NAMES if p in obj["parts"]] + sorted(set(obj["parts"]) - set(PART_NAMES))
    for name in order:
        parts[name] = _indices(path, name, obj["parts"][name], n)
        ids = obj["ids"].get(name)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DatasetError(f"{path}: ids of part {name!r} must be a list of strings (the items' ids)")
        if len(ids) != len(parts[name]):
            raise DatasetError(f"{path}: part {name!r} has {len(parts[name])} indices but {len(ids)} ids")
    stray = sorted(set(obj["ids"]) - set(parts))
    if stray:
        raise DatasetError(f"{path}: ids has an entry for {stray[0]!r}, which is not a part")
    split = Split(
        protocol=obj["protocol"],
        seed=obj["seed"],
        dataset_name=obj["dataset"],
        fingerprint=obj["fingerprint"],
        parts=parts,
        ids={k: list(obj["ids"][k]) for k in parts},
        n_items=n,
        requested=dict(obj.get("requested") or {}),
    )
    check_split(split, dataset, where=str(path))
    return split


def _indices(path, name: str, idx, n: int) -> np.ndarray:
    """A part's index list as int64, refusing anything but distinct integers in 0..n-1 (a float is never
    truncated: 3.5 or "3" in a hand-edited file is a mistake to report, not a row to guess)."""
    if not isinstance(idx, list):
        raise DatasetError(f"{path}: part {name!r} must be a list of indices, got {type(idx).__name__}")
    if set(map(type, idx)) - {int}:  # bool is not int here: type(True) is bool
        k = next(k for k, x in enumerate(idx) if type(x) is not int)
        raise DatasetError(f"{path}: part {name!r}, position {k}: {idx[k]!r} is not an integer index")
    try:
        arr = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.flatnonzero((arr < 0) | (arr >= n))
    except OverflowError:  # beyond int64: certainly out of range
        out = [next(k for k, x in enumerate(idx) if not 0 <= x < n)]
    if len(out):
        k = int(out[0])
        raise DatasetError(f"{path}: part {name!r}, position {k}: index {idx[k]} is outside 0..{n - 1}")
    _, first = np.unique(arr, return_index=True)
    if len(first) < len(arr):
        seen = np.zeros(len(arr), dtype=bool)
        seen[first] = True
        k = int(np.flatnonzero(~seen)[0])
        before = int(np.flatnonzero(arr[:k] == arr[k])[0])
        raise DatasetError(f"{path}: part {name!r}, position {k}: index {arr[k]} is listed twice (also at position {before})")
    return arr


# (part a, part b, why): b may hold no item of a
DISJOINT = (
    ("query", "database", "the database is what a query retrieves from, and must not contain the query items"),
    ("query", "train", "query items are for the final report only and must never be trained on"),
    ("query", "val", "model selection must not see query items"),
    ("val", "train", "validation items must be held out of training"),
)
# (part, container): every item of part is in container
CONTAINED = (("train", "database"), ("val", "database"))


def check_split(split: Split, dataset: CrossModalDataset | None = None, where: str = "split") -> None:
    """Refuse a split whose parts break the protocol (docs/data.md), and with `dataset`, one made for other data.

    Parts: query, database, train and val present; query disjoint from database, train and val; train and val
    disjoint and inside the database; for the protocols made here (random, dcmh, dcmht, class_balanced) the
    database is every item not in the query. With a dataset: same fingerprint and size, ids match the items at
    those indices, and caption groups (several captions of one image) never straddle parts.
    """
    n = split.n_items
    absent = [p for p in PART_NAMES if p not in split.parts]
    if absent:
        raise DatasetError(f"{where}: split lacks part(s) {', '.join(absent)}; a split needs {', '.join(PART_NAMES)}")
    for name in PART_NAMES:
        if not len(split.parts[name]):
            raise DatasetError(f"{where}: part {name!r} is empty")
    masks = {name: _mask(idx, n) for name, idx in split.parts.items()}

    def refuse(name: str, hit: np.ndarray, what: str):
        k = int(np.flatnonzero(hit)[0])
        v = int(split.parts[name][k])
        item = f" ({split.ids[name][k]!r})" if name in split.ids and k < len(split.ids[name]) else ""
        raise DatasetError(f"{where}: part {name!r}, position {k}: index {v}{item} {what}")

    for a, b, why in DISJOINT:
        hit = masks[a][split.parts[b]]
        if hit.any():
            refuse(b, hit, f"is also in part {a!r}; {why}")
    for part, container in CONTAINED:
        hit = ~masks[container][split.parts[part]]
        if hit.any():
            refuse(part, hit, f"is not in part {container!r}; {part} is drawn from the database")
    if split.protocol in PROTOCOLS:
        left = np.flatnonzero(~(masks["query"] | masks["database"]))
        if len(left):
            raise DatasetError(
                f"{where}: part 'database' lacks index {int(left[0])}, which is not in the query either; under "
                f"protocol {split.protocol!r} the database is every item not in the query"
            )
    if dataset is None:
        return
    fp = dataset.fingerprint()
    if fp != split.fingerprint:
        raise DatasetError(
            f"{where}: split was made for dataset {split.dataset_name!r} with fingerprint {split.fingerprint}, "
            f"but the given dataset {dataset.name!r} has fingerprint {fp}; make a new split for it"
        )
    if n != len(dataset):
        raise DatasetError(f"{where}: split is for {n} items but dataset {dataset.name!r} has {len(dataset)}")
    ds_ids = np.asarray(dataset.ids, dtype=object)
    for name, idx in split.parts.items():
        wrong = ds_ids[idx] != np.asarray(split.ids[name], dtype=object)
        if wrong.any():
            k = int(np.flatnonzero(wrong)[0])
            raise DatasetError(
                f"{where}: part {name!r}, position {k}: index {int(idx[k])} is item {ds_ids[idx[k]]!r} in the "
                f"dataset, but the split file names it {split.ids[name][k]!r}"
            )
    if dataset.groups is not None:
        _, group = np.unique(np.asarray(dataset.groups), return_inverse=True)
        group = group.reshape(-1)
        size = np.bincount(group)
        for name, idx in split.parts.items():
            inside = np.bincount(group[idx], minlength=len(size))
            straddles = (inside > 0) & (inside < size)
            hit = straddles[group[idx]]
            if hit.any():
                k = int(np.flatnonzero(hit)[0])
                v = int(idx[k])
                sibling = int(np.flatnonzero((group == group[v]) & ~masks[name])[0])
                raise DatasetError(
                    f"{where}: part {name!r}, position {k}: index {v} ({split.ids[name][k]!r}) shares its image with "
                    f"index {sibling}, which is not in part {name!r}; the captions of one image stay in one part"
                )


def _mask(idx: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[idx] = True
    return m
