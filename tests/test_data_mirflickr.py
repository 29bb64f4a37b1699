"""MIRFlickr-25K: the real subset (counts from PROVENANCE.md) and generated fixtures of every other layout."""

from __future__ import annotations

import numpy as np
import pytest

from dcmfg.data import DatasetError, ImageReadError, LayoutError, load_dataset
from dcmfg.data.mirflickr import CONCEPTS, detect_layout

# PROVENANCE.md: label frequencies over the 981 labelled images of the bundle.
FREQ_981 = {
    "animals": 119, "baby": 17, "bird": 26, "car": 41, "clouds": 175, "dog": 12, "female": 241, "flower": 104,
    "food": 36, "indoor": 268, "lake": 10, "male": 193, "night": 117, "people": 394, "plant_life": 331,
    "portrait": 154, "river": 19, "sea": 52, "sky": 287, "structures": 331, "sunset": 116, "transport": 82,
    "tree": 161, "water": 129,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ real subset


def test_real_subset_cleaned_counts(mirflickr_root):
    d = load_dataset("mirflickr25k", mirflickr_root)
    assert d.layout == "raw" and len(d) == 730
    assert d.label_names == sorted(FREQ_981) == CONCEPTS
    assert d.stats["dropped_no_tag"] == 251 and d.stats["images"] == 981
    assert d.ids[0] == "im1" and d.texts[0] == "cigarette tattoos smoke red dress sunglasses"
    ids = [int(i[2:]) for i in d.ids]
    assert ids == sorted(ids)  # DCMH row order: ascending image id
    n_tags = np.array([len(t.split()) for t in d.texts])
    assert n_tags.min() == 1 and n_tags.max() == 25 and np.median(n_tags) == 4
    assert abs(n_tags.mean() - 4.87) < 0.005
    assert (d.labels.sum(1) >= 1).all()
    assert d.image(0).mode == "RGB" and min(d.image(0).size) == 256


def test_real_subset_all_labelled(mirflickr_root):
    d = load_dataset("mirflickr25k", mirflickr_root, cleaned=False)
    assert len(d) == 981 and d.stats["empty_text"] == 251
    assert dict(zip(d.label_names, d.labels.sum(0).tolist())) == FREQ_981
    assert abs(d.labels.sum(1).mean() - 3.48) < 0.005
    assert sum(len(t.split()) for t in d.texts) == 3556


def test_real_subset_root_forms(mirflickr_root):
    """The bundle root, its parent and the mirflickr/ folder itself all find the same layout."""
    fp = load_dataset("mirflickr25k", mirflickr_root).fingerprint()
    assert load_dataset("mirflickr25k", mirflickr_root.parent).fingerprint() == fp
    assert load_dataset("mirflickr25k", mirflickr_root / "mirflickr").fingerprint() == fp
    assert detect_layout(mirflickr_root) == "raw"


# ------------------------------------------------------------------------------------------------ raw fixtures


def _jpeg(path, colour=(200, 30, 30), size=(12, 8)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path, format="JPEG")


def make_raw(root, n=8, labels=None, tags=None, vocab=("sky", "cat", "red", "tree")):
    """A tiny official raw tree: mirflickr/im*.jpg, meta/tags, doc/common_tags.txt, the annotation folder."""
    img = root / "mirflickr"
    (img / "meta" / "tags").mkdir(parents=True)
    (img / "doc").mkdir()
    ann = root / "mirflickr25k_annotations_v080"
    ann.mkdir()
    labels = labels or {"sky": [1, 2, 3], "animals": [2, 4], "tree": [5, 6, 7]}
    tags = tags or {i: ["sky", "rare_tag", "red"] if i % 2 else ["cat"] for i in range(1, n + 1)}
    for i in range(1, n + 1):
        _jpeg(img / f"im{i}.jpg")
        (img / "meta" / "tags" / f"tags{i}.txt").write_text("".join(t + "\n" for t in tags.get(i, [])))
    (img / "doc" / "common_tags.txt").write_text("".join(f"{w} {50 - k}\n" for k, w in enumerate(vocab)))
    for c in reversed(CONCEPTS):  # created in reverse: the loader must not use directory order
        (ann / f"{c}.txt").write_text("".join(f"{i}\n" for i in labels.get(c, [])))
    (ann / "sky_r1.txt").write_text("1\n")  # stricter relevance: ignored
    (ann / "README.txt").write_text("not a concept\n")
    return root


def test_raw_fixture_protocols(tmp_path):
    root = make_raw(tmp_path, tags={1: ["sky", "rare_tag", "red"], 2: [], 3: ["rare_tag"], 4: ["cat"], 5: ["tree"], 6: ["sky"], 7: ["red"]})
    d = load_dataset("mirflickr25k", root)
    # labelled: 1..7 (8 has none); 2 has no tags and 3 only a rare tag: dropped by the cleaned rule
    assert d.ids == ["im1", "im4", "im5", "im6", "im7"]
    assert d.texts[0] == "sky red"  # common tags only, file order
    assert d.stats == {**d.stats, "dropped_no_label": 1, "dropped_no_tag": 2, "labelled": 7}
    assert d.labels[:, CONCEPTS.index("sky")].tolist() == [1, 0, 0, 0, 0]
    assert d.labels[:, CONCEPTS.index("animals")].tolist() == [0, 1, 0, 0, 0]
    all_ = load_dataset("mirflickr25k", root, cleaned=False)
    assert len(all_) == 7 and all_.stats["empty_text"] == 2 and all_.texts[1] == ""
    raw_tags = load_dataset("mirflickr25k", root, tags="all")
    assert raw_tags.texts[0] == "sky rare_tag red" and "im3" in raw_tags.ids


def test_raw_malformed_annotation_line(tmp_path):
    root = make_raw(tmp_path)
    (root / "mirflickr25k_annotations_v080" / "dog.txt").write_text("3\n4\n-1130179\n")
    with pytest.raises(DatasetError, match=r"dog\.txt:3: malformed line '-1130179'"):
        load_dataset("mirflickr25k", root)


def test_raw_missing_parts_name_what_to_add(tmp_path):
    root = make_raw(tmp_path)
    (root / "mirflickr" / "doc" / "common_tags.txt").unlink()
    with pytest.raises(LayoutError, match="common_tags.txt"):
        load_dataset("mirflickr25k", root)
    assert len(load_dataset("mirflickr25k", root, tags="all")) > 0
    import shutil

    shutil.rmtree(root / "mirflickr25k_annotations_v080")
    with pytest.raises(LayoutError, match="mirflickr25k_annotations_v080"):
        load_dataset("mirflickr25k", root)
    with pytest.raises(LayoutError, match="no MIRFlickr-25K layout"):
        load_dataset("mirflickr25k", tmp_path / "mirflickr" / "meta" / "tags" / "..")


def test_raw_tags_not_utf8_name_file_and_line(tmp_path):
    """A tag file (and an annotation id list) with a byte that is not UTF-8 is one error naming file, line and
    column: nothing is replaced, so no text changes silently (dcmfg.data.textfiles)."""
    root = make_raw(tmp_path)
    tags = root / "mirflickr" / "meta" / "tags" / "tags3.txt"
    tags.write_bytes(b"sky\ncaf\xe9\nred\n")  # latin-1 'cafe'
    with pytest.raises(DatasetError) as err:
        load_dataset("mirflickr25k", root)
    assert str(err.value) == f"{tags}:2: not UTF-8 text (byte 0xe9 at column 4); re-save the file as UTF-8"
    tags.write_bytes("sky\ncafé\nred\n".encode())  # the same word in UTF-8 loads
    assert load_dataset("mirflickr25k", root, tags="all").texts[2] == "sky café red"
    ann = root / "mirflickr25k_annotations_v080" / "tree.txt"
    ann.write_bytes(b"5\n6\n\xff7\n")
    with pytest.raises(DatasetError, match=r"tree\.txt:3: not UTF-8 text \(byte 0xff at column 1\)"):
        load_dataset("mirflickr25k", root)


def test_raw_corrupt_jpeg_fails_at_read_time(tmp_path):
    root = make_raw(tmp_path)
    (root / "mirflickr" / "im1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    d = load_dataset("mirflickr25k", root)  # loading does not decode images
    with pytest.raises(ImageReadError, match="im1.jpg"):
        d.image(0)
    assert d.image(1).size == (12, 8)


# ------------------------------------------------------------------------------------------------ .mat fixtures

N, H, W = 10, 8, 6  # non-square so that a wrong transpose shows


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N, H, W, 3), dtype=np.uint8)  # N x H x W x 3, what the loader must return
    labels = (rng.random((N, 24)) < 0.2).astype(np.uint8)
    labels[:, 0] = 1
    bag = (rng.random((N, 5)) < 0.4).astype(np.uint8)
    bag[:, 2] = 1
    return images, labels, bag


WORDS = ["explore", "sky", "nikon", "canon", "red"]


def _h5_write(path, arrays: dict):
    """Write like MATLAB -v7.3: a 512-byte user block, every array stored with its axes reversed."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        for key, arr in arrays.items():
            f.create_dataset(key, data=np.ascontiguousarray(np.asarray(arr).T))


def _check(d, images, labels, bag):
    assert len(d) == N and d.label_names == CONCEPTS
    assert np.array_equal(d.labels, labels)
    assert d.texts[0] == " ".join(w for w, b in zip(WORDS, bag[0]) if b)
    for i in (0, 3, N - 1):
        assert np.array_equal(np.asarray(d.image(i)), images[i])
    sub = d.subset([5, 2, 2])
    assert np.array_equal(np.asarray(sub.image_array), images[[5, 2, 2]])


def test_djsrh_v5(tmp_path):
    from scipy.io import savemat

    images, labels, bag = _arrays()
    # MATLAB order H x W x 3 x N, as a v5 file made in MATLAB holds it
    savemat(tmp_path / "mirflickr25k-iall.mat", {"IAll": images.transpose(1, 2, 3, 0)})
    savemat(tmp_path / "mirflickr25k-yall.mat", {"YAll": bag})
    savemat(tmp_path / "mirflickr25k-lall.mat", {"LAll": labels})
    with pytest.raises(LayoutError, match=r"bag-of-tags.*no word list.*add the word list"):
        load_dataset("mirflickr25k", tmp_path)
    (tmp_path / "yall_words.txt").write_text("\n".join(WORDS) + "\n")
    savemat(tmp_path / "mirflickr25k-fall.mat", {"FAll": np.array([[f"im{i + 1}.jpg"] for i in range(N)], dtype=object)})
    d = load_dataset("mirflickr25k", tmp_path)
    assert d.layout == "djsrh-mat" and d.ids[:2] == ["im1", "im2"]
    _check(d, images, labels, bag)


def test_djsrh_v73_transposed(tmp_path):
    images, labels, bag = _arrays(1)
    # h5py view: IAll (N, 3, W, H) [stored C, W, H], LAll (24, N), YAll (5, N)
    _h5_write(tmp_path / "mirflickr25k-iall.mat", {"IAll": images.transpose(1, 2, 3, 0)})
    _h5_write(tmp_path / "mirflickr25k-yall.mat", {"YAll": bag})
    _h5_write(tmp_path / "mirflickr25k-lall.mat", {"LAll": labels})
    import h5py

    with h5py.File(tmp_path / "mirflickr25k-iall.mat", "r") as f:
        assert f["IAll"].shape == (N, 3, W, H)
    (tmp_path / "common_tags.txt").write_text("".join(f"{w} 20\n" for w in WORDS))
    with pytest.warns(UserWarning, match="may name the wrong tags"):  # accepted, with the column-order caveat
        d = load_dataset("mirflickr25k", tmp_path)
    assert d.layout == "djsrh-mat" and type(d.image_array).__name__ == "H5ImageArray"
    _check(d, images, labels, bag)


def test_dcmh_flickr25k_mat(tmp_path):
    images, labels, bag = _arrays(2)
    _h5_write(tmp_path / "FLICKR-25K.mat", {"images": images.transpose(1, 2, 3, 0), "YAll": bag, "LAll": labels})
    (tmp_path / "yall_words.txt").write_text("\n".join(WORDS) + "\n")
    d = load_dataset("mirflickr25k", tmp_path)
    assert d.layout == "dcmh-mat"
    _check(d, images, labels, bag)


def test_feature_only_mat_is_refused(tmp_path):
    from scipy.io import savemat

    _, labels, bag = _arrays()
    savemat(tmp_path / "mirflickr25k-iall-vgg.mat", {"XAll": np.zeros((N, 16), np.float32)})
    savemat(tmp_path / "mirflickr25k-lall.mat", {"LAll": labels})
    savemat(tmp_path / "mirflickr25k-yall.mat", {"YAll": bag})
    assert detect_layout(tmp_path) == "features-mat"
    with pytest.raises(LayoutError, match=r"only CNN features.*mirflickr25k-iall-vgg.mat.*add mirflickr25k-iall.mat"):
        load_dataset("mirflickr25k", tmp_path)


def test_label_matrix_of_wrong_width(tmp_path):
    from scipy.io import savemat

    images, labels, bag = _arrays()
    savemat(tmp_path / "mirflickr25k-iall.mat", {"IAll": images.transpose(1, 2, 3, 0)})
    savemat(tmp_path / "mirflickr25k-yall.mat", {"YAll": bag})
    savemat(tmp_path / "mirflickr25k-lall.mat", {"LAll": labels[:, :20]})
    (tmp_path / "yall_words.txt").write_text("\n".join(WORDS) + "\n")
    with pytest.raises(DatasetError, match=r"mirflickr25k-lall.mat: LAll has shape \(10, 20\)"):
        load_dataset("mirflickr25k", tmp_path)


def test_v73_cell_array_names_and_pickled_lazy_images(tmp_path):
    """FAll as a v7.3 cell array (object references to char arrays); the lazy image array survives pickling."""
    import pickle

    import h5py

    images, labels, bag = _arrays(3)
    _h5_write(tmp_path / "mirflickr25k-iall.mat", {"IAll": images.transpose(1, 2, 3, 0)})
    _h5_write(tmp_path / "mirflickr25k-yall.mat", {"YAll": bag})
    _h5_write(tmp_path / "mirflickr25k-lall.mat", {"LAll": labels})
    with h5py.File(tmp_path / "mirflickr25k-fall.mat", "w", userblock_size=512) as f:
        refs = []
        for i in range(N):
            chars = np.array([ord(c) for c in f"im{100 + i}.jpg"], dtype=np.uint16)[:, None]  # MATLAB 1 x L
            refs.append(f.create_dataset(f"#refs#/{i}", data=chars).ref)
        f.create_dataset("FAll", data=np.array(refs, dtype=h5py.ref_dtype)[None, :])  # MATLAB N x 1 cell
    (tmp_path / "yall_words.txt").write_text("\n".join(WORDS) + "\n")
    d = load_dataset("mirflickr25k", tmp_path)
    assert d.ids[:2] == ["im100", "im101"]
    sub = d.subset([7, 1])
    back = pickle.loads(pickle.dumps(sub.image_array))
    assert back.shape == (2, H, W, 3) and np.array_equal(np.asarray(back[0]), images[7])
    assert np.array_equal(np.asarray(back), images[[7, 1]])


def test_word_lists_of_the_bundle(mirflickr_root):
    """The per-column .tsv mapping (DCMH YAll order) and common_tags.txt both read as 1,386 words."""
    from dcmfg.data.matfiles import read_word_list

    tsv = read_word_list(mirflickr_root / "extras" / "dcmh_yall_column_to_tag.tsv")
    common = read_word_list(mirflickr_root / "mirflickr" / "doc" / "common_tags.txt")
    assert len(tsv) == len(common) == len(set(tsv)) == 1386 and set(tsv) == set(common)
    assert tsv[:2] == common[:2] == ["explore", "sky"] and tsv != common  # same words, other column order
