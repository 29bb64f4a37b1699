"""MIRFlickr-25K: the official raw layout and the .mat variants of peer code (DJSRH cleared set, DCMH FLICKR-25K.mat).

Raw layout (docs/data.md): `mirflickr/im<ID>.jpg`, `mirflickr/meta/tags/tags<ID>.txt`, `mirflickr/doc/common_tags.txt`
and `mirflickr25k_annotations_v080/<concept>.txt` (1-based ids). Labels are the 24 concepts in alphabetical order;
`*_r1.txt` and README.txt are ignored. A text is the item's common tags (those in common_tags.txt) joined by spaces
in file order. The cleaned protocol (default) keeps ids with >= 1 label and >= 1 common tag (20,015 pairs in the
full release); `cleaned=False` keeps every labelled id (24,581). Tag and id files are read as UTF-8: a byte that is
not is an error naming file and line (dcmfg.data.textfiles), never a replacement character.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from . import matfiles
from .base import CrossModalDataset, DatasetError, LayoutError
from .discover import dataset_folder, dirs_near, mat_files
from .textfiles import not_utf8

CONCEPTS = [
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake", "male",
    "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures", "sunset", "transport",
    "tree", "water",
]  # fmt: skip
_IMAGE_RE = re.compile(r"im(\d+)\.jpg$")
# .mat file names (lower-case) of each variant
DJSRH_FILES = {"images": "mirflickr25k-iall.mat", "tags": "mirflickr25k-yall.mat", "labels": "mirflickr25k-lall.mat"}
DJSRH_NAMES = "mirflickr25k-fall.mat"
DCMH_FILE = "flickr-25k.mat"
FEATURE_FILE_RE = re.compile(r"mirflickr25k-(iall|xall)-.+\.mat$|mirflickr25k-xall\.mat$")
WORD_LIST_NAMES = ["yall_words.txt", "dcmh_yall_column_to_tag.tsv", "common_tags.txt", "TagList.txt"]


# ------------------------------------------------------------------------------------------------ detection


def _is_image_dir(d: Path) -> bool:
    return (d / "meta" / "tags").is_dir() or (d / "im1.jpg").is_file()


def _is_annotation_dir(d: Path) -> bool:
    return sum((d / f"{c}.txt").is_file() for c in CONCEPTS) >= 12


def find_raw(root, beside: bool = False) -> tuple[Path | None, Path | None]:
    """(image folder, annotation folder) of the raw layout under root (either may be None).

    beside=True: when root is the image folder itself, also look for the annotation folder next to it (loading
    accepts that; discovery does not, so that a dataset folder is reported once, as itself).
    """
    root = Path(root)
    dirs = dirs_near(root)
    images = next((d for d in dirs if d.name == "mirflickr" and _is_image_dir(d)), None)
    images = images or next((d for d in dirs if _is_image_dir(d)), None)
    annotations = next((d for d in dirs if d.name.startswith("mirflickr25k_annotations") and _is_annotation_dir(d)), None)
    annotations = annotations or next((d for d in dirs if _is_annotation_dir(d)), None)
    if beside and images is not None and annotations is None and images == root:  # root is mirflickr/ itself: look beside it
        annotations = next((d for d in dirs_near(root.parent, depth=1) if _is_annotation_dir(d)), None)
    return images, annotations


def detect_layout(root) -> str | None:
    """'raw', 'djsrh-mat', 'dcmh-mat', 'features-mat' (CNN features only: not loadable for images) or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    images, annotations = find_raw(root)
    if images is not None and annotations is not None:
        return "raw"
    mats = mat_files(root)
    if DCMH_FILE in mats:
        return "dcmh-mat"
    if DJSRH_FILES["labels"] in mats and (DJSRH_FILES["images"] in mats or DJSRH_FILES["tags"] in mats):
        return "djsrh-mat" if DJSRH_FILES["images"] in mats else "features-mat"
    if any(FEATURE_FILE_RE.search(name) for name in mats):
        return "features-mat"
    return None


# ------------------------------------------------------------------------------------------------ raw layout


def read_id_list(path: Path, max_id: int | None = None) -> np.ndarray:
    """1-based image ids, one a line (blank lines skipped). A malformed line is an error naming file and line."""
    ids = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                s = line.strip()
                if not s:
                    continue
                if not s.isdigit() or int(s) < 1 or (max_id is not None and int(s) > max_id):
                    raise DatasetError(f"{path}:{lineno}: malformed line {s!r} (expected a 1-based image id)")
                ids.append(int(s))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return np.asarray(ids, dtype=np.int64)


def read_common_tags(path: Path) -> list[str]:
    """The tag vocabulary of common_tags.txt (`<tag> <count>` lines), as it stands: no re-filtering by count."""
    if not path.is_file():
        raise LayoutError(
            f"{path} is missing: add mirflickr/doc/common_tags.txt (from mirflickr25k.zip), or load with tags='all'"
        )
    return matfiles.read_word_list(path)


def _read_tags(path: Path) -> list[str]:
    """The tags of one image, one a line (UTF-8: a byte that is not is an error naming file and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [t for t in (ln.strip() for ln in f) if t]
    except FileNotFoundError:
        raise LayoutError(f"{path} is missing: the tag file of every labelled image is needed (mirflickr/meta/tags/)") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _load_raw(root: Path, cleaned: bool, tags: str) -> CrossModalDataset:
    img_dir, ann_dir = find_raw(root, beside=True)
    if img_dir is None:
        raise LayoutError(f"{root}: no MIRFlickr image folder (mirflickr/ with im<ID>.jpg and meta/tags/): extract mirflickr25k.zip here")
    if ann_dir is None:
        raise LayoutError(
            f"{root}: found MIRFlickr images at {img_dir} but no annotation folder: "
            "add mirflickr25k_annotations_v080/ (extract mirflickr25k_annotations_v080.zip here)"
        )
    missing = [f"{c}.txt" for c in CONCEPTS if not (ann_dir / f"{c}.txt").is_file()]
    if missing:
        raise LayoutError(f"{ann_dir}: annotation files missing: {', '.join(missing)}")

    image_ids = np.asarray(
        sorted(int(m.group(1)) for e in os.scandir(img_dir) if (m := _IMAGE_RE.fullmatch(e.name))), dtype=np.int64
    )
    if image_ids.size == 0:
        raise LayoutError(f"{img_dir}: no images im<ID>.jpg")
    row_of = np.full(int(image_ids.max()) + 1, -1, dtype=np.int64)
    row_of[image_ids] = np.arange(len(image_ids))

    labels = np.zeros((len(image_ids), len(CONCEPTS)), dtype=np.uint8)
    without_image = set()
    for j, concept in enumerate(CONCEPTS):  # alphabetical, never os.listdir order
        ids = read_id_list(ann_dir / f"{concept}.txt")
        known = ids[ids < len(row_of)]
        rows = row_of[known]
        without_image.update(ids[ids >= len(row_of)].tolist())
        without_image.update(known[rows < 0].tolist())
        labels[rows[rows >= 0], j] = 1

    vocab = None if tags == "all" else set(read_common_tags(img_dir / "doc" / "common_tags.txt"))
    labelled = np.flatnonzero(labels.any(1))
    keep, texts, n_no_tag = [], [], 0
    tag_dir = img_dir / "meta" / "tags"
    for r in labelled:
        words = _read_tags(tag_dir / f"tags{image_ids[r]}.txt")
        if vocab is not None:
            words = [w for w in words if w in vocab]
        if not words:
            n_no_tag += 1
            if cleaned:
                continue
        keep.append(r)
        texts.append(" ".join(words))
    keep = np.asarray(keep, dtype=np.int64)
    stats = {
        "images": int(len(image_ids)),
        "labelled": int(len(labelled)),
        "dropped_no_label": int(len(image_ids) - len(labelled)),
        "label_ids_without_image": len(without_image),
        "protocol": "cleaned" if cleaned else "all_labelled",
        "tags": tags,
    }
    stats["dropped_no_tag" if cleaned else "empty_text"] = n_no_tag
    return CrossModalDataset(
        name="mirflickr25k",
        root=root,
        layout="raw",
        ids=[f"im{image_ids[r]}" for r in keep],
        texts=texts,
        labels=labels[keep],
        label_names=list(CONCEPTS),
        image_paths=[img_dir / f"im{image_ids[r]}.jpg" for r in keep],
        stats=stats,
    )


# ------------------------------------------------------------------------------------------------ .mat variants


def _refuse_features(root: Path, mats: dict[str, Path]) -> None:
    feats = [p.name for n, p in mats.items() if FEATURE_FILE_RE.search(n)]
    raise LayoutError(
        f"{root}: holds only CNN features ({', '.join(feats) or 'no image file'}), no images, so it cannot feed the "
        f"ViT image encoder: add {DJSRH_FILES['images']} (key IAll) beside them, or use the raw layout"
    )


def _load_mat(root: Path, layout: str, word_list) -> CrossModalDataset:
    mats = mat_files(root)
    if layout == "features-mat":
        _refuse_features(root, mats)
    if layout == "dcmh-mat":
        path = mats[DCMH_FILE]
        img_key = matfiles.find_key(path, ["images", "IAll"])
        if img_key is None:
            raise LayoutError(f"{path}: no image variable (images or IAll): it cannot feed the image encoder")
        for key in ("YAll", "LAll"):
            if matfiles.find_key(path, [key]) is None:
                raise LayoutError(f"{path}: no variable {key}")
        spec = dict(
            images=(path, img_key),
            tags=(path, matfiles.find_key(path, ["YAll"])),
            labels=(path, matfiles.find_key(path, ["LAll"])),
            names=None,
        )
    else:
        missing = [f for f in DJSRH_FILES.values() if f not in mats]
        if missing:
            raise LayoutError(f"{root}: DJSRH cleared set incomplete: add {', '.join(missing)}")
        spec = dict(
            images=(mats[DJSRH_FILES["images"]], "IAll"),
            tags=(mats[DJSRH_FILES["tags"]], "YAll"),
            labels=(mats[DJSRH_FILES["labels"]], "LAll"),
            names=(mats[DJSRH_NAMES], "FAll") if DJSRH_NAMES in mats else None,
        )
        for p, key in (spec["images"], spec["tags"], spec["labels"]):
            if matfiles.find_key(p, [key]) is None:
                raise LayoutError(f"{p}: no variable {key} (has: {', '.join(matfiles.mat_keys(p))})")
    ds = matfiles.load_mat_set(
        name="mirflickr25k",
        root=root,
        layout=layout,
        label_names=list(CONCEPTS),
        word_list=word_list,
        word_names=WORD_LIST_NAMES,
        word_hint="e.g. yall_words.txt; DCMH's YAll columns are not in common_tags.txt order",
        **spec,
    )
    if Path(ds.stats["word_list"]).name in ("common_tags.txt", "TagList.txt"):
        # DCMH's YAll (which DJSRH's cleared set reuses) orders its columns by frequency with ties broken by first
        # occurrence: only 217 of 1,386 columns coincide with common_tags.txt, so such texts may name wrong tags.
        note = (
            f"{ds.stats['word_list']} names YAll's columns in vocabulary order, but DCMH / DJSRH YAll columns are in "
            "their own order: texts may name the wrong tags unless this list was made for this file "
            "(give a per-column list as yall_words.txt to silence this)"
        )
        ds.stats["word_list_warning"] = note
        warnings.warn(note, stacklevel=2)
    return ds


# ------------------------------------------------------------------------------------------------ entry point


def load_mirflickr(root=None, cleaned: bool = True, tags: str = "common", word_list=None, layout: str | None = None) -> CrossModalDataset:
    """Load MIRFlickr-25K from `root` (the dataset folder or a parent of it; None = look under DCMFG_DATA).

    cleaned: raw layout only; True keeps >= 1 label and >= 1 common tag, False every labelled image.
    tags: "common" (tags in common_tags.txt, the standard) or "all" (every tag in the tag files).
    word_list: for .mat variants, the file naming each bag-of-tags column.
    """
    if tags not in ("common", "all"):
        raise DatasetError(f"mirflickr25k: tags must be 'common' or 'all', got {tags!r}")
    root = dataset_folder("mirflickr25k", root)
    layout = layout or detect_layout(root)
    if layout is None and any(find_raw(root, beside=True)):
        layout = "raw"  # incomplete, or root is mirflickr/ itself: loading finds the rest or says what is missing
    if layout is None:
        raise LayoutError(
            f"{root}: no MIRFlickr-25K layout found: expected mirflickr/ + mirflickr25k_annotations_v080/ (raw), "
            f"{', '.join(DJSRH_FILES.values())} (DJSRH) or FLICKR-25K.mat (DCMH)"
        )
    if layout == "raw":
        return _load_raw(root, bool(cleaned), tags)
    return _load_mat(root, layout, word_list)
