"""The synthetic set: deterministic by seed, labels visible in both modalities."""

from __future__ import annotations

import numpy as np
import pytest

from dcmfg.data import DatasetError, load_dataset
from dcmfg.data.synthetic import LABEL_NAMES, SYNONYMS


def test_synthetic_is_deterministic_and_seed_dependent():
    a = load_dataset("synthetic", None, n=50, seed=3, image_size=32)
    b = load_dataset("synthetic", None, n=50, seed=3, image_size=32)
    c = load_dataset("synthetic", None, n=50, seed=4, image_size=32)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.image_array, b.image_array)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not np.array_equal(a.image_array, c.image_array)
    # a different image size is a different dataset for caches, even though the texts are drawn alike
    assert load_dataset("synthetic", None, n=50, seed=3, image_size=48).fingerprint() != a.fingerprint()


def test_synthetic_shape_and_labels():
    d = load_dataset("synthetic", None, n=200, seed=0, image_size=64)
    assert len(d) == 200 and d.image_array.shape == (200, 64, 64, 3) and d.image_array.dtype == np.uint8
    assert d.label_names == sorted(LABEL_NAMES) and d.labels.shape == (200, len(LABEL_NAMES))
    assert (d.labels.sum(1) >= 2).all()  # every item has a shape and a colour
    assert (d.labels.sum(0) > 0).all()  # every label occurs
    assert d.image(0).size == (64, 64) and d.image(0).mode == "RGB"
    assert all(t.strip() for t in d.texts)


def test_synthetic_text_names_its_labels():
    """Most true labels are named in the text (by a synonym): the text side is learnable."""
    d = load_dataset("synthetic", None, n=300, seed=1)
    word_to_label = {w: name for name, words in SYNONYMS.items() for w in words}
    named = np.zeros_like(d.labels)
    for i, t in enumerate(d.texts):
        for w in t.split():
            if w in word_to_label:
                named[i, d.label_names.index(word_to_label[w])] = 1
    recall = (named & d.labels).sum() / d.labels.sum()
    precision = (named & d.labels).sum() / named.sum()
    assert 0.75 < recall < 0.95 and 0.85 < precision < 1.0  # noisy, but informative


def test_synthetic_colour_visible_in_pixels():
    """The mean colour of an image moves with its colour labels: the image side is learnable."""
    d = load_dataset("synthetic", None, n=300, seed=2, image_size=32)
    mean_rgb = d.image_array.reshape(len(d), -1, 3).mean(1)
    red = d.labels[:, d.label_names.index("red")].astype(bool)
    blue = d.labels[:, d.label_names.index("blue")].astype(bool)
    assert mean_rgb[red & ~blue, 0].mean() > mean_rgb[blue & ~red, 0].mean() + 5
    assert mean_rgb[blue & ~red, 2].mean() > mean_rgb[red & ~blue, 2].mean() + 5


def test_synthetic_rejects_bad_options():
    with pytest.raises(DatasetError, match="unknown option"):
        load_dataset("synthetic", None, colours=3)
