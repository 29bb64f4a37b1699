"""Bring-your-own manifests (JSONL and CSV) on generated fixtures, including every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcmfg.data import DatasetError, LayoutError, load_dataset
from dcmfg.data.manifest import find_manifest, looks_like_manifest

ITEMS = [
    {"image": "img/a.jpg", "text": "a cat on a sofa", "labels": ["cat", "indoor"]},
    {"image": "img/b.jpg", "text": ["a dog", "a brown dog running"], "labels": ["dog"]},
    {"image": "img/sub/c.png", "text": "a dog and a cat", "labels": ["dog", "cat"]},
]


def _images(folder: Path, names=("img/a.jpg", "img/b.jpg", "img/sub/c.png")) -> None:
    rng = np.random.default_rng(0)
    for n in names:
        p = folder / n
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8)).save(p)


def _jsonl(folder: Path, items, name="manifest.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


def _csv(folder: Path, text: str, name="manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture()
def jsonl_root(tmp_path) -> Path:
    root = tmp_path / "byod"
    _images(root)
    _jsonl(root, ITEMS)
    return root


def test_jsonl_first_appearance_order(jsonl_root):
    ds = load_dataset("manifest", jsonl_root)
    assert ds.layout == "manifest-jsonl"
    assert ds.label_names == ["cat", "indoor", "dog"]
    np.testing.assert_array_equal(ds.labels, [[1, 1, 0], [0, 0, 1], [1, 0, 1]])
    assert ds.texts == ["a cat on a sofa", "a dog", "a dog and a cat"]
    assert ds.ids == ["img/a.jpg", "img/b.jpg", "img/sub/c.png"]
    assert ds.groups is None
    assert ds.image(2).mode == "RGB" and ds.image(2).size == (30, 20)
    # The file itself works as root too.
    assert load_dataset("manifest", jsonl_root / "manifest.jsonl").fingerprint() == ds.fingerprint()


def test_jsonl_caption_modes(jsonl_root):
    joined = load_dataset("manifest", jsonl_root, captions="join")
    assert joined.texts[1] == "a dog a brown dog running"
    ds = load_dataset("manifest", jsonl_root, captions="all")
    assert ds.texts == ["a cat on a sofa", "a dog", "a brown dog running", "a dog and a cat"]
    assert ds.ids == ["img/a.jpg#0", "img/b.jpg#0", "img/b.jpg#1", "img/sub/c.png#0"]
    np.testing.assert_array_equal(ds.groups, [0, 1, 1, 2])
    assert ds.image_paths[1] == ds.image_paths[2]
    np.testing.assert_array_equal(ds.labels[1], ds.labels[2])


def test_label_names_file_fixes_order(jsonl_root):
    (jsonl_root / "label_names.txt").write_text("dog\ncat\nindoor\noutdoor\n")
    ds = load_dataset("manifest", jsonl_root)
    assert ds.label_names == ["dog", "cat", "indoor", "outdoor"]
    np.testing.assert_array_equal(ds.labels, [[0, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    (jsonl_root / "label_names.txt").write_text("dog\ncat\n")
    with pytest.raises(DatasetError, match=r"manifest.jsonl:1: label 'indoor' is not in .*label_names.txt"):
        load_dataset("manifest", jsonl_root)
    (jsonl_root / "label_names.txt").write_text("dog\ncat\ndog\n")
    with pytest.raises(DatasetError, match=r"label_names.txt:3: label 'dog' already listed at line 1"):
        load_dataset("manifest", jsonl_root)
    (jsonl_root / "label_names.txt").write_bytes(b"dog\ncat\nind\xf6or\n")  # latin-1, not UTF-8
    with pytest.raises(DatasetError, match=r"label_names.txt:3: not UTF-8 text \(byte 0xf6 at column 4\)"):
        load_dataset("manifest", jsonl_root)


def test_csv_manifest_not_utf8_names_the_line(tmp_path):
    root = tmp_path / "csv"
    _images(root)
    path = _csv(root, "image,text,labels\nimg/a.jpg,a cat,cat\n")
    path.write_bytes(path.read_bytes() + b"img/b.jpg,a \x93dog\x94,dog\n")  # cp1252 quotes
    with pytest.raises(DatasetError) as err:
        load_dataset("manifest", root)
    assert str(err.value) == f"{path}:3: not UTF-8 text (byte 0x93 at column 13); re-save the file as UTF-8"


def test_csv_manifest(tmp_path):
    root = tmp_path / "csv"
    _images(root)
    _csv(root, 'image,text,labels\nimg/a.jpg,"a cat, on a sofa",cat | indoor\n\nimg/sub/c.png,a dog and a cat,dog|cat\n')
    ds = load_dataset("manifest", root)
    assert ds.layout == "manifest-csv"
    assert ds.label_names == ["cat", "indoor", "dog"]
    assert ds.texts == ["a cat, on a sofa", "a dog and a cat"]
    np.testing.assert_array_equal(ds.labels, [[1, 1, 0], [1, 0, 1]])
    with_id = _csv(root / "sub", "id,image,labels,text\nx1,../img/b.jpg,dog,a dog\n")  # inside root/sub: no
    with pytest.raises(DatasetError, match=r"manifest.csv:2: image '../img/b.jpg' resolves to .*, outside the manifest's folder"):
        load_dataset("manifest", with_id)
    with_id = _csv(root, "id,image,labels,text\nx1,img/sub/../b.jpg,dog,a dog\n", name="other.csv")  # inside: yes
    ds2 = load_dataset("manifest", with_id)
    assert ds2.ids == ["x1"] and ds2.image_paths[0].resolve() == (root / "img/b.jpg").resolve()


@pytest.mark.parametrize(
    "line, message",
    [
        ({"image": "img/missing.jpg", "text": "t", "labels": ["x"]}, r"manifest.jsonl:2: image file .*missing.jpg not found"),
        ({"image": "img/b.jpg", "text": "  ", "labels": ["x"]}, r"manifest.jsonl:2: empty text"),
        ({"image": "img/b.jpg", "text": [], "labels": ["x"]}, r"manifest.jsonl:2: empty text"),
        ({"image": "img/b.jpg", "text": ["ok", ""], "labels": ["x"]}, r"manifest.jsonl:2: empty text"),
        ({"image": "img/b.jpg", "text": "t", "labels": []}, r"manifest.jsonl:2: item has no labels"),
        ({"image": "img/b.jpg", "text": "t", "labels": "x|y"}, r"manifest.jsonl:2: 'labels' must be a list"),
        ({"image": "img/b.jpg", "text": "t", "labels": ["x"], "caption": "c"}, r"manifest.jsonl:2: unknown column.*'caption'"),
        ({"image": "img/b.jpg", "labels": ["x"]}, r"manifest.jsonl:2: missing text"),
        ({"image": "img/a.jpg", "text": "t", "labels": ["x"]}, r"manifest.jsonl:2: image 'img/a.jpg' already listed at line 1"),
        ({"image": "/etc/passwd", "text": "t", "labels": ["x"]}, r"manifest.jsonl:2: image '/etc/passwd' must be relative"),
        ({"image": "img/b.jpg", "text": "t", "labels": ["x"], "id": "img/a.jpg"}, r"manifest.jsonl:2: id 'img/a.jpg' already used at line 1"),
        ([1, 2], r"manifest.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_bad_items_name_file_and_line(tmp_path, line, message):
    root = tmp_path / "bad"
    _images(root)
    _jsonl(root, [ITEMS[0], line])
    with pytest.raises(DatasetError, match=message) as err:
        load_dataset("manifest", root)
    assert str(err.value).startswith(str(root / "manifest.jsonl") + ":2: ") and "\n" not in str(err.value)  # one line


def test_jsonl_malformed_line_and_all_problems_listed(tmp_path):
    root = tmp_path / "bad"
    _images(root)
    path = root / "manifest.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n{not json\n\n" + json.dumps({"image": "nope.jpg", "text": "t", "labels": ["a"]}) + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("manifest", root)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert "manifest.jsonl:2: not valid JSON" in msg
    assert "manifest.jsonl:4: image file" in msg


@pytest.mark.parametrize(
    "text, message",
    [
        ("image,text,labels,extra\nimg/a.jpg,t,x,1\n", r"manifest.csv:1: unknown column\(s\) 'extra'"),
        ("image,labels\nimg/a.jpg,x\n", r"manifest.csv:1: missing column\(s\) text"),
        ("image,text,labels\nimg/a.jpg,t,x\nimg/b.jpg,,x\n", r"manifest.csv:3: empty text"),
        ("image,text,labels\nimg/a.jpg,t,x\nimg/b.jpg,t, | \n", r"manifest.csv:3: item has no labels"),
        ("image,text,labels\nimg/a.jpg,t,x\nimg/zz.jpg,t,x\n", r"manifest.csv:3: image file .*zz.jpg not found"),
        ("image,text,labels\nimg/a.jpg,t,x\nimg/b.jpg,t\n", r"manifest.csv:3: 2 fields, the header has 3"),
        ('image,text,labels\nimg/a.jpg,"two\nlines",x\nimg/zz.jpg,t,x\n', r"manifest.csv:4: image file .*zz.jpg not found"),
        ("", r"manifest.csv:1: empty file"),
    ],
)
def test_csv_bad_items_name_file_and_line(tmp_path, text, message):
    root = tmp_path / "bad"
    _images(root)
    _csv(root, text)
    with pytest.raises(DatasetError, match=message):
        load_dataset("manifest", root)


def test_finding_the_manifest(tmp_path, jsonl_root):
    assert looks_like_manifest(jsonl_root) and looks_like_manifest(jsonl_root / "manifest.jsonl")
    assert not looks_like_manifest(tmp_path / "empty")
    with pytest.raises(LayoutError, match="neither manifest.jsonl nor manifest.csv"):
        find_manifest(jsonl_root / "img")
    _csv(jsonl_root, "image,text,labels\n")
    with pytest.raises(LayoutError, match="both manifest.jsonl and manifest.csv"):
        load_dataset("manifest", jsonl_root)
    assert find_manifest(jsonl_root / "manifest.csv").name == "manifest.csv"
    with pytest.raises(LayoutError, match="must end in .jsonl or .csv"):
        load_dataset("manifest", jsonl_root / "img" / "a.jpg")
    with pytest.raises(LayoutError, match=r"missing: folder not found"):
        load_dataset("manifest", tmp_path / "missing")
    _jsonl(tmp_path / "none", [])
    with pytest.raises(DatasetError, match="lists no items"):
        load_dataset("manifest", tmp_path / "none")
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "manifest.jsonl").write_bytes(b'{"image": "a.jpg"}\n{"image": "caf\xe9.jpg"}\n')
    with pytest.raises(DatasetError, match=r"latin/manifest\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 15\)"):
        load_dataset("manifest", tmp_path / "latin")


def test_root_from_dcmfg_data(jsonl_root, monkeypatch):
    monkeypatch.setenv("DCMFG_DATA", str(jsonl_root.parent))
    assert load_dataset("manifest").ids == ["img/a.jpg", "img/b.jpg", "img/sub/c.png"]


def test_detected_and_summarised_by_data_info(jsonl_root, capsys):
    from dcmfg.cli import main
    from dcmfg.data.discover import detect

    assert [n for n, _ in detect(jsonl_root)] == ["manifest"]
    assert main(["data", "info", str(jsonl_root)]) == 0
    assert "manifest-jsonl" in capsys.readouterr().out


def test_image_paths_must_stay_inside_the_manifest_folder(tmp_path):
    """.. and symlinks are resolved before the check; absolute paths are refused as before."""
    root = tmp_path / "byod"
    _images(root)
    _images(tmp_path, names=("outside.jpg",))
    (root / "img" / "link-out.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "img" / "link-in.jpg").symlink_to(root / "img" / "a.jpg")
    (root / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    lines = [
        {"image": "../outside.jpg", "text": "t", "labels": ["x"]},
        {"image": "img/../../outside.jpg", "text": "t", "labels": ["x"]},
        {"image": "img/link-out.jpg", "text": "t", "labels": ["x"]},
        {"image": "elsewhere/outside.jpg", "text": "t", "labels": ["x"]},
        {"image": "../missing.jpg", "text": "t", "labels": ["x"]},
    ]
    _jsonl(root, [ITEMS[1]] + lines)
    with pytest.raises(DatasetError) as err:
        load_dataset("manifest", root)
    msg = str(err.value)
    assert "5 problem(s)" in msg
    outside = tmp_path.resolve()
    for lineno, line in enumerate(lines, 2):
        assert f"manifest.jsonl:{lineno}: image {line['image']!r} resolves to {outside}/" in msg
        assert f"outside the manifest's folder {root.resolve()} (.. and symlinks must stay inside it)" in msg
    # a symlink that stays inside is an ordinary item
    _jsonl(root, [ITEMS[1], {"image": "img/link-in.jpg", "text": "t", "labels": ["x"]}])
    assert len(load_dataset("manifest", root)) == 2
