"""A full disk while feature chunks, the cache manifest or a split file are written (issue 20): one error naming the
file and the OS error (the CLI's one line, exit 2), no temporary file left, nothing already written lost.

The disk is real: a 1 MB tmpfs mounted for the test (root only; skipped where mounting is not allowed), filled to
the last byte at the moment the test chooses.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dcmfg.backbones import create_image_encoder, create_text_encoder
from dcmfg.cli import main
from dcmfg.config import FeatureConfig
from dcmfg.data.base import CrossModalDataset
from dcmfg.errors import WriteFailed
from dcmfg.features import extract_features
from dcmfg.fileio import file_sha256

ENOSPC = "[Errno 28] No space left on device"
PAGE = 4096


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 1 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or 'mount needs root'}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Write a ballast file until the disk refuses one more byte, then give back `leave` bytes (whole pages)."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * PAGE)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    if leave:
        os.truncate(ballast, ballast.stat().st_size - leave)
    return ballast


def pages(n_bytes: int) -> int:
    """The bytes a file of n_bytes takes on a tmpfs (whole pages)."""
    return -(-n_bytes // PAGE) * PAGE


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def test_split_out_on_a_full_disk(tiny_disk, mirflickr_root, capsys):
    out = tiny_disk / "split.json"
    args = ["data", "split", "mirflickr25k", "--root", str(mirflickr_root), "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes()
    capsys.readouterr()
    fill(tiny_disk)
    assert main([*args[:-2], "--seed", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"dcmfg: error: cannot write {out}: {ENOSPC}\n"  # one line, the file the user named
    assert out.read_bytes() == before  # the split already there is left as it was
    assert temp_files(tiny_disk) == []


@pytest.fixture(scope="module")
def encoders():
    return create_image_encoder(image_size=112), create_text_encoder()


def _tiny(mirflickr_root: Path, folder: Path) -> CrossModalDataset:
    """Five real subset images and their tags."""
    folder.mkdir(parents=True)
    src = mirflickr_root / "mirflickr"
    paths, tags = [], []
    for i in range(1, 6):
        shutil.copy(src / f"im{i}.jpg", folder / f"im{i}.jpg")
        paths.append(folder / f"im{i}.jpg")
        tags.append(" ".join((src / "meta" / "tags" / f"tags{i}.txt").read_text().split()))
    return CrossModalDataset("tiny", folder, "test", [str(i) for i in range(1, 6)], tags,
                             np.eye(5, 3, dtype=np.uint8), ["a", "b", "c"], image_paths=paths)


def test_feature_chunks_on_a_full_disk(tiny_disk, encoders, mirflickr_root, tmp_path):
    ds = _tiny(mirflickr_root, tmp_path / "data")

    def extract(root, **kw):
        return extract_features(ds, FeatureConfig(batch_size=2), image_encoder=encoders[0],
                                text_encoder=encoders[1], cache_root=root, chunk_size=2, progress=False, **kw)

    reference = extract(tmp_path / "elsewhere")
    written = []

    def disk_fills_after_the_first_chunk(fname):
        written.append(fname)
        if len(written) == 1:
            fill(tiny_disk)

    with pytest.raises(WriteFailed) as err:
        extract(tiny_disk / "cache", on_chunk=disk_fills_after_the_first_chunk)
    folder = tiny_disk / "cache" / reference.key
    assert str(err.value) == f"cannot write {folder / 'image-00001.safetensors'}: {ENOSPC}"
    assert temp_files(tiny_disk) == []
    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest["chunks"]) == written == ["image-00000.safetensors"]  # what was written is recorded
    assert manifest["chunks"]["image-00000.safetensors"]["sha256"] == file_sha256(folder / "image-00000.safetensors")

    (tiny_disk / "ballast").unlink()  # space again: the next run resumes after the chunk already written
    written.clear()
    again = extract(tiny_disk / "cache", on_chunk=written.append)
    assert "image-00000.safetensors" not in written and len(written) == 5
    for name in ("image_global", "image_regions", "text_global", "text_words", "text_mask", "valid"):
        assert torch.equal(getattr(again, name), getattr(reference, name)), name


def test_manifest_on_a_full_disk(tiny_disk, encoders, mirflickr_root, tmp_path):
    """The disk fills between a chunk and the manifest that records it: just room for the next chunk and its file
    record. The error names the manifest; the manifest already there stays whole and lists the chunks before."""
    ds = _tiny(mirflickr_root, tmp_path / "data")
    written = []

    def room_for_one_more_chunk(fname):
        written.append(fname)
        if len(written) == 1:
            folder = tiny_disk / "cache" / next(p.name for p in (tiny_disk / "cache").iterdir())
            chunk, record = folder / fname, folder / fname.replace(".safetensors", ".files.json")
            fill(tiny_disk, leave=pages(chunk.stat().st_size) + pages(record.stat().st_size))  # chunk 2 as big

    with pytest.raises(WriteFailed) as err:
        extract_features(ds, FeatureConfig(batch_size=2), image_encoder=encoders[0], text_encoder=encoders[1],
                         cache_root=tiny_disk / "cache", chunk_size=2, progress=False, on_chunk=room_for_one_more_chunk)
    folder = next((tiny_disk / "cache").iterdir())
    assert str(err.value) == f"cannot write {folder / 'manifest.json'}: {ENOSPC}"
    assert temp_files(tiny_disk) == []
    manifest = json.loads((folder / "manifest.json").read_text())  # still whole JSON: the previous one
    assert list(manifest["chunks"]) == written == ["image-00000.safetensors"]
