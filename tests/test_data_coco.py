"""MS-COCO loader on a generated official-layout fixture (real JSON structure, small real JPEGs), and group rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcmfg.data import DatasetError, LayoutError, load_dataset
from dcmfg.data.captions import group_representatives
from dcmfg.data.mscoco import looks_like_coco
from dcmfg.data.splits import make_split


def rows_of_groups(groups: np.ndarray, chosen) -> np.ndarray:
    """All row indices whose group is in `chosen`, ascending (the oracle of a group-level split expanded to rows)."""
    g = np.asarray(groups, dtype=np.int64)
    return np.flatnonzero(np.isin(g, np.asarray(chosen, dtype=np.int64)))


# Category list deliberately not sorted by id, with gaps: column order must follow the file, not the ids.
CATEGORIES = [
    {"supercategory": "animal", "id": 18, "name": "dog"},
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 17, "name": "cat"},
]


def _write_split(root: Path, split: str, images: list[dict], year: str = "2014") -> None:
    """images: [{"id", "caps": [...], "cats": [...category ids, one per instance]}]; writes JPEGs + both JSONs."""
    name = f"{split}{year}"
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(len(images))
    img_entries, cap_anns, inst_anns = [], [], []
    ann_id = 1000 if split == "val" else 1
    for im in images:
        fname = f"COCO_{name}_{im['id']:012d}.jpg"
        if not im.get("no_file"):
            arr = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / fname, quality=85)
        img_entries.append({"license": 1, "file_name": fname, "height": 24, "width": 32, "id": im["id"],
                            "coco_url": "", "date_captured": "2013-11-14 11:18:45", "flickr_url": ""})
        for c in im["caps"]:
            cap_anns.append({"image_id": im["id"], "id": ann_id, "caption": c})
            ann_id += 1
        for cat in im["cats"]:
            inst_anns.append({
                "segmentation": [[10.0, 10.5, 20.0, 10.5, 20.0, 20.0, 10.0, 20.0]], "area": 95.0, "iscrowd": 0,
                "image_id": im["id"], "bbox": [10.0, 10.5, 10.0, 9.5], "category_id": cat, "id": ann_id,
            })
            ann_id += 1
    info = {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014}
    lic = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "by-nc-sa"}]
    (root / "annotations" / f"captions_{name}.json").write_text(
        json.dumps({"info": info, "images": img_entries, "licenses": lic, "annotations": cap_anns})
    )
    # A crowd annotation with RLE segmentation: a nested dict the parser must pass through.
    if inst_anns:
        inst_anns.append({"segmentation": {"counts": [0, 5, 19, 5], "size": [24, 32]}, "area": 10.0, "iscrowd": 1,
                          "image_id": inst_anns[0]["image_id"], "bbox": [0, 0, 5, 5],
                          "category_id": inst_anns[0]["category_id"], "id": ann_id})
    (root / "annotations" / f"instances_{name}.json").write_text(
        json.dumps({"info": info, "images": img_entries, "licenses": lic, "annotations": inst_anns,
                    "categories": CATEGORIES})
    )


TRAIN = [
    {"id": 9, "caps": ["A dog on grass.", "A brown dog  running\n", "dog outside"], "cats": [18, 18, 1]},
    {"id": 25, "caps": ["A car parked.", "Red car"], "cats": [3]},
    {"id": 30, "caps": ["An empty room."], "cats": []},  # no instance: dropped and counted
    {"id": 42, "caps": ["A cat and a person.", "person with cat"], "cats": [17, 1]},
]
VAL = [
    {"id": 7, "caps": ["A person driving a car."], "cats": [1, 3]},
    {"id": 8, "caps": ["Two cats.", "cats sleeping", "a pair of cats"], "cats": [17]},
]


@pytest.fixture()
def coco_root(tmp_path) -> Path:
    root = tmp_path / "coco"
    _write_split(root, "train", TRAIN)
    _write_split(root, "val", VAL)
    return root


def test_first_caption_labels_and_order(coco_root):
    ds = load_dataset("mscoco", coco_root)
    assert ds.layout == "coco2014"
    assert ds.label_names == ["dog", "person", "car", "cat"]  # file order, not id order
    assert ds.ids == ["9", "25", "42", "7", "8"]  # train then val, by image id; 30 dropped
    assert ds.stats["dropped_no_label"] == 1
    assert ds.groups is None
    np.testing.assert_array_equal(
        ds.labels, [[1, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 1]]
    )
    assert ds.texts[0] == "A dog on grass."
    assert ds.image_paths[3] == coco_root / "val2014" / "COCO_val2014_000000000007.jpg"
    im = ds.image(0)
    assert im.mode == "RGB" and im.size == (32, 24)


def test_join_and_all_captions(coco_root):
    joined = load_dataset("mscoco", coco_root, captions="join")
    assert joined.texts[0] == "A dog on grass. A brown dog running dog outside"  # whitespace normalised
    ds = load_dataset("mscoco", coco_root, captions="all")
    assert len(ds) == 3 + 2 + 2 + 1 + 3
    assert ds.ids[:4] == ["9#0", "9#1", "9#2", "25#0"]
    np.testing.assert_array_equal(ds.groups, [0, 0, 0, 1, 1, 2, 2, 3, 4, 4, 4])
    # Rows of one group share the image and the labels.
    for g in np.unique(ds.groups):
        rows = np.flatnonzero(ds.groups == g)
        assert len({ds.image_paths[r] for r in rows}) == 1
        assert (ds.labels[rows] == ds.labels[rows[0]]).all()
    reps = group_representatives(ds.groups)
    np.testing.assert_array_equal(reps, [0, 3, 5, 7, 8])
    assert ds.fingerprint() != joined.fingerprint()


def test_subset_keeps_groups(coco_root):
    ds = load_dataset("mscoco", coco_root, captions="all")
    sub = ds.subset(rows_of_groups(ds.groups, [4, 1]))
    np.testing.assert_array_equal(sub.groups, [1, 1, 4, 4, 4])
    assert sub.texts[0] == "A car parked."


def test_split_subset_and_year_choice(coco_root, tmp_path):
    val = load_dataset("mscoco", coco_root, splits=["val"])
    assert val.ids == ["7", "8"]
    _write_split(coco_root, "val", VAL, year="2017")
    with pytest.raises(LayoutError, match="both 2014 and 2017"):
        load_dataset("mscoco", coco_root)
    ds17 = load_dataset("mscoco", coco_root, year="2017")
    assert ds17.layout == "coco2017" and ds17.ids == ["7", "8"]
    assert looks_like_coco(coco_root)
    assert not looks_like_coco(tmp_path / "nowhere")


def test_incomplete_layouts_name_the_file(coco_root, tmp_path):
    with pytest.raises(LayoutError, match="not a COCO layout"):
        load_dataset("mscoco", tmp_path)
    (coco_root / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(LayoutError, match="instances_val2014.json: file not found"):
        load_dataset("mscoco", coco_root)
    assert load_dataset("mscoco", coco_root, splits="train").ids == ["9", "25", "42"]

    root2 = tmp_path / "c2"
    _write_split(root2, "train", TRAIN)
    for p in (root2 / "train2014").iterdir():
        p.unlink()
    (root2 / "train2014").rmdir()
    with pytest.raises(LayoutError, match="train2014: image folder not found"):
        load_dataset("mscoco", root2)


def test_missing_image_files_error_or_drop(tmp_path):
    root = tmp_path / "c"
    _write_split(root, "train", TRAIN[:2] + [dict(TRAIN[3], no_file=True)])
    with pytest.raises(LayoutError, match=r"1 image file\(s\).*COCO_train2014_000000000042.jpg"):
        load_dataset("mscoco", root)
    ds = load_dataset("mscoco", root, missing_images="drop")
    assert ds.ids == ["9", "25"] and ds.stats["dropped_missing_image"] == 1


def test_bad_json_and_bad_references(tmp_path):
    root = tmp_path / "c"
    _write_split(root, "train", TRAIN)
    inst = root / "annotations" / "instances_train2014.json"
    data = json.loads(inst.read_text())
    data["annotations"][0]["category_id"] = 99
    inst.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="instances_train2014.json: annotation category_id 99"):
        load_dataset("mscoco", root)
    data["annotations"][0]["category_id"] = 1
    data["annotations"][0]["image_id"] = 12345
    inst.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="image_id 12345 is not an image"):
        load_dataset("mscoco", root)
    inst.write_text('{"annotations": [')
    with pytest.raises(DatasetError, match="instances_train2014.json: not valid JSON"):
        load_dataset("mscoco", root)
    with pytest.raises(DatasetError, match="captions='some'"):
        load_dataset("mscoco", root, captions="some")


def test_splits_are_made_by_group(tmp_path):
    """make_split on a captions="all" COCO set: sizes count images and siblings never straddle parts."""
    root = tmp_path / "c"
    many = [{"id": 100 + i, "caps": [f"caption {k} of {i}" for k in range(1 + i % 4)], "cats": [[1], [3, 17], [18]][i % 3]}
            for i in range(30)]
    _write_split(root, "train", many)
    ds = load_dataset("mscoco", root, captions="all")
    assert len(np.unique(ds.groups)) == 30 and len(ds) > 30
    s = make_split(ds, "random", query=6, train=16, val=4, seed=1)
    g = {k: set(ds.groups[s[k]].tolist()) for k in ("query", "database", "train", "val")}
    assert len(g["query"]) == 6 and len(g["train"]) == 12 and len(g["val"]) == 4
    assert not g["query"] & g["database"] and len(g["query"]) + len(g["database"]) == 30
    assert not g["train"] & g["val"] and (g["train"] | g["val"]) <= g["database"]
    for k in ("query", "database", "train", "val"):
        np.testing.assert_array_equal(s[k], rows_of_groups(ds.groups, sorted(g[k])))


def test_root_from_dcmfg_data(coco_root, monkeypatch):
    monkeypatch.setenv("DCMFG_DATA", str(coco_root.parent))
    assert load_dataset("mscoco").ids == ["9", "25", "42", "7", "8"]
    monkeypatch.setenv("DCMFG_DATA", str(coco_root / "train2014"))
    with pytest.raises(LayoutError, match="none found under DCMFG_DATA"):
        load_dataset("mscoco")


def test_detected_and_summarised_by_data_info(coco_root, capsys):
    from dcmfg.cli import main
    from dcmfg.data.discover import detect

    assert [n for n, _ in detect(coco_root)] == ["mscoco"]
    assert main(["data", "info", str(coco_root), "--option", "captions=all"]) == 0
    out = capsys.readouterr().out
    assert "mscoco" in out and "coco2014" in out and "dropped_no_label: 1" in out


def test_instances_parse_is_cached_by_content(coco_root, tmp_path, monkeypatch):
    import dcmfg.data.mscoco as mscoco

    monkeypatch.setenv("DCMFG_CACHE", str(tmp_path / "cache"))
    first = load_dataset("mscoco", coco_root)
    assert len(list((tmp_path / "cache" / "mscoco").glob("instances-*.npz"))) == 2  # train + val

    def no_parse(path):
        raise AssertionError(f"parsed {path} although it is cached")

    monkeypatch.setattr(mscoco, "_read_instances", no_parse)
    again = load_dataset("mscoco", coco_root)
    assert again.fingerprint() == first.fingerprint()
    # An edited file (same size, same second) is parsed again, never answered from the old entry.
    monkeypatch.undo()
    monkeypatch.setenv("DCMFG_CACHE", str(tmp_path / "cache"))
    inst = coco_root / "annotations" / "instances_val2014.json"
    inst.write_text(inst.read_text().replace('"category_id": 17', '"category_id": 18'))
    edited = load_dataset("mscoco", coco_root)
    assert edited.labels[-1].tolist() == [1, 0, 0, 0]  # image 8: cat -> dog
