"""NUS-WIDE: generated fixtures of the raw layout (with a malformed line) and of the .mat variants."""

from __future__ import annotations

import numpy as np
import pytest

from dcmfg.data import DatasetError, LayoutError, load_dataset
from dcmfg.data.nuswide import TC10, TC21, detect_layout, read_binary_matrix

N = 40
EXTRA = ["airport", "zebra"]  # two of the other 60 concepts: not in TC-21
WORDS = ["sky", "nature", "water", "blue", "clouds", "city"]


def make_raw(root, seed=0, with_images=True):
    rng = np.random.default_rng(seed)
    concepts = sorted(TC21 + EXTRA)
    # frequencies: concept k of TC-21 is drawn with a distinct probability, so the top 10 are known
    p = {c: 0.05 + 0.04 * k for k, c in enumerate(TC21)} | {c: 0.5 for c in EXTRA}
    labels = {c: (rng.random(N) < p[c]).astype(np.uint8) for c in concepts}
    for c in TC21:
        labels[c][0] = 0  # row 0: no TC-21 label
    tags = (rng.random((N, len(WORDS))) < 0.3).astype(np.uint8)
    tags[1] = 0  # row 1: no tag
    tags[2:, 0] = 1
    for c in TC21:
        labels[c][1] = 1 if c == "sky" else labels[c][1]
    (root / "ImageList").mkdir(parents=True)
    (root / "ImageList" / "Imagelist.txt").write_text(
        "".join(f"C:\\ImageData\\Flickr\\{'actor' if i % 2 else 'zoo'}\\{i:04d}_{1000 + i}.jpg\n" for i in range(N))
    )
    (root / "Concepts81.txt").write_text("".join(c + "\n" for c in concepts))
    (root / "Groundtruth" / "AllLabels").mkdir(parents=True)
    for c in concepts:
        (root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt").write_text("".join(f"{v}\n" for v in labels[c]))
    (root / "NUS_WID_Tags").mkdir()
    (root / "NUS_WID_Tags" / "TagList1k.txt").write_text("".join(w + "\n" for w in WORDS))
    (root / "NUS_WID_Tags" / "AllTags1k.txt").write_text("".join("\t".join(map(str, r)) + " \r\n" for r in tags))
    if with_images:
        from PIL import Image

        for i in range(N):
            d = root / "Flickr" / ("actor" if i % 2 else "zoo")
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 7), (i, 0, 0)).save(d / f"{i:04d}_{1000 + i}.jpg")
    return labels, tags


def test_raw_tc21_and_tc10(tmp_path):
    labels, tags = make_raw(tmp_path)
    assert detect_layout(tmp_path) == "raw"
    d = load_dataset("nuswide", tmp_path)
    assert d.label_names == TC21  # Concepts81 order (alphabetical), the EXTRA concepts left out
    L = np.stack([labels[c] for c in TC21], 1)
    keep = np.flatnonzero(L.any(1) & tags.any(1))
    assert 0 not in keep and 1 not in keep
    assert len(d) == len(keep) and np.array_equal(d.labels, L[keep])
    assert d.texts[0] == " ".join(w for w, b in zip(WORDS, tags[keep[0]]) if b)
    assert d.ids[0] == f"{'actor' if keep[0] % 2 else 'zoo'}/{keep[0]:04d}_{1000 + keep[0]}"
    assert np.asarray(d.image(0))[0, 0, 0] == pytest.approx(keep[0], abs=3)
    assert d.stats["dropped_no_tag"] == int((L.any(1) & ~tags.any(1)).sum())
    assert len(load_dataset("nuswide", tmp_path, cleaned=False)) == int(L.any(1).sum())

    tc10 = load_dataset("nuswide", tmp_path, concepts="tc10")
    freq = L.sum(0, dtype=np.int64)
    top = sorted(np.argsort(-freq, kind="stable")[:10])
    assert tc10.label_names == [TC21[j] for j in top]  # the 10 most frequent, in Concepts81 order
    assert tc10.labels.shape[1] == 10
    all81 = load_dataset("nuswide", tmp_path, concepts="all")
    assert all81.label_names == sorted(TC21 + EXTRA)


def test_raw_root_may_be_a_parent(tmp_path):
    make_raw(tmp_path / "NUS-WIDE")
    assert load_dataset("nuswide", tmp_path).root == tmp_path / "NUS-WIDE"


def test_raw_malformed_label_line(tmp_path):
    make_raw(tmp_path)
    path = tmp_path / "Groundtruth" / "AllLabels" / "Labels_lake.txt"
    lines = path.read_text().splitlines()
    lines[4] = "-1130179"  # the real defect of Labels_lake_Train.txt
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"Labels_lake\.txt:5: malformed line '-1130179'"):
        load_dataset("nuswide", tmp_path)


def test_raw_label_file_of_wrong_length(tmp_path):
    make_raw(tmp_path)
    path = tmp_path / "Groundtruth" / "AllLabels" / "Labels_sky.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-3]) + "\n")
    with pytest.raises(DatasetError, match=rf"Labels_sky\.txt: {N - 3} lines, expected {N}.*line {N - 2} is missing"):
        load_dataset("nuswide", tmp_path)


def test_raw_tag_matrix_bad_row(tmp_path):
    make_raw(tmp_path)
    path = tmp_path / "NUS_WID_Tags" / "AllTags1k.txt"
    lines = path.read_text().splitlines()
    lines[6] = "0 1 0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"AllTags1k\.txt:7: malformed line '0 1 0' \(3 values, expected 6\)"):
        load_dataset("nuswide", tmp_path)


def test_raw_missing_parts(tmp_path):
    make_raw(tmp_path, with_images=False)
    with pytest.raises(LayoutError, match=r"no NUS-WIDE images.*Flickr.*first needed"):
        load_dataset("nuswide", tmp_path)
    (tmp_path / "NUS_WID_Tags" / "TagList1k.txt").unlink()
    with pytest.raises(LayoutError, match="TagList1k.txt"):
        load_dataset("nuswide", tmp_path)
    (tmp_path / "Groundtruth" / "AllLabels" / "Labels_snow.txt").unlink()
    with pytest.raises(LayoutError, match="Labels_snow.txt"):
        load_dataset("nuswide", tmp_path)


def test_read_binary_matrix_blocks(tmp_path, monkeypatch):
    """Parsing in blocks of lines gives the same matrix and the right line numbers across block borders."""
    import dcmfg.data.nuswide as nus

    rng = np.random.default_rng(0)
    m = (rng.random((50, 4)) < 0.5).astype(np.uint8)
    path = tmp_path / "m.txt"
    path.write_text("".join(" ".join(map(str, r)) + "\n" for r in m) + "\n")
    monkeypatch.setattr(nus, "_BLOCK", 7)
    assert np.array_equal(read_binary_matrix(path, 4, 50), m)
    text = path.read_text().splitlines()
    text[31] = "0 2 1 0"
    path.write_text("\n".join(text))
    with pytest.raises(DatasetError, match=r"m\.txt:32:"):
        read_binary_matrix(path, 4, 50)


# ------------------------------------------------------------------------------------------------ .mat variants


def _mat_arrays(n_labels, seed=0, n=12, h=6, w=5):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    labels = (rng.random((n, n_labels)) < 0.3).astype(np.uint8)
    bag = (rng.random((n, len(WORDS))) < 0.4).astype(np.uint8)
    return images, labels, bag


def test_tc10_djsrh_mat_with_hdf5_yall(tmp_path):
    import h5py
    from scipy.io import savemat

    images, labels, bag = _mat_arrays(10)
    savemat(tmp_path / "nus-wide-tc10-iall.mat", {"IAll": images.transpose(1, 2, 3, 0)})
    savemat(tmp_path / "nus-wide-tc10-lall.mat", {"LAll": labels})
    with h5py.File(tmp_path / "nus-wide-tc10-yall.mat", "w", userblock_size=512) as f:  # DJSRH: yall is v7.3
        f["YAll"] = bag.T
    assert detect_layout(tmp_path) == "mat"
    with pytest.raises(LayoutError, match="TagList1k.txt"):
        load_dataset("nuswide", tmp_path, concepts="tc10")
    (tmp_path / "TagList1k.txt").write_text("\n".join(WORDS) + "\n")
    d = load_dataset("nuswide", tmp_path, concepts="tc10")
    assert d.label_names == TC10 and np.array_equal(d.labels, labels)
    assert d.texts[3] == " ".join(w for w, b in zip(WORDS, bag[3]) if b)
    assert np.array_equal(np.asarray(d.image(4)), images[4])
    with pytest.raises(LayoutError, match="nus-wide-tc21"):
        load_dataset("nuswide", tmp_path, concepts="tc21")


def test_tc21_features_only_refused(tmp_path):
    from scipy.io import savemat

    _, labels, bag = _mat_arrays(21)
    savemat(tmp_path / "nus-wide-tc21-lall.mat", {"LAll": labels})
    savemat(tmp_path / "nus-wide-tc21-yall.mat", {"YAll": bag})
    savemat(tmp_path / "nus-wide-tc21-xall-vgg.mat", {"XAll": np.zeros((12, 8), np.float32)})
    assert detect_layout(tmp_path) == "features-mat"
    with pytest.raises(LayoutError, match=r"no images.*nus-wide-tc21-xall-vgg.mat.*add nus-wide-tc21-iall.mat"):
        load_dataset("nuswide", tmp_path)


def test_torchcmh_mats_with_image_paths(tmp_path):
    from PIL import Image
    from scipy.io import savemat

    _, labels, bag = _mat_arrays(21)
    names = [f"zoo\\{i:04d}_{i}.jpg" for i in range(12)]
    (tmp_path / "Flickr" / "zoo").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (4, 4), (i, 1, 2)).save(tmp_path / "Flickr" / "zoo" / f"{i:04d}_{i}.jpg")
    savemat(tmp_path / "imgList21.mat", {"imgs": np.array([[s] for s in names], dtype=object)})
    savemat(tmp_path / "tagList21.mat", {"tags": bag})
    savemat(tmp_path / "labelList21.mat", {"labels": labels.T})  # stored transposed: matched by the 21 columns
    (tmp_path / "TagList1k.txt").write_text("\n".join(WORDS) + "\n")
    d = load_dataset("nuswide", tmp_path, image_root=tmp_path / "Flickr")
    assert d.layout == "torchcmh-mat" and d.label_names == TC21 and np.array_equal(d.labels, labels)
    assert d.ids[2] == "zoo/0002_2" and d.image(2).size == (4, 4)
