"""Feature cache: shapes, cache hits that run no encoder, resume after an interruption, corrupt chunks and stale
manifests rebuilt, unreadable images skipped-and-counted or fatal, caption groups encoded once, the real subset."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dcmfg.backbones import create_image_encoder, create_text_encoder
from dcmfg.config import FeatureConfig
from dcmfg.data.base import CrossModalDataset, ImageReadError
from dcmfg.features import extract_features

IDS = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def encoders():
    # 112 px (an 8 x 8 patch grid) keeps these cache-mechanics tests quick; 224 px runs in the real-subset test
    return create_image_encoder(image_size=112), create_text_encoder()


def _tiny(mirflickr_root: Path, folder: Path, *, corrupt: int | None = None, texts=None) -> CrossModalDataset:
    """A 5-item dataset of real subset images and tags, copied into `folder` (optionally one truncated JPEG)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = mirflickr_root / "mirflickr"
    paths, tags = [], []
    for i in IDS:
        dst = folder / f"im{i}.jpg"
        shutil.copy(src / f"im{i}.jpg", dst)
        paths.append(dst)
        tags.append(" ".join((src / "meta" / "tags" / f"tags{i}.txt").read_text().split()))
    if corrupt is not None:
        data = paths[corrupt].read_bytes()
        paths[corrupt].write_bytes(data[: len(data) // 3])  # truncated: the decoder fails
    labels = np.eye(len(IDS), 3, dtype=np.uint8)
    return CrossModalDataset("tiny", folder, "test", [str(i) for i in IDS], texts or tags, labels,
                             ["a", "b", "c"], image_paths=paths)


def _counts(encoders) -> tuple[int, int]:
    return encoders[0].n_encoded, encoders[1].n_encoded


def _extract(ds, encoders, root, **kw):
    settings = {"batch_size": 2, **{k: kw.pop(k) for k in ("on_corrupt", "batch_size", "workers", "amp") if k in kw}}
    kw = {"chunk_size": 2, "progress": False, **kw}
    return extract_features(ds, FeatureConfig(**settings), image_encoder=encoders[0], text_encoder=encoders[1],
                            cache_root=root, **kw)


def _same(a, b) -> None:
    for name in ("image_global", "image_regions", "text_global", "text_words", "text_mask", "valid"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.fixture(scope="module")
def reference(encoders, mirflickr_root, tmp_path_factory):
    """One uninterrupted extraction of the tiny set, to compare every other path against."""
    tmp = tmp_path_factory.mktemp("ref")
    ds = _tiny(mirflickr_root, tmp / "data")
    return ds, _extract(ds, encoders, tmp / "cache")


def test_shapes_dtypes_and_values(reference, encoders):
    ds, fs = reference
    n = len(IDS)
    assert fs.image_global.shape == (n, 384) and fs.image_regions.shape == (n, 16, 384)
    assert fs.text_global.shape == (n, 384)
    words = [len(t.split()) for t in ds.texts]
    assert fs.text_words.shape == (n, max(words), 384) and fs.text_mask.shape == (n, max(words))
    assert fs.text_mask.sum(1).tolist() == words
    assert all(t.dtype == torch.float16 for t in (fs.image_global, fs.image_regions, fs.text_global, fs.text_words))
    assert fs.text_mask.dtype == torch.bool and fs.valid.dtype == torch.bool and fs.valid.all()
    # the cached numbers are the encoders' outputs (up to float16)
    direct_img = encoders[0].encode([ds.image(3)])
    direct_txt = encoders[1].encode([ds.text(3)])
    assert torch.allclose(fs.image_global[3].float(), direct_img.globals[0], atol=2e-2, rtol=1e-2)
    assert torch.allclose(fs.text_global[3].float(), direct_txt.globals[0], atol=2e-3)
    assert fs.meta["n_corrupt"] == 0 and fs.meta["counts"] == {"items": n, "images": n}
    manifest = json.loads((Path(fs.meta["cache_dir"]) / "manifest.json").read_text())
    assert manifest["key"] == fs.key and manifest["complete"]
    assert len(manifest["chunks"]) == 6  # 3 image + 3 text chunks of 2
    assert all(len(e["sha256"]) == 64 for e in manifest["chunks"].values())


def test_second_call_is_a_cache_hit(reference, encoders, tmp_path, mirflickr_root):
    ds, ref = reference
    root = Path(ref.meta["cache_dir"]).parent
    before = _counts(encoders)
    again = _extract(ds, encoders, root)
    assert _counts(encoders) == before  # no encoder ran
    assert again.meta["from_cache"] and again.key == ref.key
    _same(again, ref)


def test_resume_after_interruption(reference, encoders, tmp_path, mirflickr_root):
    ds = _tiny(mirflickr_root, tmp_path / "data")

    def stop(fname):
        raise KeyboardInterrupt(f"simulated interruption after {fname}")

    before = _counts(encoders)
    with pytest.raises(KeyboardInterrupt):
        _extract(ds, encoders, tmp_path / "cache", on_chunk=stop)
    assert _counts(encoders) == (before[0] + 2, before[1])  # one image chunk of 2 was written
    seen = []
    before = _counts(encoders)
    fs = _extract(ds, encoders, tmp_path / "cache", on_chunk=seen.append)
    assert "image-00000.safetensors" not in seen and len(seen) == 5  # continues at the first missing chunk
    assert _counts(encoders) == (before[0] + len(IDS) - 2, before[1] + len(IDS))
    _same(fs, reference[1])


def test_corrupt_chunk_is_detected_and_rebuilt(reference, encoders, tmp_path, mirflickr_root, caplog):
    ds = _tiny(mirflickr_root, tmp_path / "data")
    fs = _extract(ds, encoders, tmp_path / "cache")
    chunk = Path(fs.meta["cache_dir"]) / "text-00001.safetensors"
    raw = bytearray(chunk.read_bytes())
    raw[-10:] = b"\x7f" * 10  # same size, different numbers: only the hash can tell
    chunk.write_bytes(bytes(raw))
    before = _counts(encoders)
    with caplog.at_level(logging.WARNING, logger="dcmfg.features"):
        again = _extract(ds, encoders, tmp_path / "cache")
    assert "text-00001.safetensors: damaged (same size, other bytes; sha256 does not match" in caplog.text
    assert _counts(encoders) == (before[0], before[1] + 2)  # only that chunk was re-encoded
    _same(again, reference[1])
    # a chunk that is not even a safetensors file (and its manifest hash made to match) is caught as unreadable
    bad = Path(fs.meta["cache_dir"]) / "image-00002.safetensors"
    bad.write_bytes(b"not a safetensors file")
    manifest_path = bad.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    import hashlib

    manifest["chunks"][bad.name]["sha256"] = hashlib.sha256(bad.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dcmfg.features"):
        third = _extract(ds, encoders, tmp_path / "cache")
    assert "image-00002.safetensors: unreadable" in caplog.text
    _same(third, reference[1])


def test_stale_manifest_and_changed_dataset_are_not_reused(reference, encoders, tmp_path, mirflickr_root, caplog):
    ds = _tiny(mirflickr_root, tmp_path / "data")
    fs = _extract(ds, encoders, tmp_path / "cache")
    manifest_path = Path(fs.meta["cache_dir"]) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["dims"]["image"] = 768  # as if made with another backbone
    manifest_path.write_text(json.dumps(manifest))
    before = _counts(encoders)
    with caplog.at_level(logging.WARNING, logger="dcmfg.features"):
        again = _extract(ds, encoders, tmp_path / "cache")
    assert "stale manifest" in caplog.text
    assert _counts(encoders) == (before[0] + len(IDS), before[1] + len(IDS))
    _same(again, reference[1])
    # another text -> another dataset fingerprint -> another key: nothing is reused
    texts = list(ds.texts)
    texts[0] = "something else entirely"
    other = _tiny(mirflickr_root, tmp_path / "data2", texts=texts)
    before = _counts(encoders)
    changed = _extract(other, encoders, tmp_path / "cache")
    assert changed.key != fs.key and not changed.meta["from_cache"]
    assert _counts(encoders) == (before[0] + len(IDS), before[1] + len(IDS))
    assert not torch.equal(changed.text_global[0], fs.text_global[0])
    # row 1 shared a padded batch with row 0, so only numerically equal; rows 2.. are bit-identical
    assert torch.allclose(changed.text_global[1].float(), fs.text_global[1].float(), atol=2e-3)
    assert torch.equal(changed.text_global[2:], fs.text_global[2:])


def test_corrupt_jpeg_skipped_and_counted_or_fatal(reference, encoders, tmp_path, mirflickr_root, caplog):
    ds = _tiny(mirflickr_root, tmp_path / "data", corrupt=2)
    bad = str(ds.image_paths[2])
    with pytest.raises(ImageReadError, match="im3.jpg"):
        _extract(ds, encoders, tmp_path / "cache", on_corrupt="fail")
    with caplog.at_level(logging.WARNING, logger="dcmfg.features"):
        fs = _extract(ds, encoders, tmp_path / "cache", on_corrupt="skip")
    assert fs.valid.tolist() == [True, True, False, True, True]
    assert fs.meta["n_corrupt"] == 1 and fs.meta["corrupt"] == [bad]
    assert bad in caplog.text
    assert (fs.image_global[2] == 0).all() and (fs.image_regions[2] == 0).all()
    ref = reference[1]
    assert torch.equal(fs.image_global[[0, 1, 3, 4]], ref.image_global[[0, 1, 3, 4]])
    assert torch.equal(fs.text_global, ref.text_global)  # the text of that item is still there
    # from the cache: still counted, and still fatal under "fail"
    hit = _extract(ds, encoders, tmp_path / "cache")
    assert hit.meta["from_cache"] and hit.meta["corrupt"] == [bad]
    with pytest.raises(ImageReadError, match="im3.jpg"):
        _extract(ds, encoders, tmp_path / "cache", on_corrupt="fail")
    # the image repaired: its chunk is re-extracted and the item is valid again
    shutil.copy(mirflickr_root / "mirflickr" / "im3.jpg", bad)
    before = _counts(encoders)
    fixed = _extract(ds, encoders, tmp_path / "cache")
    assert fixed.valid.all() and fixed.meta["n_corrupt"] == 0
    assert _counts(encoders)[0] == before[0] + 2  # only the chunk holding that image
    assert torch.equal(fixed.image_global, ref.image_global)


def test_replaced_image_file_reextracts_its_chunk(reference, encoders, tmp_path, mirflickr_root):
    """Issue 12: im4.jpg replaced by another photo after a first extraction must not come from the cache."""
    ds = _tiny(mirflickr_root, tmp_path / "data")
    _extract(ds, encoders, tmp_path / "cache")
    target = ds.image_paths[3]  # im4.jpg, in the second image chunk (rows 2, 3)
    shutil.copy(mirflickr_root / "mirflickr" / "im7.jpg", target)
    before = _counts(encoders)
    fs = _extract(ds, encoders, tmp_path / "cache")
    assert not fs.meta["from_cache"] and fs.meta["changed_files"] == [str(target)]
    assert _counts(encoders) == (before[0] + 2, before[1])  # only that image chunk
    new = encoders[0].encode([ds.image(3)]).globals[0]
    assert torch.allclose(fs.image_global[3].float(), new, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(fs.image_global[3], reference[1].image_global[3], atol=1e-1)
    keep = [0, 1, 2, 4]
    assert torch.equal(fs.image_global[keep], reference[1].image_global[keep])
    assert torch.equal(fs.text_global, reference[1].text_global)
    again = _extract(ds, encoders, tmp_path / "cache")
    assert again.meta["from_cache"] and again.meta["changed_files"] == []


def test_touched_file_costs_a_hash_not_an_extraction(reference, encoders, tmp_path, mirflickr_root):
    ds = _tiny(mirflickr_root, tmp_path / "data")
    fs = _extract(ds, encoders, tmp_path / "cache")
    target = ds.image_paths[1]
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # `touch`: same bytes, new mtime
    before = _counts(encoders)
    again = _extract(ds, encoders, tmp_path / "cache")
    assert again.meta["from_cache"] and _counts(encoders) == before
    _same(again, reference[1])
    record = json.loads((Path(fs.meta["cache_dir"]) / "image-00000.files.json").read_text())
    assert record["stamps"][1]["mtime_ns"] == target.stat().st_mtime_ns  # next time a stat suffices again


def test_truncated_or_removed_file_is_found_on_disk_now(reference, encoders, tmp_path, mirflickr_root):
    """A file that was fine at extraction and is truncated (or removed) later: under on_corrupt="fail" the error
    names it; under "skip" the item becomes invalid. The old cache said 0 unreadable."""
    ds = _tiny(mirflickr_root, tmp_path / "data")
    _extract(ds, encoders, tmp_path / "cache")
    target = ds.image_paths[3]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="im4.jpg"):
        _extract(ds, encoders, tmp_path / "cache", on_corrupt="fail")
    fs = _extract(ds, encoders, tmp_path / "cache", on_corrupt="skip")
    assert fs.valid.tolist() == [True, True, True, False, True] and fs.meta["corrupt"] == [str(target)]
    with pytest.raises(ImageReadError, match="im4.jpg"):  # cached as unreadable: still fatal under "fail"
        _extract(ds, encoders, tmp_path / "cache", on_corrupt="fail")
    target.unlink()
    with pytest.raises(ImageReadError, match="im4.jpg.*not found"):
        _extract(ds, encoders, tmp_path / "cache", on_corrupt="fail")
    gone = _extract(ds, encoders, tmp_path / "cache")
    assert gone.valid.tolist() == [True, True, True, False, True] and not gone.meta["from_cache"]
    assert _extract(ds, encoders, tmp_path / "cache").meta["from_cache"]  # still missing: nothing to redo
    target.write_bytes(data)  # back: its chunk is extracted again and equals the original
    back = _extract(ds, encoders, tmp_path / "cache")
    assert back.valid.all() and torch.equal(back.image_global, reference[1].image_global)


def test_worker_processes_give_the_same_bytes(reference, encoders, tmp_path):
    """DataLoader workers (the default, 2) and in-process reading (workers=0) write identical features."""
    ds, ref = reference
    fs = _extract(ds, encoders, tmp_path / "cache", workers=0)
    _same(fs, ref)
    assert fs.key == ref.key  # the number of workers changes no number, so it is not part of the key


def test_amp_is_off_on_the_cpu(reference, encoders, tmp_path):
    ds, ref = reference
    fs = _extract(ds, encoders, tmp_path / "cache", amp=True)
    assert fs.meta["precision"] == "float32" and fs.key == ref.key
    _same(fs, ref)


def test_caption_groups_encode_each_image_once(reference, encoders, tmp_path, mirflickr_root):
    base = _tiny(mirflickr_root, tmp_path / "data")
    # 7 captions of 3 images: rows 0,1 -> image 1; rows 2,3,4 -> image 2; rows 5,6 -> image 3
    rows = [0, 0, 1, 1, 1, 2, 2]
    ds = CrossModalDataset(
        "tiny-groups", base.root, "test", [f"{i}#{k}" for k, i in enumerate(rows)],
        [f"{base.texts[i]} caption {k}" for k, i in enumerate(rows)], np.ones((7, 1), np.uint8), ["x"],
        image_paths=[base.image_paths[i] for i in rows], groups=np.array(rows),
    )
    before = _counts(encoders)
    fs = _extract(ds, encoders, tmp_path / "cache")
    assert _counts(encoders) == (before[0] + 3, before[1] + 7)
    assert fs.meta["counts"] == {"items": 7, "images": 3}
    assert fs.image_global.shape == (7, 384)
    for k, i in enumerate(rows):
        assert torch.equal(fs.image_global[k], reference[1].image_global[i])
        assert torch.equal(fs.image_regions[k], reference[1].image_regions[i])


def test_bad_options_are_refused(reference, encoders, tmp_path):
    from dcmfg.errors import ConfigError

    with pytest.raises(ConfigError, match="on_corrupt"):
        _extract(reference[0], encoders, tmp_path, on_corrupt="ignore")


def test_truncated_chunk_is_one_warning_line(reference, encoders, tmp_path, mirflickr_root, caplog):
    """A chunk cut short on disk (a disk that damages files): re-extracted, and said in exactly one warning line on
    the "dcmfg.features" logger naming the chunk file and what is wrong with it."""
    ds = _tiny(mirflickr_root, tmp_path / "data")
    fs = _extract(ds, encoders, tmp_path / "cache")
    chunk = Path(fs.meta["cache_dir"]) / "text-00000.safetensors"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    before = _counts(encoders)
    with caplog.at_level(logging.INFO, logger="dcmfg.features"):
        again = _extract(ds, encoders, tmp_path / "cache")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in warnings] == ["dcmfg.features"]
    assert warnings[0].getMessage() == (f"{chunk}: damaged (truncated: {len(data) // 2} of {len(data)} bytes; "
                                        "sha256 does not match the manifest); extracting it again")
    assert "\n" not in warnings[0].getMessage()
    assert _counts(encoders) == (before[0], before[1] + 2)  # that chunk, and only it, was encoded again
    assert chunk.read_bytes() == data
    _same(again, reference[1])


def test_cli_extract_on_a_manifest(mirflickr_root, tmp_path, capsys):
    """`dcmfg features extract` end to end on a bring-your-own JSONL manifest of real images."""
    from dcmfg.cli import main

    (tmp_path / "img").mkdir()
    lines = []
    for i in IDS[:3]:
        shutil.copy(mirflickr_root / "mirflickr" / f"im{i}.jpg", tmp_path / "img" / f"im{i}.jpg")
        tags = (mirflickr_root / "mirflickr" / "meta" / "tags" / f"tags{i}.txt").read_text().split()
        lines.append(json.dumps({"image": f"img/im{i}.jpg", "text": " ".join(tags), "labels": ["a"]}))
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["features", "extract", "--dataset", "manifest", "--root", str(tmp_path / "items.jsonl"),
                 "--cache-root", str(tmp_path / "cache"), "--set", "features.batch_size=2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3 items, 3 images, 0 unreadable" in out and str(tmp_path / "cache") in out


@pytest.mark.slow
def test_real_subset_features(mirflickr_root):
    """The 730 cleaned MIRFlickr pairs with the default backbones, into the shared test cache (reused by the
    model and study tests, which call extract_features the same way)."""
    from dcmfg.data import load_dataset

    ds = load_dataset("mirflickr25k", mirflickr_root)
    assert len(ds) == 730
    fs = extract_features(ds, progress=False)
    assert fs.image_global.shape == (730, 384) and fs.image_regions.shape == (730, 16, 384)
    assert fs.text_global.shape == (730, 384) and fs.text_words.shape[0] == 730
    assert fs.valid.all() and fs.meta["n_corrupt"] == 0
    assert (fs.text_mask.sum(1) >= 1).all()  # every cleaned pair has >= 1 tag
    assert fs.text_words.shape[1] == min(32, max(len(t.split()) for t in ds.texts))
    # nearest image neighbours (cosine on DINOv2 globals) share a label far more often than random pairs do
    g = torch.nn.functional.normalize(fs.image_global.float(), dim=1)
    sim = g @ g.T
    sim.fill_diagonal_(-2)
    nn = sim.argmax(1)
    labels = torch.as_tensor(ds.labels, dtype=torch.float32)
    share_nn = ((labels * labels[nn]).sum(1) > 0).float().mean()
    share_all = ((labels @ labels.T) > 0).float().mean()
    assert share_nn > share_all + 0.05
    again = extract_features(ds, progress=False)
    assert again.meta["from_cache"]
