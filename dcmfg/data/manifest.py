"""Bring-your-own data: a JSONL or CSV manifest, one image-text item a line.

    {"image": "photos/cat.jpg", "text": "a cat on a sofa", "labels": ["cat", "indoor"]}        (JSONL)
    {"image": "photos/dog.jpg", "text": ["a dog", "a brown dog running"], "labels": ["dog"]}

    image,text,labels                                                                          (CSV, header first)
    photos/cat.jpg,a cat on a sofa,cat|indoor

Columns: `image` (path relative to the manifest's folder, and inside it once `..` and symlinks are resolved),
`text` (JSONL: a string or a list of captions; CSV: one string), `labels` (JSONL: a list of names; CSV: names
separated by `|`), and optionally `id` (a unique item name; default the image path). Several captions follow the
`captions` switch ("first" | "join" | "all") and, for "all", carry `groups` exactly as MS-COCO does (see
dcmfg.data.captions for the retrieval rules).

Label order: first appearance in the manifest, unless a `label_names.txt` beside it (one name a line) fixes it.

The loader never guesses: a missing image, an empty text, an unknown column, an item without labels, a label not in
label_names.txt, a duplicate image or id, or a malformed line is reported as "<manifest>:<line>: what is wrong";
all problems are listed at once (up to 20) so a user fixes the file in one pass. A byte that is not UTF-8 (in the
manifest or label_names.txt) stops the load at once with "<file>:<line>: not UTF-8 text (byte 0x.. at column N)":
nothing is replaced (dcmfg.data.textfiles).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .base import CrossModalDataset, DatasetError, LayoutError
from .captions import CAPTION_MODES, expand_captions
from .discover import default_root
from .textfiles import not_utf8

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
REQUIRED = ("image", "text", "labels")
OPTIONAL = ("id",)
_MAX_SHOWN = 20


def looks_like_manifest(path) -> bool:
    """True for a .jsonl / .csv file, or a folder holding manifest.jsonl or manifest.csv."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in (".jsonl", ".csv")
    return path.is_dir() and any((path / n).is_file() for n in MANIFEST_NAMES)


def find_manifest(root) -> Path:
    """The manifest file named by `root`: the file itself, or the one manifest.jsonl / manifest.csv in a folder."""
    if root is None:  # the manifest folder found under DCMFG_DATA, as for the other datasets
        root = default_root("manifest")
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() not in (".jsonl", ".csv"):
            raise LayoutError(f"{root}: a manifest must end in .jsonl or .csv")
        return root
    if not root.exists():
        raise LayoutError(f"{root}: folder not found (a folder or a .jsonl / .csv manifest file was expected)")
    if not root.is_dir():
        raise LayoutError(f"{root}: neither a folder nor a .jsonl / .csv manifest file")
    present = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
    if not present:
        raise LayoutError(f"{root}: holds neither manifest.jsonl nor manifest.csv")
    if len(present) > 1:
        raise LayoutError(f"{root}: holds both manifest.jsonl and manifest.csv; pass the path of the one to use")
    return present[0]


def _read_label_names(path: Path) -> list[str]:
    names, seen = [], {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                name = line.strip()
                if not name:
                    continue
                if name in seen:
                    raise DatasetError(f"{path}:{lineno}: label {name!r} already listed at line {seen[name]}")
                seen[name] = lineno
                names.append(name)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not names:
        raise DatasetError(f"{path}: lists no label names")
    return names


def _jsonl_records(path: Path, problems: list[str]):
    """Yield (line number, dict) for each non-blank line; malformed lines go to `problems`."""
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(rec, dict):
                problems.append(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                continue
            yield lineno, rec


def _csv_records(path: Path, problems: list[str]):
    """Yield (line number, dict) for each CSV row; `labels` is split on '|' here."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            problems.append(f"{path}:1: empty file, expected a header line (image,text,labels)")
            return
        header = [h.strip() for h in header]
        unknown = [h for h in header if h not in REQUIRED + OPTIONAL]
        if unknown:
            problems.append(
                f"{path}:1: unknown column(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(REQUIRED + OPTIONAL)}"
            )
        if len(set(header)) != len(header):
            problems.append(f"{path}:1: a column is named twice in the header")
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            problems.append(f"{path}:1: missing column(s) {', '.join(missing)}")
        if unknown or missing or len(set(header)) != len(header):
            return
        start = reader.line_num
        for row in reader:
            lineno = start + 1  # a quoted field may span lines: report where the record starts
            start = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                problems.append(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
                continue
            rec = dict(zip(header, row))
            rec["labels"] = [s for s in (p.strip() for p in rec["labels"].split("|")) if s]
            yield lineno, rec


def _check_text(value, where: str, problems: list[str]) -> list[str] | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        problems.append(f"{where}: 'text' must be a string or a list of strings")
        return None
    texts = [" ".join(t.split()) for t in value]
    if not texts or not all(texts):
        problems.append(f"{where}: empty text")
        return None
    return texts


def load_manifest(root, captions: str = "first") -> CrossModalDataset:
    """Load a JSONL / CSV manifest (a file, or a folder holding exactly one manifest.jsonl / manifest.csv)."""
    if captions not in CAPTION_MODES:
        raise DatasetError(f"captions={captions!r} is not one of {', '.join(CAPTION_MODES)}")
    path = find_manifest(root)
    folder = path.parent
    inside = folder.resolve()
    names_file = folder / "label_names.txt"
    fixed = _read_label_names(names_file) if names_file.is_file() else None
    label_index = {n: i for i, n in enumerate(fixed)} if fixed else {}
    label_names = list(fixed) if fixed else []

    problems: list[str] = []
    ids: list[str] = []
    caps: list[list[str]] = []
    paths: list[Path] = []
    item_labels: list[list[int]] = []
    seen_image: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    try:
        records = _csv_records(path, problems) if path.suffix.lower() == ".csv" else _jsonl_records(path, problems)
        for lineno, rec in records:
            where = f"{path}:{lineno}"
            unknown = [k for k in rec if k not in REQUIRED + OPTIONAL]
            if unknown:
                problems.append(
                    f"{where}: unknown column(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(REQUIRED + OPTIONAL)}"
                )
                continue
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                problems.append(f"{where}: missing {', '.join(missing)}")
                continue
            image = rec["image"]
            if not isinstance(image, str) or not image.strip():
                problems.append(f"{where}: 'image' must be a non-empty relative path")
                continue
            if Path(image).is_absolute():
                problems.append(f"{where}: image {image!r} must be relative to the manifest's folder {folder}")
                continue
            image_path = folder / image
            key = image_path.resolve()
            if not key.is_relative_to(inside):  # a dataset is its folder: what leaves it is neither copied nor cached
                problems.append(
                    f"{where}: image {image!r} resolves to {key}, outside the manifest's folder {inside} "
                    f"(.. and symlinks must stay inside it)"
                )
                continue
            if not image_path.is_file():
                problems.append(f"{where}: image file {image_path} not found")
                continue
            key = str(key)
            if key in seen_image:
                problems.append(
                    f"{where}: image {image!r} already listed at line {seen_image[key]} "
                    f"(give several captions as a list in one item)"
                )
                continue
            texts = _check_text(rec["text"], where, problems)
            if texts is None:
                continue
            labels = rec["labels"]
            if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
                problems.append(f"{where}: 'labels' must be a list of label names")
                continue
            labels = [s.strip() for s in labels if s.strip()]
            if not labels:
                problems.append(f"{where}: item has no labels")
                continue
            cols = []
            for s in labels:
                if s not in label_index:
                    if fixed is not None:
                        problems.append(f"{where}: label {s!r} is not in {names_file}")
                        cols = None
                        break
                    label_index[s] = len(label_names)
                    label_names.append(s)
                cols.append(label_index[s])
            if cols is None:
                continue
            item_id = str(rec.get("id", image)).strip()
            if not item_id:
                problems.append(f"{where}: empty id")
                continue
            if item_id in seen_id:
                problems.append(f"{where}: id {item_id!r} already used at line {seen_id[item_id]}")
                continue
            seen_image[key] = lineno
            seen_id[item_id] = lineno
            ids.append(item_id)
            caps.append(texts)
            paths.append(image_path)
            item_labels.append(cols)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: malformed CSV ({exc})") from None

    if len(problems) == 1:  # one problem, one line: it names the file and line already
        raise DatasetError(problems[0])
    if problems:
        shown = problems[:_MAX_SHOWN]
        more = f"\n... and {len(problems) - _MAX_SHOWN} more" if len(problems) > _MAX_SHOWN else ""
        raise DatasetError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(shown) + more)
    if not ids:
        raise DatasetError(f"{path}: lists no items")

    labels = np.zeros((len(ids), len(label_names)), dtype=np.uint8)
    rows = np.repeat(np.arange(len(ids)), [len(c) for c in item_labels])
    labels[rows, np.concatenate([np.asarray(c, dtype=np.int64) for c in item_labels])] = 1
    row_ids, texts, item, groups = expand_captions(ids, caps, captions)
    return CrossModalDataset(
        name="manifest",
        root=path,
        layout="manifest-csv" if path.suffix.lower() == ".csv" else "manifest-jsonl",
        ids=row_ids,
        texts=texts,
        labels=labels[item],
        label_names=label_names,
        image_paths=[paths[i] for i in item],
        groups=groups,
        stats={"items": len(ids), "captions": captions, "label_order": "label_names.txt" if fixed else "first appearance"},
    )
