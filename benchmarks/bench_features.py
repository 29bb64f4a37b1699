"""Feature extraction against the bare backbones, on the same images and device.

- bare: the image backbone's forward on ready pixel tensors plus the text backbone's forward on ready token tensors
  (preprocessing and tokenisation done beforehand, outside the timing): the floor any extraction can reach;
- extract: `dcmfg.features.extract_features` into an empty cache: files stamped and read, JPEGs decoded and
  preprocessed (DataLoader workers), both backbones, region and word pooling, float16 chunks written atomically.
Both use the same, already loaded encoders (model loading is a one-off cost outside either timing) and the same
batch size; repeats alternate bare / extract so that load from other jobs hits both alike; medians are reported.
CPU time counts this process and its DataLoader workers.

Ends with one JSON line: {"device", "bare_img_per_s", "extract_img_per_s", "ratio", ...}; `--out` appends it.

    .venv/bin/python benchmarks/bench_features.py                 # 96 real MIRFlickr images, CPU or CUDA (auto)
    .venv/bin/python benchmarks/bench_features.py --device cuda --amp --images 1024 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcmfg.backbones import create_image_encoder, create_text_encoder  # noqa: E402
from dcmfg.config import FeatureConfig  # noqa: E402
from dcmfg.data import load_dataset  # noqa: E402
from dcmfg.device import resolve_device  # noqa: E402
from dcmfg.features import _autocast, amp_dtype, extract_features  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple[float, float]:
    _sync(device)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    fn()
    _sync(device)
    return time.perf_counter() - t0, _cpu_seconds() - c0


def default_root() -> Path:
    data = os.environ.get("DCMFG_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    return Path(data) / "mirflickr-mini"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="auto",
                   help="a loader name; auto: the real MIRFlickr subset when present, else the synthetic set "
                        "(rendered at 256 px, no JPEG to decode: it understates the reading cost)")
    p.add_argument("--root", default=None, help="dataset folder (default: $DCMFG_DATA/mirflickr-mini)")
    p.add_argument("--images", type=int, default=96, help="items (image + text) to extract")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=FeatureConfig.workers, help="DataLoader worker processes")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="autocast on CUDA (both timings)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    name, root = args.dataset, args.root or default_root()
    if name == "auto":
        name = "mirflickr25k" if (Path(root) / "mirflickr").is_dir() else "synthetic"
    extra = {"n": args.images, "image_size": 256} if name == "synthetic" else {}
    dataset = load_dataset(name, None if name == "synthetic" else root, **extra)
    n = min(args.images, len(dataset))
    sub = dataset.subset(range(n))
    cfg = FeatureConfig(batch_size=args.batch_size, workers=args.workers, amp=args.amp)
    img = create_image_encoder(cfg.image_backbone, regions=cfg.regions, image_size=cfg.image_size, device=str(device))
    txt = create_text_encoder(cfg.text_backbone, max_words=cfg.max_words, device=str(device))
    dtype = amp_dtype(args.amp, device)

    # ready inputs for the bare forward passes (not timed)
    pixels = img.preprocess([sub.image(i) for i in range(n)])
    bs = args.batch_size
    pix_batches = [pixels[s:s + bs].to(device) for s in range(0, n, bs)]
    tok_batches = [
        {k: v.to(device) for k, v in txt.tokenizer([sub.text(i) for i in range(s, min(s + bs, n))], padding=True,
                                                  truncation=True, max_length=txt.max_length,
                                                  return_tensors="pt").items()}
        for s in range(0, n, bs)
    ]

    @torch.inference_mode()
    def bare_image():
        with _autocast(device, dtype):
            for x in pix_batches:
                img.forward_pixels(x)

    @torch.inference_mode()
    def bare_text():
        with _autocast(device, dtype):
            for t in tok_batches:
                txt.model(**t).last_hidden_state.float()

    def extract():
        with tempfile.TemporaryDirectory() as tmp:
            fs = extract_features(sub, cfg, device=device, image_encoder=img, text_encoder=txt, cache_root=tmp,
                                  progress=False)
            assert not fs.meta["from_cache"] and len(fs) == n

    bare_image(), bare_text()  # warm-up: builds the models, first-call allocations
    rows = {"bare_image": [], "bare_text": [], "extract": []}
    for r in range(args.repeats):
        rows["bare_image"].append(_timed(bare_image, device))
        rows["bare_text"].append(_timed(bare_text, device))
        rows["extract"].append(_timed(extract, device))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1][0]:.2f} s wall / {v[-1][1]:.2f} s cpu" for k, v in rows.items()), file=sys.stderr)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    bare_wall = med["bare_image"][0] + med["bare_text"][0]
    bare_cpu = med["bare_image"][1] + med["bare_text"][1]
    ext_wall, ext_cpu = med["extract"]
    line = {
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "bare_img_per_s": round(n / bare_wall, 3),
        "extract_img_per_s": round(n / ext_wall, 3),
        "ratio": round(bare_wall / ext_wall, 3),
        "cpu_ratio": round(bare_cpu / ext_cpu, 3),
        "bare_image_only_img_per_s": round(n / med["bare_image"][0], 3),
        "bare_wall_s": round(bare_wall, 3), "bare_cpu_s": round(bare_cpu, 3),
        "extract_wall_s": round(ext_wall, 3), "extract_cpu_s": round(ext_cpu, 3),
        "dataset": dataset.name, "images": n, "batch_size": bs, "workers": args.workers, "amp": str(dtype) if dtype else "off",
        "image_backbone": img.name, "text_backbone": txt.name, "image_size": cfg.image_size,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "repeats": args.repeats,
        "torch": torch.__version__, "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    text = json.dumps(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
