"""Split protocols (data.md) and split files.

Parts, as index arrays into the dataset (each sorted ascending):
- `query`: touched only for the final report;
- `database`: every item not in the query (the retrieval set), per data.md;
- `train`: drawn from the database; `val`: carved out of the training pool, and `train` excludes it.

Sizes are counts (int) or fractions (float in (0, 1]). `query` and `train` fractions are of the whole dataset,
`val` fractions are of the training pool; for `class_balanced`, `query` / `train` are per class (a fraction
is of that class's items). Split files are JSON with sorted keys and fixed formatting, written atomically, so
one seed gives a byte-identical file and every reader uses the same split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .base import CrossModalDataset, DatasetError

PROTOCOLS = ("random", "dcmh", "dcmht", "class_balanced")
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


def _count(size, total: int, what: str, of: str) -> int:
    """A size (int count or float fraction of `total`) as a count; more than exists is an error naming both."""
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise DatasetError(f"{what}: size must be a count or a fraction, got {size!r}")
    if isinstance(size, (float, np.floating)):
        if not 0.0 < size <= 1.0:
            raise DatasetError(f"{what}: a fraction must be in (0, 1], got {size}")
        return int(round(float(size) * total))
    size = int(size)
    if size < 0:
        raise DatasetError(f"{what}: a count must be >= 0, got {size}")
    if size > total:
        raise DatasetError(f"{what}={size} asked but {of} has only {total}")
    return size


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
    g = np.asarray(dataset.groups, dtype=np.int64)
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    unit_of_row = rank[inverse.reshape(-1)]
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
    train_idx, val_idx = _carve_val(np.asarray(pool, dtype=np.int64), val, rng)
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


from dcmfg.fileio import write_text_atomic  # noqa: E402  (re-exported: older callers import it here)


def save_split(split: Split, path) -> Path:
    path = Path(path)
    write_text_atomic(path, split_to_json(split))
    return path


def load_split(path, dataset: CrossModalDataset | None = None) -> Split:
    """Read a split file; with `dataset`, refuse one made for different data (names both fingerprints)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: split file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a split file (invalid JSON: {exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a split file (format {obj.get('format') if isinstance(obj, dict) else None!r}, expected {FORMAT!r})")
    missing = [k for k in ("protocol", "seed", "dataset", "fingerprint", "parts", "ids", "n_items") if k not in obj]
    if missing:
        raise DatasetError(f"{path}: split file lacks {', '.join(missing)}")
    n = int(obj["n_items"])
    parts = {}
    order = [p for p in PART_NAMES if p in obj["parts"]] + sorted(set(obj["parts"]) - set(PART_NAMES))
    for name in order:
        idx = obj["parts"][name]
        arr = np.asarray(idx, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise DatasetError(f"{path}: part {name!r} has indices outside 0..{n - 1}")
        if len(obj["ids"].get(name, [])) != len(arr):
            raise DatasetError(f"{path}: part {name!r} has {len(arr)} indices but {len(obj['ids'].get(name, []))} ids")
        parts[name] = arr
    split = Split(
        protocol=obj["protocol"],
        seed=int(obj["seed"]),
        dataset_name=obj["dataset"],
        fingerprint=obj["fingerprint"],
        parts=parts,
        ids={k: list(v) for k, v in obj["ids"].items()},
        n_items=n,
        requested=dict(obj.get("requested", {})),
    )
    if dataset is not None:
        fp = dataset.fingerprint()
        if fp != split.fingerprint:
            raise DatasetError(
                f"{path}: split was made for dataset {split.dataset_name!r} with fingerprint {split.fingerprint}, "
                f"but the given dataset {dataset.name!r} has fingerprint {fp}; make a new split for it"
            )
    return split
