"""MS-COCO in its official layout (docs/mscoco.md).

Layout read (2014 or 2017, never both at once):

    <root>/train2014/  <root>/val2014/                      image folders (or train2017/, val2017/)
    <root>/annotations/captions_train2014.json              images (id, file_name) + captions (image_id, caption)
    <root>/annotations/instances_train2014.json             categories + instance annotations (image_id, category_id)

Labels: the 80 categories with at least one instance on the image, columns in the order of the instances file's
`categories` list (ids 1..90 with gaps; the id is never used as a column index). Images without any instance are
dropped and counted in `stats["dropped_no_label"]`, as in the hashing literature. Rows are ordered by split
(train, then val) and image id.

Memory: an instances file is large because of the segmentation polygons. It is parsed with `json` and an
`object_hook` that turns every annotation into an (image_id, category_id) pair as soon as it is decoded, so the
polygons are freed at once (docs/mscoco.md has the measured peak). The pairs are then cached under
DCMFG_CACHE/mscoco, keyed by the file's SHA-256, so later loads skip the parse.

Captions (`captions=`): "first" (the lowest annotation id), "join" or "all" (one row per caption, rows of one image
in one group, ids "<image_id>#<k>"); the switch and the retrieval rules for groups are `dcmfg.data.captions`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from dcmfg.fileio import atomic_path
from dcmfg.paths import cache_dir

from .base import CrossModalDataset, DatasetError, LayoutError
from .captions import CAPTION_MODES, expand_captions
from .discover import dataset_folder
from .textfiles import not_utf8

_YEARS = ("2014", "2017")
_SPLITS = ("train", "val")


def _annotation_files(root: Path) -> dict[tuple[str, str], Path]:
    """(split, year) -> captions file, for every annotations/captions_<split><year>.json present."""
    found = {}
    ann = root / "annotations"
    if not ann.is_dir():
        return found
    for p in ann.iterdir():
        m = re.fullmatch(r"captions_(train|val)(2014|2017)\.json", p.name)
        if m:
            found[(m.group(1), m.group(2))] = p
    return found


def looks_like_coco(path) -> bool:
    """True when `path` holds an `annotations/captions_<train|val><2014|2017>.json` (the COCO layout)."""
    path = Path(path)
    return path.is_dir() and bool(_annotation_files(path))


# ---------------------------------------------------------------------------------------------------------------
# Parsing


def _read_json(path: Path, object_hook=None):
    try:
        with open(path, "rb") as f:
            return json.load(f, object_hook=object_hook)
    except FileNotFoundError:
        raise LayoutError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None


def _instance_pair(obj: dict):
    # Called for every decoded JSON object: an annotation becomes a small tuple, so its polygons are freed now.
    if "category_id" in obj and "image_id" in obj:
        return (obj["image_id"], obj["category_id"])
    return obj


def _read_instances(path: Path) -> tuple[list[int], list[str], np.ndarray]:
    """(category ids in file order, category names, (M, 2) int64 image_id/category_id pairs)."""
    data = _read_json(path, object_hook=_instance_pair)
    if not isinstance(data, dict) or "categories" not in data or "annotations" not in data:
        raise DatasetError(f"{path}: expected a COCO instances file with 'categories' and 'annotations'")
    cat_ids, cat_names = [], []
    for k, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"{path}: categories[{k}] lacks 'id' or 'name'")
        cat_ids.append(int(c["id"]))
        cat_names.append(str(c["name"]))
    if len(set(cat_ids)) != len(cat_ids):
        raise DatasetError(f"{path}: duplicate category ids in 'categories'")
    anns = data["annotations"]
    for k, a in enumerate(anns):
        if not isinstance(a, tuple):
            raise DatasetError(f"{path}: annotations[{k}] lacks 'image_id' or 'category_id'")
    pairs = np.asarray(anns, dtype=np.int64).reshape(-1, 2)
    return cat_ids, cat_names, pairs


def _cached_instances(path: Path) -> tuple[list[int], list[str], np.ndarray]:
    """`_read_instances`, cached under DCMFG_CACHE/mscoco keyed by the SHA-256 of the file's bytes.

    Every command (split, train, evaluate) loads the dataset and parsing a full instances file is slow, so the
    (image_id, category_id) pairs are kept. Hashing the content rather than trusting size + mtime means an edited
    file can never be answered from a stale entry.
    """
    h = hashlib.sha256(b"dcmfg-coco-instances/1")
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    key = h.hexdigest()[:24]
    cached = cache_dir() / "mscoco" / f"instances-{key}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                return z["cat_ids"].tolist(), z["cat_names"].tolist(), z["pairs"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: parse again and overwrite
    cat_ids, cat_names, pairs = _read_instances(path)
    with atomic_path(cached) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, cat_ids=np.asarray(cat_ids, dtype=np.int64), cat_names=np.asarray(cat_names, dtype=str), pairs=pairs)
    return cat_ids, cat_names, pairs


def _read_captions(path: Path) -> tuple[dict[int, str], dict[int, list[tuple[int, str]]]]:
    """(image id -> file name, image id -> [(annotation id, caption)])."""
    data = _read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{path}: expected a COCO captions file with 'images' and 'annotations'")
    files: dict[int, str] = {}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DatasetError(f"{path}: images[{k}] lacks 'id' or 'file_name'")
        files[int(im["id"])] = str(im["file_name"])
    caps: dict[int, list[tuple[int, str]]] = {}
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise DatasetError(f"{path}: annotations[{k}] lacks 'image_id' or 'caption'")
        image_id = int(a["image_id"])
        if image_id not in files:
            raise DatasetError(f"{path}: annotations[{k}] refers to image_id {image_id}, not in 'images'")
        text = " ".join(str(a["caption"]).split())  # COCO captions carry stray newlines and double spaces
        if text:
            caps.setdefault(image_id, []).append((int(a.get("id", k)), text))
    return files, caps


def _choose_year(root: Path, found: dict[tuple[str, str], Path], year: str | None) -> str:
    years = sorted({y for _, y in found})
    if year is not None:
        year = str(year)
        if year not in _YEARS:
            raise DatasetError(f"year={year!r} is not one of {', '.join(_YEARS)}")
        if year not in years:
            raise LayoutError(
                f"{root / 'annotations'}: no captions_train{year}.json or captions_val{year}.json "
                f"(found years: {', '.join(years) or 'none'})"
            )
        return year
    if len(years) > 1:
        # 2017 re-splits the same images as 2014: loading both would list every image twice.
        raise LayoutError(
            f"{root / 'annotations'}: holds both 2014 and 2017 annotations (the same images, split differently); "
            f"pass year='2014' or year='2017'"
        )
    return years[0]


def load_mscoco(
    root,
    captions: str = "first",
    year: str | None = None,
    splits: Sequence[str] = _SPLITS,
    missing_images: str = "error",
) -> CrossModalDataset:
    """Load COCO captions + instance labels from the official layout under `root`.

    captions: "first" | "join" | "all" (see dcmfg.data.captions for groups).
    year: "2014" or "2017"; needed only when both are present.
    splits: which of "train", "val" to read (those present; a listed split whose captions file is absent is an error
        only if nothing else is found, so a val-only download works).
    missing_images: "error" (default: name the first missing files) or "drop" (count in stats["dropped_missing_image"]).
    """
    root = dataset_folder("mscoco", root)  # None: the COCO folder found under DCMFG_DATA
    if captions not in CAPTION_MODES:
        raise DatasetError(f"captions={captions!r} is not one of {', '.join(CAPTION_MODES)}")
    if missing_images not in ("error", "drop"):
        raise DatasetError(f"missing_images={missing_images!r} is not 'error' or 'drop'")
    splits = [splits] if isinstance(splits, str) else list(splits)
    bad = [s for s in splits if s not in _SPLITS]
    if bad or not splits:
        raise DatasetError(f"splits={splits!r}: each must be one of {', '.join(_SPLITS)}")
    found = _annotation_files(root)
    if not found:
        raise LayoutError(
            f"{root}: not a COCO layout: no annotations/captions_<train|val><2014|2017>.json "
            f"(expected annotations/captions_train2014.json + instances_train2014.json and a train2014/ folder)"
        )
    year = _choose_year(root, found, year)
    use = [s for s in splits if (s, year) in found]
    if not use:
        raise LayoutError(f"{root / 'annotations'}: no captions file for {', '.join(s + year for s in splits)}")

    label_names: list[str] | None = None
    cat_ids: list[int] | None = None
    item_ids: list[str] = []
    item_caps: list[list[str]] = []
    item_paths: list[Path] = []
    label_rows: list[np.ndarray] = []
    stats = {"dropped_no_label": 0, "dropped_no_caption": 0, "dropped_missing_image": 0, "splits": []}
    for split in use:
        name = f"{split}{year}"
        cap_path = found[(split, year)]
        inst_path = root / "annotations" / f"instances_{name}.json"
        img_dir = root / name
        if not inst_path.is_file():
            raise LayoutError(f"{inst_path}: file not found (labels come from the instances file beside {cap_path.name})")
        if not img_dir.is_dir():
            raise LayoutError(f"{img_dir}: image folder not found (needed for {cap_path.name})")
        ids_here, names_here, pairs = _cached_instances(inst_path)
        if label_names is None:
            label_names, cat_ids = names_here, ids_here
        elif (names_here, ids_here) != (label_names, cat_ids):
            raise DatasetError(f"{inst_path}: category list differs from the one in instances_{use[0]}{year}.json")
        files, caps = _read_captions(cap_path)

        # Multi-hot labels, vectorised: map category ids to columns, image ids to rows of this split.
        col_of = np.full(max(cat_ids) + 1, -1, dtype=np.int64)
        col_of[np.asarray(cat_ids)] = np.arange(len(cat_ids))
        image_ids = np.asarray(sorted(files), dtype=np.int64)
        if len(pairs):
            bad_cat = (pairs[:, 1] < 0) | (pairs[:, 1] >= len(col_of))
            bad_cat[~bad_cat] = col_of[pairs[~bad_cat, 1]] < 0
            if bad_cat.any():
                raise DatasetError(f"{inst_path}: annotation category_id {int(pairs[bad_cat][0, 1])} is not in 'categories'")
            row = np.searchsorted(image_ids, pairs[:, 0])
            known = (row < len(image_ids)) & (image_ids[np.minimum(row, len(image_ids) - 1)] == pairs[:, 0])
            if not known.all():
                raise DatasetError(
                    f"{inst_path}: annotation image_id {int(pairs[~known][0, 0])} is not an image of {cap_path.name}"
                )
        labels = np.zeros((len(image_ids), len(cat_ids)), dtype=np.uint8)
        if len(pairs):
            labels[row, col_of[pairs[:, 1]]] = 1
        has_label = labels.any(axis=1)
        has_caption = np.fromiter((int(i) in caps for i in image_ids), dtype=bool, count=len(image_ids))
        stats["dropped_no_label"] += int((~has_label).sum())
        stats["dropped_no_caption"] += int((has_label & ~has_caption).sum())
        keep = has_label & has_caption

        # Existence via one directory listing (a stat per file is slow on network disks at COCO scale).
        present = {e.name for e in os.scandir(img_dir)}
        missing = [int(i) for i in image_ids[keep] if files[int(i)] not in present]
        if missing and missing_images == "error":
            shown = ", ".join(files[i] for i in missing[:5])
            raise LayoutError(
                f"{img_dir}: {len(missing)} image file(s) listed in {cap_path.name} are missing (e.g. {shown}); "
                f"pass missing_images='drop' to skip them"
            )
        if missing:
            keep &= ~np.isin(image_ids, np.asarray(missing, dtype=np.int64))
            stats["dropped_missing_image"] += len(missing)

        for r in np.flatnonzero(keep):
            image_id = int(image_ids[r])
            item_ids.append(str(image_id))
            item_caps.append([t for _, t in sorted(caps[image_id])])
            item_paths.append(img_dir / files[image_id])
        label_rows.append(labels[keep])
        stats["splits"].append(name)

    row_ids, texts, item, groups = expand_captions(item_ids, item_caps, captions)
    all_labels = np.concatenate(label_rows, axis=0) if label_rows else np.zeros((0, len(label_names)), np.uint8)
    stats["images"] = len(item_ids)
    stats["captions"] = captions
    return CrossModalDataset(
        name="mscoco",
        root=root,
        layout=f"coco{year}",
        ids=row_ids,
        texts=texts,
        labels=all_labels[item],
        label_names=list(label_names),
        image_paths=[item_paths[i] for i in item],
        groups=groups,
        stats=stats,
    )
