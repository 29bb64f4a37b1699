"""The feature cache on disk: its layout, its key, its manifest, its lock, and whether what it holds still holds.

Layout of one cache (`<cache_root or cache_dir()/features>/<key>/`):
- `image-00000.safetensors`, ...: per distinct image (a group of captions shares one), `global` (n, Di),
  `regions` (n, r*r, Di) float16, `valid` (n,) bool;
- `image-00000.files.json`: per image of that chunk the file's size, mtime and sha256 when it was read;
- `text-00000.safetensors`, ...: per item, `global` (n, Dt), `words` (n, W_chunk, Dt) float16, `mask` (n, W_chunk);
- `manifest.json`: the key and what it was made from, counts, dims, and per chunk its range, sha256 and the
  unreadable images it holds.
The key covers what every feature depends on except the image bytes: dataset fingerprint (ids, texts, labels),
backbones (weights, preprocessing), settings and numeric precision. The image files are checked per chunk on every
load: a file whose size and mtime are as recorded is trusted; otherwise its sha256 decides (a `touch` costs a hash,
not an extraction); a changed, removed or newly unreadable file gets its chunk re-extracted.
Every file is written atomically and the manifest is rewritten after each chunk, so an interrupted run resumes at
the first missing chunk. A chunk whose bytes do not match the manifest, or a manifest made for another key, is
rebuilt, never used, and said in one warning line on the "dcmfg.features" logger (which file, what is wrong with
it: truncated to how many bytes, not a safetensors file, other bytes).
A write the disk refuses (full, read-only, over quota) stops the extraction with one `WriteFailed` naming the file
and the OS error (the CLI's one line, exit 2); no temporary file is left and the chunks already written stay listed
in the manifest, so the next run resumes after them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dcmfg.choices import OnCorrupt
from dcmfg.data.base import CrossModalDataset, ImageReadError
from dcmfg.errors import writing
from dcmfg.fileio import file_sha256, save_safetensors_atomic, write_text_atomic
from dcmfg.paths import cache_dir

from .job import Job, chunk_name

log = logging.getLogger("dcmfg.features")  # one logger for the package: what users and tests filter on

FORMAT_VERSION = 2  # 2: per-chunk image file stamps, numeric precision in the key
CHUNK_SIZE = 1024


def feature_root(cache_root: str | Path | None = None) -> Path:
    return Path(cache_root) if cache_root is not None else cache_dir() / "features"


def key_material(dataset: CrossModalDataset, img_enc, txt_enc, *, regions: int, max_words: int, image_size: int,
                 chunk_size: int, autocast: torch.dtype | None) -> dict:
    """What the cache key covers (everything the features depend on except the image bytes)."""
    return {
        "format": FORMAT_VERSION,
        "dataset": dataset.name,
        "fingerprint": dataset.fingerprint(),
        "image_cache_key": img_enc.cache_key,
        "text_cache_key": txt_enc.cache_key,
        "regions": regions,
        "max_words": max_words,
        "image_size": image_size,
        "chunk_size": chunk_size,
        "precision": "float32" if autocast is None else f"autocast-{str(autocast).removeprefix('torch.')}",
    }


def cache_key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


@contextlib.contextmanager
def locked(folder: Path):
    """Hold the cache folder's `.lock` (flock): one extractor per cache at a time, a second one waits."""
    with writing(folder / ".lock"):
        f = open(folder / ".lock", "w")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is extracting into this cache; waiting for it", folder)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- writing -----------------------------------------------------------------------------------------------------

def files_path(folder: Path, fname: str) -> Path:
    """The record of the image files a chunk was made from, beside the chunk."""
    return folder / fname.replace(".safetensors", ".files.json")


def write_chunk(folder: Path, fname: str, tensors: dict) -> str:
    """Write one chunk atomically; returns its sha256. A refused write is one `WriteFailed` naming the chunk."""
    with writing(folder / fname, also=(SafetensorError,)):  # safetensors reports an OS error as its own
        return save_safetensors_atomic(tensors, folder / fname)


def write_record(path: Path, text: str) -> None:
    """Write one of the cache's JSON records (manifest, image-file record) atomically, or raise `WriteFailed`."""
    with writing(path):
        write_text_atomic(path, text)


def write_manifest(folder: Path, manifest: dict) -> None:
    manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_record(folder / "manifest.json", json.dumps(manifest, indent=1))


# ---- what the cache holds and whether it still holds -------------------------------------------------------------

def read_manifest(job: Job) -> dict:
    """The folder's manifest if it was made for this key, else a fresh one (a stale or unreadable one is logged).
    Chunk entries that ranks of an interrupted torchrun left in `manifest.rank<r>.json` are merged in."""
    want = {"key": job.key, "material": job.material, "dims": job.dims, "counts": job.counts}
    fresh = {"format": FORMAT_VERSION, **want, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "complete": False, "chunks": {}}
    path = job.folder / "manifest.json"
    manifest = fresh
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable manifest (%s); rebuilding the cache", path, exc)
            old = None
        if isinstance(old, dict) and all(old.get(k) == v for k, v in want.items()) \
                and isinstance(old.get("chunks"), dict):
            manifest = old
        elif old is not None:
            log.warning("%s: stale manifest (made for another key, backbone or dataset); rebuilding the cache", path)
    manifest["backbones"] = {"image": job.img_enc.name, "text": job.txt_enc.name}  # for people reading the file
    if any(job.folder.glob("manifest.rank*.json")):
        merge_rank_manifests(job, manifest)
    return manifest


def merge_rank_manifests(job: Job, manifest: dict) -> None:
    """Add the chunk entries other ranks (of this run, or of an interrupted one) recorded, then drop their files.
    Every entry is checked against its file's sha256 before use, like any other."""
    for path in sorted(job.folder.glob("manifest.rank*.json")):
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); its chunks will be re-extracted", path, exc)
            part = {}
        if isinstance(part, dict) and part.get("key") == job.key and isinstance(part.get("chunks"), dict):
            manifest["chunks"].update(part["chunks"])
    write_manifest(job.folder, manifest)
    for path in job.folder.glob("manifest.rank*.json"):
        path.unlink(missing_ok=True)


def check_cache(job: Job, manifest: dict, plan: list) -> tuple[dict, list, list[str]]:
    """Load every chunk that is still valid; return (loaded tensors, chunks to extract, changed image files).

    An image chunk is valid when its bytes match the manifest and every image file it was made from is unchanged
    (size and mtime as recorded, or else the same sha256). Under on_corrupt="fail" an image recorded as unreadable
    that is still unchanged raises its read error (the file is read again for that)."""
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    todo, changed = [], []
    for kind, i, s, e in plan:
        fname = chunk_name(kind, i)
        entry = manifest["chunks"].get(fname)
        ok = entry is not None and (entry.get("start"), entry.get("stop")) == (s, e)
        if ok and kind == "image":
            moved = _changed_images(job, fname, job.image_rows[s:e], entry)
            changed += moved
            ok = not moved
            # Unchanged unreadable files stay unreadable; "fail" reads them again to raise their own error, and an
            # image array (no file to stamp) is re-checked by decoding.
            if ok and entry.get("corrupt_rows") and (job.on_corrupt == OnCorrupt.FAIL or job.dataset.image_paths is None):
                ok = _still_unreadable(job.dataset, entry["corrupt_rows"], job.on_corrupt, fname)
        tensors = load_chunk(job.folder / fname, entry, job.shapes(kind, s, e)) if ok else None
        if tensors is None:
            manifest["chunks"].pop(fname, None)
            todo.append((kind, fname, s, e))
        else:
            loaded[fname] = tensors
    return loaded, todo, changed


def load_chunk(path: Path, entry: dict, shapes: dict[str, tuple]) -> dict[str, torch.Tensor] | None:
    """The chunk's tensors if its bytes match the manifest and its shapes are as expected, else None, said in one
    warning line: which chunk file, what is wrong with it, and that it is extracted again."""
    if not path.exists():
        log.warning("%s: listed in the manifest but missing; extracting it again", path)
        return None
    if file_sha256(path) != entry.get("sha256"):
        log.warning("%s: damaged (%s; sha256 does not match the manifest); extracting it again", path, _damage(path))
        return None
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # unreadable despite a matching hash: treat as corrupt
        log.warning("%s: unreadable (%s); extracting it again", path, exc)
        return None
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape) if name in tensors else None
        fits = got is not None and len(got) == len(shape) and all(s in (None, g) for s, g in zip(shape, got))
        if not fits:
            log.warning("%s: tensor %r has shape %s, expected %s; extracting it again", path, name, got, shape)
            return None
    return tensors


def _damage(path: Path) -> str:
    """What is wrong with a safetensors file whose bytes changed, in words: truncated (its header says how long it
    should be), longer than its header says, not a safetensors file at all, or the same length with other bytes."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 2 <= n <= size - 8 else None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        expected = 8 + n + max(ends, default=0)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError):
        expected = None
    if expected is None:
        return f"not a safetensors file, {size} bytes" if size else "empty"
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    if size > expected:
        return f"{size - expected} bytes more than its header describes"
    return "same size, other bytes"


def stamp(path: Path) -> dict | None:
    """Size, mtime and sha256 of an image file as it is now (None: missing or not readable)."""
    try:
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    except OSError:
        return None


def _changed_images(job: Job, fname: str, rows: np.ndarray, entry: dict) -> list[str]:
    """Image files of a cached chunk that are not what it was made from (empty: all unchanged).

    Size + mtime as recorded: unchanged without reading the file. Otherwise the sha256 decides; a file that only
    got a new mtime has its record updated (so the next check is a stat again)."""
    paths = job.dataset.image_paths
    if paths is None:
        return []  # an in-memory image array has no files; the dataset fingerprint covers its source
    record_path = files_path(job.folder, fname)
    try:
        record = json.loads(record_path.read_text())
        stamps = record["stamps"]
        if record.get("rows") != [int(r) for r in rows] or len(stamps) != len(rows):
            raise ValueError("rows do not match the chunk")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: no valid record of the image files (%s); re-extracting %s", record_path, exc, fname)
        return [f"{fname} (no file record)"]
    changed, touched = [], False
    for j, r in enumerate(rows):
        path, old = Path(paths[int(r)]), stamps[j]
        try:
            st = os.stat(path)
            readable = os.access(path, os.R_OK)
        except OSError:
            st, readable = None, False
        if old is None:  # missing or unreadable when the chunk was made: unchanged while it still is
            if st is not None and readable:
                changed.append(str(path))
            continue
        if st is None or not readable:
            changed.append(str(path))
            continue
        if (st.st_size, st.st_mtime_ns) == (old["size"], old["mtime_ns"]):
            continue
        now = stamp(path)
        if now is not None and now["sha256"] == old["sha256"]:
            stamps[j], touched = now, True  # touched, same bytes: keep the chunk, remember the new mtime
        else:
            changed.append(str(path))
    if changed:
        log.info("%s: %d image file(s) changed since extraction (%s); re-extracting it", fname, len(changed),
                 ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else ""))
    elif touched:
        write_record(record_path, json.dumps(record))
    return changed


def _still_unreadable(dataset, rows: list[int], on_corrupt: str, fname: str) -> bool:
    """True when every image a cached chunk recorded as unreadable still is (under "fail": raise its error).
    False (the chunk is re-extracted) once any of them reads."""
    for r in rows:
        try:
            dataset.image(int(r))
        except ImageReadError:
            if on_corrupt == OnCorrupt.FAIL:
                raise
            continue
        log.info("%s is readable now; re-extracting %s", dataset.image_key(int(r)), fname)
        return False
    return True
