"""Feature extraction against the bare backbones, on the same images and device (dcmfg.study.scaling.extraction_throughput).

- bare: the image backbone's forward on ready pixel tensors plus the text backbone's forward on ready token tensors
  (preprocessing and tokenisation done beforehand, outside the timing): the floor any extraction can reach;
- extract: `dcmfg.features.extract_features` into an empty cache: files stamped and read, JPEGs decoded and
  preprocessed (DataLoader workers), both backbones, region and word pooling, float16 chunks written atomically.
Both use the same, already loaded encoders (model loading is a one-off cost outside either timing) and the same
batch size; repeats alternate bare / extract so that load from other jobs hits both alike; medians are reported.
CPU time counts this process and its DataLoader workers.

Ends with one JSON line: {"device", "bare_img_per_s", "extract_img_per_s", "ratio", ...}; `--out` appends it.

    .venv/bin/python benchmarks/bench_features.py                 # 96 real MIRFlickr images, CPU or CUDA (auto)
    .venv/bin/python benchmarks/bench_features.py --device cuda --amp --images 1024 --batch-size 128 --workers 8
    .venv/bin/python benchmarks/bench_features.py --root ../shared/data-12k/mirflickr-12k --image-size 126
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcmfg.config import FeatureConfig  # noqa: E402
from dcmfg.data import load_dataset  # noqa: E402
from dcmfg.study.scaling import extraction_throughput  # noqa: E402
from benchmarks.jsonl import emit  # noqa: E402


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
    p.add_argument("--image-size", type=int, default=FeatureConfig.image_size,
                   help="the image backbone's input side in pixels (features.image_size; DINOv2: a multiple of 14, "
                        "e.g. 126 holds every pixel of a 128 px photo in 9 x 9 patches)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)

    name, root = args.dataset, args.root or default_root()
    if name == "auto":
        name = "mirflickr25k" if (Path(root) / "mirflickr").is_dir() else "synthetic"
    extra = {"n": args.images, "image_size": 256} if name == "synthetic" else {}
    dataset = load_dataset(name, None if name == "synthetic" else root, **extra)
    cfg = FeatureConfig(batch_size=args.batch_size, workers=args.workers, amp=args.amp, image_size=args.image_size)
    line = extraction_throughput(dataset, cfg, device=args.device, images=args.images, repeats=args.repeats,
                                 log=lambda msg: print(msg, file=sys.stderr, flush=True))
    line.update(cpus=os.cpu_count(), torch=torch.__version__, machine=platform.machine(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    emit([line], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
