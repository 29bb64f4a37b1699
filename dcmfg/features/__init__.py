"""Frozen backbone features, extracted once and cached on disk.

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
logged and rebuilt, never used.

Images are read, decoded and preprocessed by `features.workers` DataLoader processes while the main process runs the
backbone on batches (pinned memory and non-blocking copies on CUDA; `features.amp` autocasts there). Under torchrun
(an initialised process group) the chunks to extract are shared out across ranks: each rank writes its own chunk
files, rank 0 merges the manifest; every rank returns the whole FeatureSet.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dcmfg.config import FeatureConfig
from dcmfg.data.base import CrossModalDataset, ImageReadError
from dcmfg.distributed import init_from_env, rank_world
from dcmfg.errors import ConfigError
from dcmfg.fileio import file_sha256, save_safetensors_atomic, write_text_atomic
from dcmfg.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: per-chunk image file stamps, numeric precision in the key
CHUNK_SIZE = 1024


@dataclass
class FeatureSet:
    image_global: torch.Tensor  # (N, Di) float16
    image_regions: torch.Tensor  # (N, R, Di) float16, R = regions * regions (an r x r grid, row-major)
    text_global: torch.Tensor  # (N, Dt) float16
    text_words: torch.Tensor  # (N, W, Dt) float16
    text_mask: torch.Tensor  # (N, W) bool
    valid: torch.Tensor  # (N,) bool: False where the image could not be read (its features are zeros)
    key: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.image_global.shape[0]


def feature_root(cache_root: str | Path | None = None) -> Path:
    return Path(cache_root) if cache_root is not None else cache_dir() / "features"


def _image_units(dataset: CrossModalDataset) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose image is encoded (the first row of each group) and, per row, the index of its image."""
    n = len(dataset)
    if dataset.groups is None:
        return np.arange(n), np.arange(n)
    _, first, inverse = np.unique(np.asarray(dataset.groups), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # images in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.reshape(-1)]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _load_chunk(path: Path, entry: dict, shapes: dict[str, tuple]) -> dict[str, torch.Tensor] | None:
    """The chunk's tensors if its bytes match the manifest and its shapes are as expected, else None (logged)."""
    from safetensors.torch import load_file

    if not path.exists():
        log.warning("%s: listed in the manifest but missing; rebuilding it", path)
        return None
    if file_sha256(path) != entry.get("sha256"):
        log.warning("%s: sha256 does not match the manifest (corrupt); rebuilding it", path)
        return None
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # unreadable despite a matching hash: treat as corrupt
        log.warning("%s: unreadable (%s); rebuilding it", path, exc)
        return None
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape) if name in tensors else None
        fits = got is not None and len(got) == len(shape) and all(s in (None, g) for s, g in zip(shape, got))
        if not fits:
            log.warning("%s: tensor %r has shape %s, expected %s; rebuilding it", path, name, got, shape)
            return None
    return tensors


# ---- devices, precision, processes --------------------------------------------------------------------------------

def _device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    from dcmfg.device import resolve_device

    return resolve_device(str(device))


def amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype features are computed in: None (float32) on the CPU or with amp off; on CUDA bfloat16
    where the GPU has it, else float16. It changes the numbers, so it is part of the cache key."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _resolve_encoders(cfg: FeatureConfig, image_encoder, text_encoder, device):
    from dcmfg.backbones import create_image_encoder, create_text_encoder

    img = image_encoder or create_image_encoder(cfg.image_backbone, regions=cfg.regions, image_size=cfg.image_size,
                                                device=str(device))
    txt = text_encoder or create_text_encoder(cfg.text_backbone, max_words=cfg.max_words, device=str(device))
    return img, txt


@dataclass
class _Job:
    """Everything one extraction needs, passed around as one object."""

    dataset: CrossModalDataset
    folder: Path
    key: str
    material: dict
    img_enc: object
    txt_enc: object
    image_rows: np.ndarray  # dataset row of each distinct image
    row_to_image: np.ndarray
    dims: dict
    batch_size: int
    chunk_size: int
    on_corrupt: str
    workers: int
    device: torch.device
    amp: torch.dtype | None
    progress: bool
    on_chunk: Callable[[str], None] | None

    @property
    def counts(self) -> dict:
        return {"items": len(self.dataset), "images": len(self.image_rows)}

    def plan(self) -> list[tuple[str, int, int, int]]:
        n, m = len(self.dataset), len(self.image_rows)
        plan = [("image", i, s, e) for i, (s, e) in enumerate(_chunks(m, self.chunk_size))]
        return plan + [("text", i, s, e) for i, (s, e) in enumerate(_chunks(n, self.chunk_size))]

    def shapes(self, kind: str, s: int, e: int) -> dict:
        di, dt, r = self.dims["image"], self.dims["text"], self.dims["regions"]
        if kind == "image":
            return {"global": (e - s, di), "regions": (e - s, r * r, di), "valid": (e - s,)}
        return {"global": (e - s, dt), "words": (e - s, None, dt), "mask": (e - s, None)}


def extract_features(
    dataset: CrossModalDataset,
    config: FeatureConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    image_encoder=None,
    text_encoder=None,
    cache_root: str | Path | None = None,
    progress: bool = True,
    chunk_size: int = CHUNK_SIZE,
    on_chunk: Callable[[str], None] | None = None,
) -> FeatureSet:
    """Features of every item of `dataset` under the settings of `config` (the `features` section of the run's
    config; None: its defaults), from the cache when it holds them, else extracted (and cached).

    `device`: auto | cpu | cuda[:N] (or a torch.device). `image_encoder` / `text_encoder` replace the backbones the
    config names by encoder objects (then `regions`, `image_size`, `max_words` and the device are the encoder's
    own). `on_chunk(filename)` is called after each chunk this process writes. Under an initialised
    torch.distributed process group the work is shared out by chunk across ranks (see the module docstring).
    """
    cfg = config if config is not None else FeatureConfig()
    on_corrupt, batch_size, workers = cfg.on_corrupt, cfg.batch_size, cfg.workers
    if on_corrupt not in ("skip", "fail"):
        raise ConfigError(f"features.on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    if len(dataset) == 0:
        raise ConfigError(f"{dataset.root}: dataset {dataset.name!r} has no items to extract features from")
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"features.batch_size and chunk_size must be >= 1 (got {batch_size}, {chunk_size})")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"features.workers must be an integer >= 0, got {workers!r}")
    dev = _device(device)
    img_enc, txt_enc = _resolve_encoders(cfg, image_encoder, text_encoder, dev)
    dev = getattr(img_enc, "device", dev)  # an encoder object passed in runs where it lives
    regions = int(getattr(img_enc, "regions", cfg.regions))
    max_words = int(getattr(txt_enc, "max_words", cfg.max_words))
    autocast = amp_dtype(bool(cfg.amp), dev)
    image_rows, row_to_image = _image_units(dataset)
    material = {
        "format": FORMAT_VERSION,
        "dataset": dataset.name,
        "fingerprint": dataset.fingerprint(),
        "image_cache_key": img_enc.cache_key,
        "text_cache_key": txt_enc.cache_key,
        "regions": regions,
        "max_words": max_words,
        "image_size": int(getattr(img_enc, "image_size", cfg.image_size)),
        "chunk_size": chunk_size,
        "precision": "float32" if autocast is None else f"autocast-{str(autocast).removeprefix('torch.')}",
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    folder = feature_root(cache_root) / key
    folder.mkdir(parents=True, exist_ok=True)
    dims = {"image": int(img_enc.dim), "text": int(txt_enc.dim), "regions": regions, "max_words": max_words}
    job = _Job(dataset, folder, key, material, img_enc, txt_enc, image_rows, row_to_image, dims, batch_size,
               chunk_size, on_corrupt, workers, dev, autocast, progress, on_chunk)
    rank, world = rank_world()
    # One extractor per cache at a time: a second process (a notebook beside a test run) waits, then reads it.
    # Under torchrun rank 0 holds the lock for all ranks.
    with _locked(folder) if rank == 0 else contextlib.nullcontext():
        if world == 1:
            return _extract_single(job)
        return _extract_distributed(job, rank, world)


@contextlib.contextmanager
def _locked(folder: Path):
    import fcntl

    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is extracting into this cache; waiting for it", folder)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _extract_single(job: _Job) -> FeatureSet:
    manifest = _read_manifest(job)
    plan = job.plan()
    loaded, todo, changed = _check_cache(job, manifest, plan)
    t0 = time.perf_counter()
    if todo:
        log.info("%s: %d of %d chunks cached; extracting %d", job.folder, len(plan) - len(todo), len(plan), len(todo))
        manifest["complete"] = False
        _extract_chunks(job, todo, loaded, manifest, lambda: _write_manifest(job.folder, manifest))
        manifest["complete"] = True
        _write_manifest(job.folder, manifest)
    return _finish(job, manifest, loaded, plan, from_cache=not todo, changed=changed,
                   seconds=time.perf_counter() - t0 if todo else 0.0)


def _extract_distributed(job: _Job, rank: int, world: int) -> FeatureSet:
    """Rank 0 checks the cache and shares out the missing chunks; each rank extracts its share into its own chunk
    files (and a `manifest.rank<r>.json` of them); rank 0 merges those into the manifest; every rank then loads
    the whole set."""
    import torch.distributed as dist

    dist.barrier()  # rank 0 holds the lock from here on
    plan = job.plan()
    manifest, loaded, payload = None, {}, [None]
    if rank == 0:
        manifest = _read_manifest(job)
        loaded, todo, changed = _check_cache(job, manifest, plan)
        payload = [(todo, changed)]
        if todo:
            manifest["complete"] = False
            _write_manifest(job.folder, manifest)
    dist.broadcast_object_list(payload, src=0)
    todo, changed = payload[0]
    mine = todo[rank::world]
    t0 = time.perf_counter()
    if mine:
        if rank == 0:
            _extract_chunks(job, mine, loaded, manifest, lambda: _write_manifest(job.folder, manifest))
        else:
            own = {"format": FORMAT_VERSION, "key": job.key, "chunks": {}}
            path = job.folder / f"manifest.rank{rank}.json"
            _extract_chunks(job, mine, loaded, own, lambda: write_text_atomic(path, json.dumps(own, indent=1)))
    seconds = time.perf_counter() - t0
    dist.barrier()
    if rank == 0:
        _merge_rank_manifests(job, manifest)
        manifest["complete"] = True
        _write_manifest(job.folder, manifest)
    dist.barrier()
    if rank != 0:
        manifest = json.loads((job.folder / "manifest.json").read_text())
    for kind, i, s, e in plan:  # what other ranks wrote (or, on ranks > 0, what was cached)
        fname = f"{kind}-{i:05d}.safetensors"
        if fname not in loaded:
            tensors = _load_chunk(job.folder / fname, manifest["chunks"].get(fname, {}), job.shapes(kind, s, e))
            if tensors is None:
                raise RuntimeError(f"{job.folder / fname}: written by another rank but not readable here")
            loaded[fname] = tensors
    return _finish(job, manifest, loaded, plan, from_cache=not todo, changed=changed, seconds=seconds)


def _merge_rank_manifests(job: _Job, manifest: dict) -> None:
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
    _write_manifest(job.folder, manifest)
    for path in job.folder.glob("manifest.rank*.json"):
        path.unlink(missing_ok=True)


def _finish(job: _Job, manifest: dict, loaded: dict, plan: list, *, from_cache: bool, changed: list,
            seconds: float) -> FeatureSet:
    corrupt = [p for _, ent in sorted(manifest["chunks"].items()) if ent["kind"] == "image" for p in ent["corrupt"]]
    if corrupt:
        log.warning("%d unreadable image(s) skipped (valid=False, zero features): %s", len(corrupt),
                    ", ".join(corrupt))
    feats = _assemble(loaded, plan, job.row_to_image, job.key)
    feats.meta = {
        **job.material,
        "image_backbone": job.img_enc.name,
        "text_backbone": job.txt_enc.name,
        "dims": job.dims,
        "counts": job.counts,
        "corrupt": corrupt,
        "n_corrupt": len(corrupt),
        "changed_files": changed,
        "cache_dir": str(job.folder),
        "from_cache": from_cache,
        "extract_seconds": seconds,
        "device": str(job.device),
        "created": manifest["created"],
    }
    return feats


# ---- what the cache holds and whether it still holds -------------------------------------------------------------

def _check_cache(job: _Job, manifest: dict, plan: list) -> tuple[dict, list, list[str]]:
    """Load every chunk that is still valid; return (loaded tensors, chunks to extract, changed image files).

    An image chunk is valid when its bytes match the manifest and every image file it was made from is unchanged
    (size and mtime as recorded, or else the same sha256). Under on_corrupt="fail" an image recorded as unreadable
    that is still unchanged raises its read error (the file is read again for that)."""
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    todo, changed = [], []
    for kind, i, s, e in plan:
        fname = f"{kind}-{i:05d}.safetensors"
        entry = manifest["chunks"].get(fname)
        ok = entry is not None and (entry.get("start"), entry.get("stop")) == (s, e)
        if ok and kind == "image":
            moved = _changed_images(job, fname, job.image_rows[s:e], entry)
            changed += moved
            ok = not moved
            # Unchanged unreadable files stay unreadable; "fail" reads them again to raise their own error, and an
            # image array (no file to stamp) is re-checked by decoding.
            if ok and entry.get("corrupt_rows") and (job.on_corrupt == "fail" or job.dataset.image_paths is None):
                ok = _still_unreadable(job.dataset, entry["corrupt_rows"], job.on_corrupt, fname)
        tensors = _load_chunk(job.folder / fname, entry, job.shapes(kind, s, e)) if ok else None
        if tensors is None:
            manifest["chunks"].pop(fname, None)
            todo.append((kind, fname, s, e))
        else:
            loaded[fname] = tensors
    return loaded, todo, changed


def _stamp(path: Path) -> dict | None:
    """Size, mtime and sha256 of an image file as it is now (None: missing or not readable)."""
    try:
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    except OSError:
        return None


def _files_path(folder: Path, fname: str) -> Path:
    return folder / fname.replace(".safetensors", ".files.json")


def _changed_images(job: _Job, fname: str, rows: np.ndarray, entry: dict) -> list[str]:
    """Image files of a cached chunk that are not what it was made from (empty: all unchanged).

    Size + mtime as recorded: unchanged without reading the file. Otherwise the sha256 decides; a file that only
    got a new mtime has its record updated (so the next check is a stat again)."""
    paths = job.dataset.image_paths
    if paths is None:
        return []  # an in-memory image array has no files; the dataset fingerprint covers its source
    record_path = _files_path(job.folder, fname)
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
        now = _stamp(path)
        if now is not None and now["sha256"] == old["sha256"]:
            stamps[j], touched = now, True  # touched, same bytes: keep the chunk, remember the new mtime
        else:
            changed.append(str(path))
    if changed:
        log.info("%s: %d image file(s) changed since extraction (%s); re-extracting it", fname, len(changed),
                 ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else ""))
    elif touched:
        write_text_atomic(record_path, json.dumps(record))
    return changed


def _still_unreadable(dataset, rows: list[int], on_corrupt: str, fname: str) -> bool:
    """True when every image a cached chunk recorded as unreadable still is (under "fail": raise its error).
    False (the chunk is re-extracted) once any of them reads."""
    for r in rows:
        try:
            dataset.image(int(r))
        except ImageReadError:
            if on_corrupt == "fail":
                raise
            continue
        log.info("%s is readable now; re-extracting %s", dataset.image_key(int(r)), fname)
        return False
    return True


def _read_manifest(job: _Job) -> dict:
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
        _merge_rank_manifests(job, manifest)
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=1))


# ---- extraction ---------------------------------------------------------------------------------------------------

class _ImageReader(torch.utils.data.Dataset):
    """What a DataLoader worker does for one image: stamp the file, read, decode, preprocess. Never raises: an
    unreadable image comes back as None pixels with its message (the main process applies on_corrupt)."""

    def __init__(self, dataset: CrossModalDataset, rows: np.ndarray, preprocess: Callable):
        self.dataset, self.rows, self.preprocess = dataset, rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        row = int(self.rows[j])
        paths = self.dataset.image_paths
        stamp = _stamp(Path(paths[row])) if paths is not None else None  # before decoding: a later edit shows
        try:
            return j, self.preprocess(self.dataset.image(row)), None, stamp
        except ImageReadError as exc:
            return j, None, str(exc), stamp


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list, list]:
    pos = [it[0] for it in items]
    good = [it[1] for it in items if it[1] is not None]
    return pos, (torch.stack(good) if good else None), [it[2] for it in items], [it[3] for it in items]


def _image_batches(job: _Job, todo: list) -> tuple[np.ndarray, list[list[int]]]:
    """Rows of every image to extract, and batches of positions into them that never straddle a chunk (each chunk
    is batched from its start exactly as in one uninterrupted single-process run, so the numbers are the same)."""
    rows, batches, at = [], [], 0
    for _, _, s, e in todo:
        rows.append(job.image_rows[s:e])
        batches += [list(range(at + b, at + min(b + job.batch_size, e - s))) for b in range(0, e - s, job.batch_size)]
        at += e - s
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), batches


def _extract_chunks(job: _Job, todo: list, loaded: dict, manifest: dict, save_manifest: Callable[[], None]) -> None:
    """Extract the chunks in `todo` (images through a DataLoader, then texts), writing each chunk, its file record
    and the manifest as soon as it is complete."""
    from tqdm import (
        tqdm,  # plain text bar: works in terminals, logs and papermill kernels alike
    )

    def done(kind, fname, s, e, tensors, bad_rows=(), stamps=None):
        sha = save_safetensors_atomic(tensors, job.folder / fname)
        if stamps is not None:
            rows = [int(r) for r in job.image_rows[s:e]]
            write_text_atomic(_files_path(job.folder, fname), json.dumps({"rows": rows, "stamps": stamps}))
        manifest["chunks"][fname] = {"kind": kind, "start": s, "stop": e, "sha256": sha,
                                     "corrupt": [job.dataset.image_key(r) for r in bad_rows],
                                     "corrupt_rows": list(bad_rows)}
        save_manifest()
        loaded[fname] = tensors
        if job.on_chunk is not None:
            job.on_chunk(fname)

    images = [t for t in todo if t[0] == "image"]
    texts = [t for t in todo if t[0] == "text"]
    total = sum(e - s for _, _, s, e in todo)
    with tqdm(total=total, desc=f"features {job.dataset.name}", unit="item", disable=not job.progress) as bar:
        if images:
            _extract_images(job, images, bar, done)
        for _, fname, s, e in texts:
            done("text", fname, s, e, _extract_texts(job, range(s, e), bar))


def _extract_images(job: _Job, todo: list, bar, done: Callable) -> None:
    from torch.utils.data import DataLoader

    rows, batches = _image_batches(job, todo)
    workers = min(job.workers, len(batches))
    loader = DataLoader(_ImageReader(job.dataset, rows, job.img_enc.preprocess_one), batch_sampler=batches,
                        num_workers=workers, collate_fn=_collate, pin_memory=job.device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    di, r2 = job.dims["image"], job.dims["regions"] ** 2
    bounds = np.cumsum([0] + [e - s for _, _, s, e in todo])
    c = 0  # the chunk being filled
    buf = None
    it = iter(loader)
    try:
        for pos, pixels, errors, stamps in it:
            if buf is None:
                n = bounds[c + 1] - bounds[c]
                buf = {"global": torch.zeros(n, di, dtype=torch.float16),
                       "regions": torch.zeros(n, r2, di, dtype=torch.float16),
                       "valid": torch.zeros(n, dtype=torch.bool), "bad": [], "stamps": [None] * n}
            slots = []
            for p, err, st in zip(pos, errors, stamps):
                j = p - bounds[c]
                buf["stamps"][j] = st
                if err is None:
                    slots.append(j)
                    continue
                row = int(rows[p])
                if job.on_corrupt == "fail":
                    job.dataset.image(row)  # raises the real error here, in the main process
                    raise ImageReadError(job.dataset.image_key(row), err)  # it read fine just now: a race
                log.warning("skipping unreadable image: %s", err)
                buf["bad"].append(row)
            if pixels is not None:
                with _autocast(job.device, job.amp):
                    out = job.img_enc.encode_pixels(pixels)
                idx = torch.tensor(slots)
                buf["global"][idx] = out.globals.to(torch.float16)
                buf["regions"][idx] = out.tokens.to(torch.float16)
                buf["valid"][idx] = True
            bar.update(len(pos))
            if pos[-1] + 1 == bounds[c + 1]:  # the chunk is complete
                _, fname, s, e = todo[c]
                stamps = buf["stamps"] if job.dataset.image_paths is not None else None
                done("image", fname, s, e, {k: buf[k] for k in ("global", "regions", "valid")}, buf["bad"], stamps)
                c, buf = c + 1, None
    finally:
        del it  # shuts the workers down, also when a read error or Ctrl-C ends the loop


def _extract_texts(job: _Job, rows, bar) -> dict:
    rows = list(rows)
    outs = []
    for s in range(0, len(rows), job.batch_size):
        batch = rows[s:s + job.batch_size]
        with _autocast(job.device, job.amp):
            outs.append(job.txt_enc.encode([job.dataset.text(i) for i in batch]))  # tokenised as one batch
        bar.update(len(batch))
    w = max(o.tokens.shape[1] for o in outs)
    words = torch.cat([_pad(o.tokens, w) for o in outs]).to(torch.float16)
    mask = torch.cat([_pad(o.mask, w) for o in outs])
    return {"global": torch.cat([o.globals for o in outs]).to(torch.float16), "words": words, "mask": mask}


def _pad(x: torch.Tensor, w: int) -> torch.Tensor:
    """Pad dim 1 with zeros (False for masks) up to w."""
    if x.shape[1] == w:
        return x
    pad = torch.zeros((x.shape[0], w - x.shape[1], *x.shape[2:]), dtype=x.dtype)
    return torch.cat([x, pad], dim=1)


def _assemble(loaded: dict, plan: list, row_to_image: np.ndarray, key: str) -> FeatureSet:
    img = [loaded[f"image-{i:05d}.safetensors"] for kind, i, _, _ in plan if kind == "image"]
    txt = [loaded[f"text-{i:05d}.safetensors"] for kind, i, _, _ in plan if kind == "text"]
    idx = torch.from_numpy(np.asarray(row_to_image, dtype=np.int64))
    w = max(t["words"].shape[1] for t in txt)
    return FeatureSet(
        image_global=torch.cat([c["global"] for c in img])[idx],
        image_regions=torch.cat([c["regions"] for c in img])[idx],
        text_global=torch.cat([c["global"] for c in txt]),
        text_words=torch.cat([_pad(c["words"], w) for c in txt]),
        text_mask=torch.cat([_pad(c["mask"], w) for c in txt]),
        valid=torch.cat([c["valid"] for c in img])[idx],
        key=key,
    )


# ---- command line ------------------------------------------------------------------------------------------------

def run_command(args: argparse.Namespace) -> int:
    """`dcmfg features extract` (arguments defined in dcmfg.cli). Under `torchrun --nproc_per_node=N -m dcmfg.cli
    features extract ...` the chunks are shared out across the N processes."""
    from dcmfg.config import load_config
    from dcmfg.data import load_dataset

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # what changed, not chatter
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "on_corrupt", None):
        cfg.features.on_corrupt = args.on_corrupt
    device, started = init_from_env(getattr(args, "device", None) or "auto")
    try:
        rank, _ = rank_world()
        dataset = load_dataset(args.dataset, args.root)
        t0 = time.perf_counter()
        fs = extract_features(dataset, cfg.features, cache_root=args.cache_root, device=device,
                              chunk_size=getattr(args, "chunk_size", None) or CHUNK_SIZE, progress=rank == 0)
        dt = time.perf_counter() - t0
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    m = fs.meta
    print(f"{dataset.name}: {m['counts']['items']} items, {m['counts']['images']} images, "
          f"{m['n_corrupt']} unreadable; image {tuple(fs.image_regions.shape)} text {tuple(fs.text_words.shape)}")
    if m["changed_files"]:
        print(f"{len(m['changed_files'])} image file(s) changed since the cache was made, their chunks re-extracted: "
              f"{', '.join(m['changed_files'][:5])}{', ...' if len(m['changed_files']) > 5 else ''}")
    print(f"{'loaded from cache' if m['from_cache'] else 'extracted'} in {dt:.1f} s on {m['device']}; "
          f"cache: {m['cache_dir']}")
    return 0
