"""Frozen backbone features, extracted once and cached on disk.

Layout of one cache (`<cache_root or cache_dir()/features>/<key>/`):
- `image-00000.safetensors`, ...: per distinct image (a group of captions shares one), `global` (n, Di),
  `regions` (n, r*r, Di) float16, `valid` (n,) bool;
- `text-00000.safetensors`, ...: per item, `global` (n, Dt), `words` (n, W_chunk, Dt) float16, `mask` (n, W_chunk);
- `manifest.json`: the key and what it was made from, counts, dims, and per chunk its range, sha256 and the
  unreadable images it holds (re-checked on every load: a repaired image gets its chunk re-extracted).
Every file is written atomically and the manifest is rewritten after each chunk, so an interrupted run resumes at
the first missing chunk. A chunk whose bytes do not match the manifest, or a manifest made for another key, is
logged and rebuilt, never used.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dcmfg.data.base import CrossModalDataset, ImageReadError
from dcmfg.config import FeatureConfig
from dcmfg.errors import ConfigError
from dcmfg.fileio import file_sha256, save_safetensors_atomic, write_text_atomic
from dcmfg.paths import cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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


def _resolve_encoders(cfg: FeatureConfig, image_encoder, text_encoder, device):
    from dcmfg.backbones import create_image_encoder, create_text_encoder

    img = image_encoder or create_image_encoder(cfg.image_backbone, regions=cfg.regions, image_size=cfg.image_size,
                                                device=device)
    txt = text_encoder or create_text_encoder(cfg.text_backbone, max_words=cfg.max_words, device=device)
    return img, txt


def extract_features(
    dataset: CrossModalDataset,
    config: FeatureConfig | None = None,
    *,
    image_encoder=None,
    text_encoder=None,
    cache_root: str | Path | None = None,
    progress: bool = True,
    chunk_size: int = CHUNK_SIZE,
    device: str = "cpu",
    on_chunk: Callable[[str], None] | None = None,
) -> FeatureSet:
    """Features of every item of `dataset` under the settings of `config` (the `features` section of the run's
    config; None: its defaults), from the cache when it holds them, else extracted (and cached).

    `image_encoder` / `text_encoder` replace the backbones the config names by encoder objects (then `regions`,
    `image_size`, `max_words` are the encoder's own). `on_chunk(filename)` is called after each chunk is written.
    """
    cfg = config if config is not None else FeatureConfig()
    on_corrupt, batch_size = cfg.on_corrupt, cfg.batch_size
    if on_corrupt not in ("skip", "fail"):
        raise ConfigError(f"features.on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    if len(dataset) == 0:
        raise ConfigError(f"{dataset.root}: dataset {dataset.name!r} has no items to extract features from")
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"features.batch_size and chunk_size must be >= 1 (got {batch_size}, {chunk_size})")
    img_enc, txt_enc = _resolve_encoders(cfg, image_encoder, text_encoder, device)
    regions = int(getattr(img_enc, "regions", cfg.regions))
    max_words = int(getattr(txt_enc, "max_words", cfg.max_words))
    image_size = cfg.image_size
    image_rows, row_to_image = _image_units(dataset)
    material = {
        "format": FORMAT_VERSION,
        "dataset": dataset.name,
        "fingerprint": dataset.fingerprint(),
        "image_cache_key": img_enc.cache_key,
        "text_cache_key": txt_enc.cache_key,
        "regions": regions,
        "max_words": max_words,
        "image_size": int(getattr(img_enc, "image_size", image_size)),
        "chunk_size": chunk_size,
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    folder = feature_root(cache_root) / key
    folder.mkdir(parents=True, exist_ok=True)
    # one extractor per cache at a time: a second process (a notebook beside a test run) waits, then reads it
    with _locked(folder):
        return _extract_locked(dataset, folder, key, material, img_enc, txt_enc, image_rows, row_to_image,
                               regions=regions, max_words=max_words, batch_size=batch_size, on_corrupt=on_corrupt,
                               progress=progress, chunk_size=chunk_size, on_chunk=on_chunk)


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


def _extract_locked(dataset, folder, key, material, img_enc, txt_enc, image_rows, row_to_image, *, regions,
                    max_words, batch_size, on_corrupt, progress, chunk_size, on_chunk) -> FeatureSet:
    n, m = len(dataset), len(image_rows)
    dims = {"image": int(img_enc.dim), "text": int(txt_enc.dim), "regions": regions, "max_words": max_words}
    counts = {"items": n, "images": m}

    manifest = _read_manifest(folder, key, material, dims, counts)
    manifest["backbones"] = {"image": img_enc.name, "text": txt_enc.name}  # for people reading the file
    plan = [("image", i, s, e) for i, (s, e) in enumerate(_chunks(m, chunk_size))]
    plan += [("text", i, s, e) for i, (s, e) in enumerate(_chunks(n, chunk_size))]
    di, dt = dims["image"], dims["text"]

    loaded: dict[str, dict[str, torch.Tensor]] = {}
    todo = []
    for kind, i, s, e in plan:
        fname = f"{kind}-{i:05d}.safetensors"
        entry = manifest["chunks"].get(fname)
        shapes = ({"global": (e - s, di), "regions": (e - s, regions * regions, di), "valid": (e - s,)} if kind == "image"
                  else {"global": (e - s, dt), "words": (e - s, None, dt), "mask": (e - s, None)})
        ok = entry is not None and (entry["start"], entry["stop"]) == (s, e)
        if ok and kind == "image" and entry.get("corrupt_rows"):
            ok = _still_unreadable(dataset, entry["corrupt_rows"], on_corrupt, fname)
        tensors = _load_chunk(folder / fname, entry, shapes) if ok else None
        if tensors is None:
            manifest["chunks"].pop(fname, None)
            todo.append((kind, fname, s, e))
        else:
            loaded[fname] = tensors

    from_cache = not todo
    t0 = time.perf_counter()
    if todo:
        from tqdm import tqdm  # plain text bar: works in terminals, logs and papermill kernels alike

        done = len(plan) - len(todo)
        log.info("%s: %d of %d chunks cached; extracting %d", folder, done, len(plan), len(todo))
        total = sum(e - s for _, _, s, e in todo)
        manifest["complete"] = False
        with tqdm(total=total, desc=f"features {dataset.name}", unit="item", disable=not progress) as bar:
            for kind, fname, s, e in todo:
                if kind == "image":
                    tensors, bad_rows = _extract_images(dataset, image_rows[s:e], img_enc, regions, batch_size,
                                                        on_corrupt, bar)
                else:
                    tensors, bad_rows = _extract_texts(dataset, range(s, e), txt_enc, batch_size, bar), []
                sha = save_safetensors_atomic(tensors, folder / fname)
                manifest["chunks"][fname] = {"kind": kind, "start": s, "stop": e, "sha256": sha,
                                             "corrupt": [dataset.image_key(r) for r in bad_rows],
                                             "corrupt_rows": bad_rows}
                _write_manifest(folder, manifest)
                loaded[fname] = tensors
                if on_chunk is not None:
                    on_chunk(fname)
        manifest["complete"] = True
        _write_manifest(folder, manifest)

    corrupt = [p for _, ent in sorted(manifest["chunks"].items()) if ent["kind"] == "image" for p in ent["corrupt"]]
    if corrupt:
        log.warning("%d unreadable image(s) skipped (valid=False, zero features): %s", len(corrupt),
                    ", ".join(corrupt))
    feats = _assemble(loaded, plan, row_to_image, key)
    feats.meta = {
        **material,
        "image_backbone": img_enc.name,
        "text_backbone": txt_enc.name,
        "dims": dims,
        "counts": counts,
        "corrupt": corrupt,
        "n_corrupt": len(corrupt),
        "cache_dir": str(folder),
        "from_cache": from_cache,
        "extract_seconds": 0.0 if from_cache else time.perf_counter() - t0,
        "created": manifest["created"],
    }
    return feats


def _still_unreadable(dataset, rows: list[int], on_corrupt: str, fname: str) -> bool:
    """True when every image a cached chunk recorded as unreadable still is (under "fail": raise its error).
    False (the chunk is re-extracted) once any of them has been repaired."""
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


def _read_manifest(folder: Path, key: str, material: dict, dims: dict, counts: dict) -> dict:
    """The folder's manifest if it was made for this key, else a fresh one (a stale or unreadable one is logged)."""
    fresh = {"format": FORMAT_VERSION, "key": key, "material": material, "dims": dims, "counts": counts,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": False, "chunks": {}}
    path = folder / "manifest.json"
    if not path.exists():
        return fresh
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable manifest (%s); rebuilding the cache", path, exc)
        return fresh
    want = (key, material, dims, counts)
    got = tuple(old.get(k) for k in ("key", "material", "dims", "counts")) if isinstance(old, dict) else None
    if got != want or not isinstance(old.get("chunks"), dict):
        log.warning("%s: stale manifest (made for another key, backbone or dataset); rebuilding the cache", path)
        return fresh
    return old


def _write_manifest(folder: Path, manifest: dict) -> None:
    manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_text_atomic(folder / "manifest.json", json.dumps(manifest, indent=1))


def _extract_images(dataset, rows, enc, regions, batch_size, on_corrupt, bar) -> tuple[dict, list[int]]:
    n = len(rows)
    g = torch.zeros(n, enc.dim, dtype=torch.float16)
    r = torch.zeros(n, regions * regions, enc.dim, dtype=torch.float16)
    valid = torch.zeros(n, dtype=torch.bool)
    corrupt: list[int] = []  # dataset rows
    for s in range(0, n, batch_size):
        images, slots = [], []
        for j in range(s, min(s + batch_size, n)):
            try:
                images.append(dataset.image(int(rows[j])))
                slots.append(j)
            except ImageReadError as exc:
                if on_corrupt == "fail":
                    raise
                log.warning("skipping unreadable image: %s", exc)
                corrupt.append(int(rows[j]))
        if images:
            out = enc.encode(images)
            idx = torch.tensor(slots)
            g[idx] = out.globals.to(torch.float16)
            r[idx] = out.tokens.to(torch.float16)
            valid[idx] = True
        bar.update(min(s + batch_size, n) - s)
    return {"global": g, "regions": r, "valid": valid}, corrupt


def _extract_texts(dataset, rows, enc, batch_size, bar) -> dict:
    rows = list(rows)
    outs = []
    for s in range(0, len(rows), batch_size):
        batch = rows[s:s + batch_size]
        outs.append(enc.encode([dataset.text(i) for i in batch]))
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

def register(subparsers) -> None:
    p = subparsers.add_parser("features", help="extract and cache backbone features")
    sub = p.add_subparsers(dest="features_command", required=True)
    e = sub.add_parser("extract", help="extract (or load from cache) the features of a dataset")
    e.add_argument("--dataset", required=True, help="dataset name (mirflickr25k, nuswide, mscoco, manifest, ...)")
    e.add_argument("--root", default=None, help="dataset folder")
    e.add_argument("--config", default=None, help="a run config (YAML) whose features section to use")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a features setting, e.g. --set features.regions=2 (repeatable)")
    e.add_argument("--cache-root", default=None, help="features cache folder (default: $DCMFG_CACHE/features)")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_cmd_extract)


def _cmd_extract(args: argparse.Namespace) -> int:
    from dcmfg.config import load_config
    from dcmfg.data import load_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    dataset = load_dataset(args.dataset, args.root)
    t0 = time.perf_counter()
    fs = extract_features(dataset, cfg.features, cache_root=args.cache_root, device=args.device)
    dt = time.perf_counter() - t0
    m = fs.meta
    print(f"{dataset.name}: {m['counts']['items']} items, {m['counts']['images']} images, "
          f"{m['n_corrupt']} unreadable; image {tuple(fs.image_regions.shape)} text {tuple(fs.text_words.shape)}")
    print(f"{'loaded from cache' if m['from_cache'] else 'extracted'} in {dt:.1f} s; cache: {m['cache_dir']}")
    return 0
