"""NUS-WIDE: the official raw layout and the .mat variants of peer code, with the TC-21 / TC-10 concept sets.

Raw layout (docs/data.md): `ImageList/Imagelist.txt` (row order), `Groundtruth/AllLabels/Labels_<concept>.txt` (one 0/1
a line), `NUS_WID_Tags/AllTags1k.txt` (rows x 1,000 0/1) + `TagList1k.txt`, `Concepts81.txt` (concept order).
A text is the item's 1k-vocabulary tags in TagList1k order. Images are the user's own copy (the official URLs are
dead), found under `Flickr/`, `images/` or `image_root=`. The cleaned rule (default) keeps rows with >= 1 label of
the concept set and >= 1 tag; `cleaned=False` keeps every labelled row.

The 0/1 files are large (AllTags1k is 269,648 x 1,000): they are parsed with numpy in blocks of lines, and a
malformed line (the release has one: `-1130179`) is reported with its file and 1-based line number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import matfiles
from .base import CrossModalDataset, DatasetError, LayoutError
from .discover import dataset_folder, dirs_near, mat_files
from .textfiles import not_utf8

WORD_LIST_NAMES = ["TagList1k.txt"]

TC21 = [
    "animal", "beach", "buildings", "clouds", "flowers", "grass", "lake", "mountain", "ocean", "person", "plants",
    "reflection", "road", "rocks", "sky", "snow", "sunset", "tree", "vehicle", "water", "window",
]  # fmt: skip
# The 10 most frequent concepts in Concepts81 order: what DJSRH / UCCH's tc10 .mat files hold (the raw layout
# recomputes them from label frequency instead of trusting this list).
TC10 = ["animal", "buildings", "clouds", "grass", "lake", "person", "plants", "sky", "water", "window"]
CONCEPT_SETS = ("tc21", "tc10", "all")
_BLOCK = 16384  # lines per parsing block: bounds memory on the 540 MB AllTags1k.txt


# ------------------------------------------------------------------------------------------------ 0/1 text files


def read_binary_matrix(path, n_cols: int, n_rows: int | None = None, row_source: str = "") -> np.ndarray:
    """A text file of 0/1 values, n_cols a line (whitespace-separated), as (rows, n_cols) uint8.

    Any other token, or a line with the wrong number of values, is an error naming the file and the 1-based line;
    a file with the wrong number of lines names both counts.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise LayoutError(f"{path} is missing") from None
    nl = np.flatnonzero(data == 10)
    if data.size and data[-1] != 10:  # last line without a newline
        nl = np.append(nl, data.size)
    starts = np.concatenate([[0], nl[:-1] + 1]) if nl.size else np.zeros(0, dtype=np.int64)
    # Trailing blank lines are not rows.
    n_lines = len(nl)
    while n_lines and not data[starts[n_lines - 1] : nl[n_lines - 1]].tobytes().strip():
        n_lines -= 1
    out = np.empty((n_lines, n_cols), dtype=np.uint8)

    def fail(line: int, why: str):
        text = data[starts[line] : nl[line]].tobytes().decode("utf-8", "replace").strip()
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise DatasetError(f"{path}:{line + 1}: malformed line {shown!r} ({why})")

    for b0 in range(0, n_lines, _BLOCK):  # a loop over blocks of lines, never over items
        b1 = min(b0 + _BLOCK, n_lines)
        chunk = data[starts[b0] : nl[b1 - 1] + 1]
        ends = np.minimum(nl[b0:b1] - starts[b0], len(chunk) - 1)  # each line's last byte within the chunk
        digit = (chunk == 48) | (chunk == 49)
        ok = digit | (chunk == 32) | (chunk == 9) | (chunk == 10) | (chunk == 13)
        glued = np.flatnonzero(digit[1:] & digit[:-1])  # "10", "011": not a 0/1 token
        if not ok.all() or glued.size:
            pos = min(np.flatnonzero(~ok)[:1].tolist() + glued[:1].tolist())
            fail(b0 + int(np.searchsorted(ends, pos)), f"expected {n_cols} values of 0 or 1")
        where = np.flatnonzero(digit)
        counts = np.diff(np.searchsorted(where, ends, side="right"), prepend=0)  # values per line
        wrong = np.flatnonzero(counts != n_cols)
        if wrong.size:
            fail(b0 + int(wrong[0]), f"{counts[wrong[0]]} values, expected {n_cols}")
        out[b0:b1] = (chunk[where] - 48).reshape(b1 - b0, n_cols)
    if n_rows is not None and n_lines != n_rows:
        raise DatasetError(
            f"{path}: {n_lines} lines, expected {n_rows} (one per line of {row_source or 'the image list'})"
            + (f"; line {n_lines + 1} is missing" if n_lines < n_rows else "")
        )
    return out


# ------------------------------------------------------------------------------------------------ raw layout


def _find_file(root: Path, names: list[str]) -> Path | None:
    for d in dirs_near(root, depth=2):
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def find_raw_root(root) -> Path | None:
    """The folder holding ImageList/Imagelist.txt and Groundtruth/ (root itself or a sub-folder)."""
    for d in dirs_near(Path(root), depth=2):
        if (d / "ImageList" / "Imagelist.txt").is_file() and (d / "Groundtruth").is_dir():
            return d
    return None


def detect_layout(root) -> str | None:
    """'raw', 'mat' (DJSRH / UCCH / DCMH / torchcmh files), 'features-mat' or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    if find_raw_root(root) is not None:
        return "raw"
    mats = mat_files(root)
    if any(n.startswith("nus-wide-tc") and n.endswith("-lall.mat") for n in mats) or "labellist21.mat" in mats:
        has_images = any(n.endswith("-iall.mat") and n.startswith("nus-wide") for n in mats) or "imglist21.mat" in mats
        return "mat" if has_images else "features-mat"
    return None


def _read_image_list(path: Path) -> list[tuple[str, str]]:
    """(dir, file) of each line `<dir>\\<n>_<flickrid>.jpg` (a longer Windows path keeps its last two parts)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                s = line.strip()
                if not s:
                    continue
                parts = s.replace("\\", "/").split("/")
                if len(parts) < 2 or not parts[-1]:
                    raise DatasetError(f"{path}:{lineno}: malformed line {s!r} (expected <dir>\\<n>_<flickrid>.jpg)")
                out.append((parts[-2], parts[-1]))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return out


def _concept_order(base: Path, label_dir: Path) -> list[str]:
    listed = _find_file(base, ["Concepts81.txt"])
    if listed is not None:
        try:
            return [ln.strip() for ln in listed.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise not_utf8(listed) from None
    # Concepts81.txt is alphabetical; without it, the Labels_ files sorted by name give the same order.
    return sorted(p.stem[len("Labels_") :] for p in label_dir.glob("Labels_*.txt"))


def _find_image_root(base: Path, entries: list[tuple[str, str]], rows: np.ndarray, image_root) -> Path:
    if image_root is not None:
        return Path(image_root)
    probe = [entries[i] for i in rows[:200]]
    for cand in (base / "Flickr", base / "images", base / "Images", base / "image", base):
        if any((cand / d / f).is_file() for d, f in probe):
            return cand
    first = f"{probe[0][0]}/{probe[0][1]}" if probe else "?"
    raise LayoutError(
        f"{base}: no NUS-WIDE images found (the official URLs are dead: bring your own copy): put them under "
        f"{base / 'Flickr'}/<dir>/<file> as listed in ImageList/Imagelist.txt (first needed: {first}), or pass image_root="
    )


def _load_raw(base: Path, concepts: str, cleaned: bool, image_root) -> CrossModalDataset:
    list_path = base / "ImageList" / "Imagelist.txt"
    entries = _read_image_list(list_path)
    n = len(entries)
    label_dir = base / "Groundtruth" / "AllLabels"
    if not label_dir.is_dir():
        raise LayoutError(f"{label_dir} is missing: add Groundtruth/AllLabels/ (Labels_<concept>.txt files)")
    order = _concept_order(base, label_dir)
    if concepts == "all":
        names = order
    else:
        names = [c for c in order if c in TC21]
        absent = [c for c in TC21 if c not in names]
        if absent:
            raise LayoutError(f"{base}: Concepts81.txt lacks TC-21 concept(s) {', '.join(absent)}")
    cols = []
    for c in names:
        path = label_dir / f"Labels_{c}.txt"
        if not path.is_file():
            raise LayoutError(f"{path} is missing: add Groundtruth/AllLabels/Labels_{c}.txt")
        cols.append(read_binary_matrix(path, 1, n, "ImageList/Imagelist.txt")[:, 0])
    labels = np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.uint8)
    if concepts == "tc10":  # the 10 most frequent, kept in Concepts81 order
        top = np.sort(np.argsort(-labels.sum(0, dtype=np.int64), kind="stable")[:10])
        labels, names = labels[:, top], [names[j] for j in top]

    tag_list = _find_file(base, ["TagList1k.txt"])
    tag_matrix = _find_file(base, ["AllTags1k.txt"])
    if tag_list is None or tag_matrix is None:
        raise LayoutError(
            f"{base}: the 1k tag files are missing: add NUS_WID_Tags/AllTags1k.txt and NUS_WID_Tags/TagList1k.txt "
            "(the text of each image is its tags from these)"
        )
    words = matfiles.read_word_list(tag_list)
    tags = read_binary_matrix(tag_matrix, len(words), n, "ImageList/Imagelist.txt")

    has_label, has_tag = labels.any(1), tags.any(1)
    keep = np.flatnonzero(has_label & has_tag) if cleaned else np.flatnonzero(has_label)
    img_root = _find_image_root(base, entries, keep, image_root)
    stats = {
        "rows": n,
        "labelled": int(has_label.sum()),
        "dropped_no_label": int(n - has_label.sum()),
        "protocol": "cleaned" if cleaned else "all_labelled",
        "concepts": concepts,
        "image_root": str(img_root),
    }
    stats["dropped_no_tag" if cleaned else "empty_text"] = int((has_label & ~has_tag).sum())
    return CrossModalDataset(
        name="nuswide",
        root=base,
        layout="raw",
        ids=[f"{entries[i][0]}/{Path(entries[i][1]).stem}" for i in keep],
        texts=matfiles.bag_to_texts(tags[keep], words, tag_matrix, "AllTags1k"),
        labels=labels[keep],
        label_names=names,
        image_paths=[img_root / entries[i][0] / entries[i][1] for i in keep],
        stats=stats,
    )


# ------------------------------------------------------------------------------------------------ .mat variants


def _sole_key(path: Path, preferred: list[str]) -> str:
    key = matfiles.find_key(path, preferred)
    if key is not None:
        return key
    keys = [k for k in matfiles.mat_keys(path) if not k.startswith("__")]
    if len(keys) == 1:
        return keys[0]
    raise LayoutError(f"{path}: cannot tell which variable to read (wanted one of {', '.join(preferred)}; has {', '.join(keys)})")


def _load_mat(root: Path, concepts: str, word_list, image_root) -> CrossModalDataset:
    mats = mat_files(root)
    if concepts == "all":
        raise DatasetError(f"{root}: .mat variants hold TC-10 or TC-21 only; use concepts='tc10' or 'tc21'")
    tc = concepts  # tc10 | tc21
    names = TC21 if tc == "tc21" else TC10
    prefix = f"nus-wide-{tc}-"
    if f"{prefix}lall.mat" in mats:
        if f"{prefix}iall.mat" not in mats:
            feats = sorted(n for n in mats if n.startswith(prefix) and n not in (f"{prefix}lall.mat", f"{prefix}yall.mat"))
            raise LayoutError(
                f"{root}: holds no images for NUS-WIDE {tc} ({', '.join(feats) or 'only labels and tags'}), so it cannot "
                f"feed the ViT image encoder: add {prefix}iall.mat (key IAll) beside them"
            )
        for part in ("yall", "lall"):
            if f"{prefix}{part}.mat" not in mats:
                raise LayoutError(f"{root}: add {prefix}{part}.mat")
        spec = dict(
            images=(mats[f"{prefix}iall.mat"], _sole_key(mats[f"{prefix}iall.mat"], ["IAll", "images"])),
            tags=(mats[f"{prefix}yall.mat"], _sole_key(mats[f"{prefix}yall.mat"], ["YAll", "tags"])),
            labels=(mats[f"{prefix}lall.mat"], _sole_key(mats[f"{prefix}lall.mat"], ["LAll", "labels"])),
            names=None,
        )
        return matfiles.load_mat_set(
            name="nuswide", root=root, layout=f"{tc}-mat", label_names=names, word_list=word_list,
            word_names=WORD_LIST_NAMES, word_hint="TagList1k.txt from NUS_WID_Tags", **spec,
        )  # fmt: skip
    if tc == "tc21" and "labellist21.mat" in mats:  # torchcmh: image paths + bag of tags + labels
        for f in ("imglist21.mat", "taglist21.mat"):
            if f not in mats:
                raise LayoutError(f"{root}: torchcmh NUS-WIDE set incomplete: add {f}")
        lab_path, tag_path, img_path = mats["labellist21.mat"], mats["taglist21.mat"], mats["imglist21.mat"]
        ds = matfiles.load_mat_set(
            name="nuswide", root=root, layout="torchcmh-mat", label_names=names, word_list=word_list,
            word_names=WORD_LIST_NAMES, word_hint="TagList1k.txt from NUS_WID_Tags", images=None, names=None,
            tags=(tag_path, _sole_key(tag_path, ["YAll", "tags"])), labels=(lab_path, _sole_key(lab_path, ["LAll", "labels"])),
            image_paths_from=(img_path, _sole_key(img_path, ["imgs", "images", "FAll"])), image_root=image_root,
        )  # fmt: skip
        return ds
    raise LayoutError(f"{root}: no NUS-WIDE {tc} .mat files ({prefix}{{iall,yall,lall}}.mat)")


# ------------------------------------------------------------------------------------------------ entry point


def load_nuswide(root=None, concepts: str = "tc21", cleaned: bool = True, word_list=None, image_root=None) -> CrossModalDataset:
    """Load NUS-WIDE from `root` (the dataset folder or a parent; None = look under DCMFG_DATA).

    concepts: "tc21" (default), "tc10" (the 10 most frequent) or "all" (81, raw layout only).
    """
    if concepts not in CONCEPT_SETS:
        raise DatasetError(f"nuswide: concepts must be one of {', '.join(CONCEPT_SETS)}, got {concepts!r}")
    root = dataset_folder("nuswide", root)
    base = find_raw_root(root)
    if base is not None:
        return _load_raw(base, concepts, bool(cleaned), image_root)
    if detect_layout(root) in ("mat", "features-mat"):
        return _load_mat(root, concepts, word_list, image_root)
    raise LayoutError(
        f"{root}: no NUS-WIDE layout found: expected ImageList/Imagelist.txt + Groundtruth/AllLabels/ + NUS_WID_Tags/ "
        "(raw), or nus-wide-tc21-{iall,yall,lall}.mat / nus-wide-tc10-*.mat / imgList21.mat + tagList21.mat + labelList21.mat"
    )
