"""Which datasets a folder (DCMFG_DATA) holds, by layout detection of its sub-folders."""

from __future__ import annotations

import pytest

from dcmfg.data import LayoutError, load_dataset
from dcmfg.data.discover import default_root, find_datasets
from test_data_mirflickr import make_raw as make_mirflickr
from test_data_nuswide import make_raw as make_nuswide


def test_shared_data_folder(mirflickr_root):
    found = find_datasets(mirflickr_root.parent)
    assert ("mirflickr25k", mirflickr_root) in found
    assert find_datasets(mirflickr_root) == [("mirflickr25k", mirflickr_root)]  # the dataset folder itself


def test_mixed_folder(tmp_path, monkeypatch):
    make_mirflickr(tmp_path / "flickr")
    make_nuswide(tmp_path / "nus" / "NUS-WIDE", with_images=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other" / "stuff").mkdir(parents=True)
    (tmp_path / "other" / "stuff" / "notes.txt").write_text("nothing here\n")
    assert find_datasets(tmp_path) == [("mirflickr25k", tmp_path / "flickr"), ("nuswide", tmp_path / "nus")]
    assert find_datasets(tmp_path / "empty") == [] and find_datasets(tmp_path / "missing") == []

    monkeypatch.setenv("DCMFG_DATA", str(tmp_path))
    assert default_root("mirflickr25k") == tmp_path / "flickr"
    assert len(load_dataset("mirflickr25k")) > 0  # root=None: found under DCMFG_DATA
    with pytest.raises(LayoutError, match="none found under DCMFG_DATA"):
        default_root("mscoco")
    monkeypatch.delenv("DCMFG_DATA")
    with pytest.raises(LayoutError, match="DCMFG_DATA is not set"):
        load_dataset("nuswide")


def test_feature_only_folders_are_not_offered(tmp_path):
    import numpy as np
    from scipy.io import savemat

    d = tmp_path / "vgg"
    d.mkdir()
    savemat(d / "mirflickr25k-iall-vgg.mat", {"XAll": np.zeros((4, 8), np.float32)})
    savemat(d / "mirflickr25k-lall.mat", {"LAll": np.ones((4, 24), np.uint8)})
    assert find_datasets(tmp_path) == []


def test_pick_dataset_prefers_real_data(tmp_path, monkeypatch, mirflickr_root):
    from dcmfg.data.discover import pick_dataset

    assert pick_dataset(mirflickr_root.parent) == ("mirflickr25k", mirflickr_root)
    assert pick_dataset(tmp_path) == ("synthetic", None)
    monkeypatch.delenv("DCMFG_DATA", raising=False)
    assert pick_dataset() == ("synthetic", None)
