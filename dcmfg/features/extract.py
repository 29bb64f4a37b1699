"""Extraction: features of a dataset from the cache when it holds them, else computed by the backbones and cached.

Images are read, decoded and preprocessed by `features.workers` DataLoader processes (`dcmfg.features.images`)
while the main process runs the backbone on batches (pinned memory and non-blocking copies on CUDA; `features.amp`
autocasts there). Under torchrun (an initialised process group) the chunks to extract are shared out across ranks:
each rank writes its own chunk files, rank 0 merges the manifest; every rank returns the whole FeatureSet. The
cache itself (layout, key, staleness) is `dcmfg.features.cache`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from dcmfg.backbones import create_image_encoder, create_text_encoder
from dcmfg.choices import OnCorrupt, check
from dcmfg.config import FeatureConfig
from dcmfg.data.base import CrossModalDataset, ImageReadError
from dcmfg.device import resolve_device
from dcmfg.distributed import rank_world
from dcmfg.errors import ConfigError, writing

from .cache import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    cache_key,
    check_cache,
    feature_root,
    files_path,
    key_material,
    load_chunk,
    locked,
    merge_rank_manifests,
    read_manifest,
    write_chunk,
    write_manifest,
    write_record,
)
from .featureset import FeatureSet, assemble, pad
from .images import ImageReader, collate, image_batches
from .job import Job, chunk_name, image_units

log = logging.getLogger("dcmfg.features")


# ---- devices, precision -------------------------------------------------------------------------------------------

def _device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    return resolve_device(str(device))


def amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype features are computed in: None (float32) on the CPU or with amp off; on CUDA bfloat16
    where the GPU has it, else float16. It changes the numbers, so it is part of the cache key."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of `amp_dtype` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _resolve_encoders(cfg: FeatureConfig, image_encoder, text_encoder, device):
    img = image_encoder or create_image_encoder(cfg.image_backbone, regions=cfg.regions, image_size=cfg.image_size,
                                                device=str(device))
    txt = text_encoder or create_text_encoder(cfg.text_backbone, max_words=cfg.max_words, device=str(device))
    return img, txt


# ---- entry point ----------------------------------------------------------------------------------------------------

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
    on_corrupt = check(OnCorrupt, cfg.on_corrupt, "features.on_corrupt", ConfigError)
    batch_size, workers = cfg.batch_size, cfg.workers
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
    amp = amp_dtype(bool(cfg.amp), dev)
    image_rows, row_to_image = image_units(dataset)
    material = key_material(dataset, img_enc, txt_enc, regions=regions, max_words=max_words,
                            image_size=int(getattr(img_enc, "image_size", cfg.image_size)), chunk_size=chunk_size,
                            autocast=amp)
    key = cache_key(material)
    folder = feature_root(cache_root) / key
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    dims = {"image": int(img_enc.dim), "text": int(txt_enc.dim), "regions": regions, "max_words": max_words}
    job = Job(dataset, folder, key, material, img_enc, txt_enc, image_rows, row_to_image, dims, batch_size,
              chunk_size, on_corrupt, workers, dev, amp, progress, on_chunk)
    rank, world = rank_world()
    # One extractor per cache at a time: a second process (a notebook beside a test run) waits, then reads it.
    # Under torchrun rank 0 holds the lock for all ranks.
    with locked(folder) if rank == 0 else contextlib.nullcontext():
        if world == 1:
            return _extract_single(job)
        return _extract_distributed(job, rank, world)


def _extract_single(job: Job) -> FeatureSet:
    manifest = read_manifest(job)
    plan = job.plan()
    loaded, todo, changed = check_cache(job, manifest, plan)
    t0 = time.perf_counter()
    if todo:
        log.info("%s: %d of %d chunks cached; extracting %d", job.folder, len(plan) - len(todo), len(plan), len(todo))
        manifest["complete"] = False
        _extract_chunks(job, todo, loaded, manifest, lambda: write_manifest(job.folder, manifest))
        manifest["complete"] = True
        write_manifest(job.folder, manifest)
    return _finish(job, manifest, loaded, plan, from_cache=not todo, changed=changed,
                   seconds=time.perf_counter() - t0 if todo else 0.0)


def _extract_distributed(job: Job, rank: int, world: int) -> FeatureSet:
    """Rank 0 checks the cache and shares out the missing chunks; each rank extracts its share into its own chunk
    files (and a `manifest.rank<r>.json` of them); rank 0 merges those into the manifest; every rank then loads
    the whole set."""
    dist.barrier()  # rank 0 holds the lock from here on
    plan = job.plan()
    manifest, loaded, payload = None, {}, [None]
    if rank == 0:
        manifest = read_manifest(job)
        loaded, todo, changed = check_cache(job, manifest, plan)
        payload = [(todo, changed)]
        if todo:
            manifest["complete"] = False
            write_manifest(job.folder, manifest)
    dist.broadcast_object_list(payload, src=0)
    todo, changed = payload[0]
    mine = todo[rank::world]
    t0 = time.perf_counter()
    if mine:
        if rank == 0:
            _extract_chunks(job, mine, loaded, manifest, lambda: write_manifest(job.folder, manifest))
        else:
            own = {"format": FORMAT_VERSION, "key": job.key, "chunks": {}}
            path = job.folder / f"manifest.rank{rank}.json"
            _extract_chunks(job, mine, loaded, own, lambda: write_record(path, json.dumps(own, indent=1)))
    seconds = time.perf_counter() - t0
    dist.barrier()
    if rank == 0:
        merge_rank_manifests(job, manifest)
        manifest["complete"] = True
        write_manifest(job.folder, manifest)
    dist.barrier()
    if rank != 0:
        manifest = json.loads((job.folder / "manifest.json").read_text())
    for kind, i, s, e in plan:  # what other ranks wrote (or, on ranks > 0, what was cached)
        fname = chunk_name(kind, i)
        if fname not in loaded:
            tensors = load_chunk(job.folder / fname, manifest["chunks"].get(fname, {}), job.shapes(kind, s, e))
            if tensors is None:
                raise RuntimeError(f"{job.folder / fname}: written by another rank but not readable here")
            loaded[fname] = tensors
    return _finish(job, manifest, loaded, plan, from_cache=not todo, changed=changed, seconds=seconds)


def _finish(job: Job, manifest: dict, loaded: dict, plan: list, *, from_cache: bool, changed: list,
            seconds: float) -> FeatureSet:
    corrupt = [p for _, ent in sorted(manifest["chunks"].items()) if ent["kind"] == "image" for p in ent["corrupt"]]
    if corrupt:
        log.warning("%d unreadable image(s) skipped (valid=False, zero features): %s", len(corrupt),
                    ", ".join(corrupt))
    feats = assemble(loaded, plan, job.row_to_image, job.key)
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


# ---- extraction ---------------------------------------------------------------------------------------------------

def _extract_chunks(job: Job, todo: list, loaded: dict, manifest: dict, save_manifest: Callable[[], None]) -> None:
    """Extract the chunks in `todo` (images through a DataLoader, then texts), writing each chunk, its file record
    and the manifest as soon as it is complete."""

    def done(kind, fname, s, e, tensors, bad_rows=(), stamps=None):
        sha = write_chunk(job.folder, fname, tensors)
        if stamps is not None:
            rows = [int(r) for r in job.image_rows[s:e]]
            write_record(files_path(job.folder, fname), json.dumps({"rows": rows, "stamps": stamps}))
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
    # a plain text bar: works in terminals, logs and papermill kernels alike
    with tqdm(total=total, desc=f"features {job.dataset.name}", unit="item", disable=not job.progress) as bar:
        if images:
            _extract_images(job, images, bar, done)
        for _, fname, s, e in texts:
            done("text", fname, s, e, _extract_texts(job, range(s, e), bar))


def _extract_images(job: Job, todo: list, bar, done: Callable) -> None:
    rows, batches = image_batches(job, todo)
    workers = min(job.workers, len(batches))
    loader = DataLoader(ImageReader(job.dataset, rows, job.img_enc.preprocess_one), batch_sampler=batches,
                        num_workers=workers, collate_fn=collate, pin_memory=job.device.type == "cuda",
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
                if job.on_corrupt == OnCorrupt.FAIL:
                    job.dataset.image(row)  # raises the real error here, in the main process
                    raise ImageReadError(job.dataset.image_key(row), err)  # it read fine just now: a race
                log.warning("skipping unreadable image: %s", err)
                buf["bad"].append(row)
            if pixels is not None:
                with autocast(job.device, job.amp):
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


def _extract_texts(job: Job, rows, bar) -> dict:
    rows = list(rows)
    outs = []
    for s in range(0, len(rows), job.batch_size):
        batch = rows[s:s + job.batch_size]
        with autocast(job.device, job.amp):
            outs.append(job.txt_enc.encode([job.dataset.text(i) for i in batch]))  # tokenised as one batch
        bar.update(len(batch))
    w = max(o.tokens.shape[1] for o in outs)
    words = torch.cat([pad(o.tokens, w) for o in outs]).to(torch.float16)
    mask = torch.cat([pad(o.mask, w) for o in outs])
    return {"global": torch.cat([o.globals for o in outs]).to(torch.float16), "words": words, "mask": mask}
