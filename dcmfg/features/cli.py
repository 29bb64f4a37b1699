"""`dcmfg features extract`: extract (or load) a dataset's features into the cache and say what happened."""

from __future__ import annotations

import argparse
import logging
import time

import torch.distributed as dist

from dcmfg.config import load_config
from dcmfg.data import load_dataset
from dcmfg.distributed import init_from_env, rank_world

from .cache import CHUNK_SIZE
from .extract import extract_features


def run_command(args: argparse.Namespace) -> int:
    """`dcmfg features extract` (arguments defined in dcmfg.cli). Under `torchrun --nproc_per_node=N -m dcmfg.cli
    features extract ...` the chunks are shared out across the N processes."""
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
