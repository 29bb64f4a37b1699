"""What the pipeline costs, measured: the scaling chapter and `benchmarks/` call these functions.

- `pipeline_cost(n)`: one training epoch, the bank, inductive embedding of every query and database item, and
  mAP@all, on feature tensors of the real shapes for n items (`synthetic_features`), under the standard protocol's
  split sizes; wall and CPU seconds per stage and the peak memory.
- `extraction_throughput(dataset)`: the bare backbone forwards on ready tensors against the whole cached
  extraction of the same images, on the same device.
Every figure comes from a run of the code the library ships (public APIs only); nothing is extrapolated.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import threading
import time
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch

from dcmfg.backbones import create_image_encoder, create_text_encoder
from dcmfg.config import Config, FeatureConfig
from dcmfg.device import resolve_device
from dcmfg.engine.data import take
from dcmfg.engine.losses import total_loss
from dcmfg.features import amp_dtype, autocast as _autocast, extract_features
from dcmfg.graph.knn import topk
from dcmfg.metrics import mean_average_precision
from dcmfg.modality import IMAGE, TEXT
from dcmfg.models.registry import create_model

WIDTH = 384  # dinov2-small-imgfocus and minilm-l6
REGIONS = 16  # a 4 x 4 region grid
NOISE = 1.5  # per-item noise against unit-scale label prototypes: neighbours share labels often, not always
# queries and training items of the standard protocols (docs/data.md); the database is all but the queries
PROTOCOLS = {20_015: (2_000, 10_000), 190_421: (2_100, 10_500)}


def protocol_sizes(n: int) -> tuple[int, int]:
    """(queries, training items) for n items: the standard protocol's at its size, else 10% and half the rest."""
    if n in PROTOCOLS:
        return PROTOCOLS[n]
    return max(1, n // 10), max(2, (n - n // 10) // 2)


# ---- measuring ----------------------------------------------------------------------------------------------------

class PeakRSS:
    """Samples this process's resident memory in a thread; `extra` = peak minus the level at start (bytes)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.extra = self.peak - self.start


def cpu_seconds(children: bool = False) -> float:
    """CPU time of this process (all threads), plus its finished children (e.g. DataLoader workers)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    total = u.ru_utime + u.ru_stime
    if children:
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += c.ru_utime + c.ru_stime
    return total


class Clock:
    """Wall and CPU seconds of a `with` block (CUDA synchronised at both ends)."""

    def __init__(self, device: torch.device | None = None, children: bool = False):
        self.device, self.children = device or torch.device("cpu"), children
        self.wall = self.cpu = 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self._t, self._c = time.perf_counter(), cpu_seconds(self.children)
        return self

    def __exit__(self, *exc):
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self._t, cpu_seconds(self.children) - self._c


# ---- full-size pipeline cost --------------------------------------------------------------------------------------

def synthetic_features(n: int, labels: np.ndarray, words: np.ndarray, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """float16 features of n items in the shapes the feature cache holds (width 384, 16 regions, as many word slots
    as the longest resampled text), with labels and word counts resampled from real ones and features that carry
    the labels plus noise. Written block by block into preallocated tensors: no float32 copy of the set exists."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(labels), (n,), generator=g)
    y = torch.as_tensor(np.asarray(labels))[pick].float()
    n_words = torch.as_tensor(np.asarray(words))[pick].clamp(min=1)
    w = int(n_words.max())
    protos = {m: torch.randn(y.shape[1], WIDTH, generator=g) for m in ("image", "text")}
    feats = {
        "image_global": torch.empty(n, WIDTH, dtype=torch.float16),
        "image_regions": torch.empty(n, REGIONS, WIDTH, dtype=torch.float16),
        "text_global": torch.empty(n, WIDTH, dtype=torch.float16),
        "text_words": torch.zeros(n, w, WIDTH, dtype=torch.float16),
        "text_mask": torch.arange(w)[None, :] < n_words[:, None],
    }
    for s in range(0, n, 8192):
        e = min(s + 8192, n)
        yy = y[s:e] / y[s:e].sum(1, keepdim=True).clamp(min=1)
        for m in ("image", "text"):
            base = yy @ protos[m] + NOISE * torch.randn(e - s, WIDTH, generator=g)
            feats[f"{m}_global"][s:e] = base.half()
            key, slots = ("image_regions", REGIONS) if m == "image" else ("text_words", w)
            tok = base[:, None, :] + NOISE * torch.randn(e - s, slots, WIDTH, generator=g)
            if m == "text":
                tok *= feats["text_mask"][s:e, :, None]
            feats[key][s:e] = tok.half()
    return feats, y


def pipeline_cost(n: int, labels: np.ndarray, words: np.ndarray, *, config=None, device="cpu", batch_size: int = 128,
                  embed_block: int = 8192, seed: int = 0, log=None) -> dict:
    """Time and memory of one full-size pass of the method at n items (see the module docstring).

    `labels` (M, C) and `words` (M,) are a real dataset's label matrix and per-item word counts, resampled.
    `config`: a dcmfg Config (default configs/dcmfg.yaml's values). The training epoch is dcmfg.engine.train's loop
    without validation and checkpoints; the embedding is that of dcmfg.engine.evaluate (a few chunks at a time, each
    item's own bank copy excluded). Returns wall seconds (`*_s`), CPU seconds (`*_cpu_s`) and `peak_extra_mb`,
    the most memory the stages took above the level before the features were made (`peak_cuda_mb` on CUDA).
    """
    dev = resolve_device(str(device))
    cfg = config if config is not None else Config()
    log = log or (lambda msg: None)
    torch.manual_seed(seed)
    out: dict = {"items": n, "device": str(dev)}
    with PeakRSS() as mem:
        with Clock(dev) as c:
            feats, y = synthetic_features(n, labels, words, seed)
        out["features_s"] = round(c.wall, 2)
        n_query, n_train = protocol_sizes(n)
        perm = np.random.default_rng(seed).permutation(n)
        query, database = perm[:n_query], perm[n_query:]
        train = database[:n_train]  # the training pool is part of the database (dcmh / random protocols)
        out.update(queries=n_query, database=len(database), train=n_train)
        model = create_model(cfg.model.name, cfg, WIDTH, WIDTH, y.shape[1]).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        y_dev = y.to(dev)

        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)  # as dcmfg.engine.train runs
        model.train()
        batches = list(torch.split(torch.as_tensor(train)[torch.randperm(n_train)], batch_size))
        if len(batches) > 1 and len(batches[-1]) < batch_size // 2:  # as dcmfg.engine.train: no tiny last graph
            last = batches.pop()
            batches[-1] = torch.cat([batches[-1], last])
        try:
            with Clock(dev) as c:
                for b in batches:
                    idx = b.numpy()
                    loss, _ = total_loss(model(take(feats, idx, dev)), y_dev[torch.as_tensor(idx, device=dev)],
                                         cfg.loss)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                    opt.step()
        finally:
            torch.use_deterministic_algorithms(previous)
        out.update(train_epoch_s=round(c.wall, 2), train_epoch_cpu_s=round(c.cpu, 2), train_steps=len(batches))
        log(f"[{n}] epoch {c.wall:.1f} s ({len(batches)} steps)")

        model.eval()
        with torch.no_grad():
            with Clock(dev) as c:
                bank = model.build_bank(take(feats, train, dev))
            out.update(bank_s=round(c.wall, 2), bank_cpu_s=round(c.cpu, 2), bank_nodes=2 * n_train)
            log(f"[{n}] bank {c.wall:.1f} s")
            items = np.concatenate([query, database])
            pos = np.full(n, -1)
            pos[train] = np.arange(n_train)  # bank position of a training item: it must not link to itself
            z = {IMAGE: torch.empty(len(items), cfg.model.dim), TEXT: torch.empty(len(items), cfg.model.dim)}
            with Clock(dev) as c:
                for s in range(0, len(items), embed_block):
                    part = items[s:s + embed_block]
                    block = take(feats, part, dev)
                    own = torch.as_tensor(pos[part], device=dev)
                    for m in (IMAGE, TEXT):
                        exclude = torch.where(own >= 0, own + (0 if m == IMAGE else n_train), own)
                        z[m][s:s + len(part)] = model.embed(block, m, bank, exclude=exclude)["z"].float().cpu()
            out.update(embed_s=round(c.wall, 2), embed_cpu_s=round(c.cpu, 2), embedded=2 * len(items))
            log(f"[{n}] embed {c.wall:.1f} s")
            del bank, feats

        q, d = slice(0, n_query), slice(n_query, None)
        with Clock(dev) as c:
            i2t = mean_average_precision(z[IMAGE][q].to(dev), z[TEXT][d].to(dev), y[query], y[database])
            t2i = mean_average_precision(z[TEXT][q].to(dev), z[IMAGE][d].to(dev), y[query], y[database])
        out.update(map_s=round(c.wall, 2), map_cpu_s=round(c.cpu, 2), map_i2t=round(i2t, 4), map_t2i=round(t2i, 4))
        log(f"[{n}] mAP {c.wall:.1f} s")
    out["peak_extra_mb"] = round(mem.extra / 2**20)
    if dev.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    out["threads"] = torch.get_num_threads()
    return out


def step_cost(feats: dict, labels: torch.Tensor, idx, *, config=None, steps: int = 12, batch_size: int = 128,
              seed: int = 0, device="cpu") -> dict:
    """Median wall and CPU seconds of one training step (forward, total_loss, backward, AdamW) of the configured
    model on batches drawn from rows `idx` of `feats` (the first two steps are warm-up, not counted).

    The same code on real cached features and on `synthetic_features` says whether the synthetic set costs what
    real data cost: a step's work is set by the batch (its graph, tokens and words), not by the size of the set."""
    dev = resolve_device(str(device))
    cfg = config if config is not None else Config()
    torch.manual_seed(seed)
    model = create_model(cfg.model.name, cfg, feats["image_global"].shape[1], feats["text_global"].shape[1],
                         labels.shape[1]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    idx = np.asarray(idx)
    g = torch.Generator().manual_seed(seed)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as dcmfg.engine.train runs
    model.train()
    times = []
    try:
        for _ in range(int(steps) + 2):
            b = idx[torch.randperm(len(idx), generator=g)[:batch_size].numpy()]
            with Clock(dev) as c:
                loss, _ = total_loss(model(take(feats, b, dev)), labels[torch.as_tensor(b)].to(dev), cfg.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times.append((c.wall, c.cpu))
    finally:
        torch.use_deterministic_algorithms(previous)
    wall, cpu = (statistics.median(x[i] for x in times[2:]) for i in (0, 1))
    return {"step_s": round(wall, 4), "step_cpu_s": round(cpu, 4), "ms_per_pair": round(1000 * wall / batch_size, 3),
            "steps": int(steps), "batch_size": int(batch_size)}


def real_labels_and_words(dataset) -> tuple[np.ndarray, np.ndarray]:
    """A dataset's label matrix and per-item word counts (capped at 32, the default max_words)."""
    words = np.array([min(32, max(1, len(t.split()))) for t in dataset.texts])
    return np.asarray(dataset.labels), words


# ---- extraction throughput ----------------------------------------------------------------------------------------

def extraction_throughput(dataset, config=None, *, device="cpu", images: int = 96, repeats: int = 2, log=None) -> dict:
    """Bare backbone forwards on ready tensors against `extract_features` into an empty cache, on the first
    `images` items of `dataset`, the same encoders (already loaded), batch size and device. Repeats alternate the
    two; medians. `ratio` = extraction speed / bare speed (wall), `cpu_ratio` the same in CPU time (this process
    and its DataLoader workers)."""
    dev = resolve_device(str(device))
    cfg = config if config is not None else FeatureConfig()
    log = log or (lambda msg: None)
    n = min(int(images), len(dataset))
    sub = dataset.subset(range(n))
    img = create_image_encoder(cfg.image_backbone, regions=cfg.regions, image_size=cfg.image_size, device=str(dev))
    txt = create_text_encoder(cfg.text_backbone, max_words=cfg.max_words, device=str(dev))
    dtype = amp_dtype(bool(cfg.amp), dev)
    bs = cfg.batch_size
    pixels = img.preprocess([sub.image(i) for i in range(n)])  # ready inputs for the bare forwards (not timed)
    pix = [pixels[s:s + bs].to(dev) for s in range(0, n, bs)]
    toks = [{k: v.to(dev) for k, v in txt.tokenizer([sub.text(i) for i in range(s, min(s + bs, n))], padding=True,
                                                     truncation=True, max_length=txt.max_length,
                                                     return_tensors="pt").items()} for s in range(0, n, bs)]

    @torch.inference_mode()
    def bare():
        with _autocast(dev, dtype):
            for x in pix:
                img.forward_pixels(x)
            for t in toks:
                txt.model(**t).last_hidden_state.float()

    def extract():
        with tempfile.TemporaryDirectory() as tmp:
            fs = extract_features(sub, cfg, device=dev, image_encoder=img, text_encoder=txt, cache_root=tmp,
                                  progress=False)
            assert not fs.meta["from_cache"] and len(fs) == n

    bare()  # warm-up: builds the models, first-call allocations
    times = {"bare": [], "extract": []}
    for r in range(int(repeats)):
        for name, fn in (("bare", bare), ("extract", extract)):
            with Clock(dev, children=True) as c:
                fn()
            times[name].append((c.wall, c.cpu))
        log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1][0]:.1f} s wall / {v[-1][1]:.1f} s cpu"
                                                    for k, v in times.items()))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    return {
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "bare_img_per_s": round(n / med["bare"][0], 3),
        "extract_img_per_s": round(n / med["extract"][0], 3),
        "ratio": round(med["bare"][0] / med["extract"][0], 3),
        "cpu_ratio": round(med["bare"][1] / med["extract"][1], 3),
        "bare_wall_s": round(med["bare"][0], 3), "bare_cpu_s": round(med["bare"][1], 3),
        "extract_wall_s": round(med["extract"][0], 3), "extract_cpu_s": round(med["extract"][1], 3),
        "dataset": dataset.name, "images": n, "batch_size": bs, "workers": cfg.workers,
        "amp": str(dtype).removeprefix("torch.") if dtype else "off", "image_backbone": img.name,
        "text_backbone": txt.name, "image_size": cfg.image_size, "threads": torch.get_num_threads(),
        "repeats": int(repeats),
    }


# ---- metric and search time against size --------------------------------------------------------------------------

def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """Median (wall, CPU) seconds of `repeats` calls of fn."""
    runs = []
    for _ in range(max(1, int(repeats))):
        with Clock() as c:
            fn()
        runs.append((c.wall, c.cpu))
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def metric_cost(labels: np.ndarray, *, n_query: int, db_sizes, dim: int = 512, bits: int = 64, repeats: int = 3,
                seed: int = 0) -> list[dict]:
    """Seconds of one mAP@all (n_query queries) against each database size: cosine on `dim`-wide floats, Hamming on
    `bits`-bit codes with the stable tie rule and the tie-aware one; labels resampled from a real label matrix."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.as_tensor(np.asarray(labels)).float()

    def sample(n: int) -> torch.Tensor:
        return lab[torch.randint(0, len(lab), (n,), generator=g)]

    q = torch.nn.functional.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    ql = sample(n_query)
    rows = []
    for n in db_sizes:
        d = torch.nn.functional.normalize(torch.randn(int(n), dim, generator=g), dim=1)
        dl = sample(int(n))
        qh, dh = torch.sign(q[:, :bits]), torch.sign(d[:, :bits])
        cases = {"cosine (real)": ((q, d), {}),
                 f"hamming ({bits} bits)": ((qh, dh), {"distance": "hamming"}),
                 f"hamming ({bits} bits), tie-aware": ((qh, dh), {"distance": "hamming", "ties": "expected"})}
        for name, (pair, kw) in cases.items():
            wall, cpu = timed(partial(mean_average_precision, *pair, ql, dl, **kw), repeats)
            rows.append({"database": int(n), "ranking": name, "queries": n_query, "seconds": wall, "cpu_seconds": cpu})
    return rows


def search_cost(*, n_query: int, bank_sizes, k: int = 10, dim: int = 512, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Seconds of an exact top-k cosine search of n_query queries in banks of random unit vectors, with the torch
    backend and FAISS (flat), and the share of neighbours the two agree on."""
    g = torch.Generator().manual_seed(seed)
    qs = torch.nn.functional.normalize(torch.randn(n_query, dim, generator=g), dim=1)
    rows = []
    for n in bank_sizes:
        bank = torch.nn.functional.normalize(torch.randn(int(n), dim, generator=g), dim=1)
        found = {}
        for backend in ("torch", "faiss"):
            wall, cpu = timed(partial(topk, qs, bank, k, backend=backend), repeats)
            found[backend] = topk(qs, bank, k, backend=backend)[1].sort(1).values
            rows.append({"bank": int(n), "backend": backend, "queries": n_query, "k": k, "seconds": wall,
                         "cpu_seconds": cpu})
        agree = float((found["torch"] == found["faiss"]).float().mean())
        for r in rows[-2:]:
            r["same neighbours as torch"] = agree
    return rows


def cost_figure(frame, x: str, y: str, hue: str, title: str, xlabel: str | None = None):
    """Cost against size on log-log axes, one line per `hue`, one marker per measured point (nothing drawn
    between or beyond the measured sizes but the straight segments joining them)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(data=frame, x=x, y=y, hue=hue, marker="o", ax=ax)
    ax.set(xscale="log", yscale="log", title=title, xlabel=xlabel or x, ylabel=y)
    return fig
