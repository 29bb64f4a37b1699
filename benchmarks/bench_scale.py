"""What a full-size run costs: one training epoch, the bank, inductive embedding of every item, mAP@all.

For each size (default 20,015 = MIRFlickr-25K cleaned, 190,421 = NUS-WIDE TC-21 with >= 1 tag) it builds feature
tensors of the real shapes (width 384 for both default backbones, a 4 x 4 region grid, word slots as many as the
real texts use), float16 as the feature cache holds them, with multi-hot labels resampled from a real label matrix
(the MIRFlickr subset by default) and features that carry those labels plus noise, so that kNN graphs have the
structure of real ones. The split is the standard protocol's: MIRFlickr 2,000 queries / 10,000 training (the
database is everything but the queries, training included), NUS-WIDE 2,100 / 10,500. Then, with the shipped DCMFG
config (configs/dcmfg.yaml) and only public APIs:
  - train_epoch_s: one epoch over the training split (forward, total_loss, backward, AdamW), batch 128;
  - bank_s: `model.build_bank` over the training pairs (the inference graph's reference nodes);
  - embed_s: `model.embed` of every query and database item, both modalities, against that bank (inductive);
  - map_s: mAP@all (cosine) image->text and text->image, queries against the database.
Each size runs in its own process, so `peak_rss_mb` (the process's maximum resident memory, features included) is
that size's alone. Times are wall seconds with CPU seconds beside them (`*_cpu_s`): on a shared machine the CPU
time is the steadier figure. One JSON line per size; `--out` appends them. The measuring code is
`dcmfg.study.scaling.pipeline_cost` (the scaling chapter calls it too).

    .venv/bin/python benchmarks/bench_scale.py                       # both sizes, CPU (about 15 min on 2 cores)
    .venv/bin/python benchmarks/bench_scale.py --sizes 20015 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.jsonl import emit  # noqa: E402

SIZES = (20_015, 190_421)


def run_one(n: int, args) -> dict:
    from dcmfg.config import load_config
    from dcmfg.data import load_dataset
    from dcmfg.engine.data import load_data
    from dcmfg.study.scaling import pipeline_cost, real_labels_and_words, step_cost, synthetic_features

    if args.threads:
        torch.set_num_threads(args.threads)
    data = os.environ.get("DCMFG_DATA") or str(REPO.parent / "shared" / "data")
    root = args.label_root or Path(data) / "mirflickr-mini"
    ds = load_dataset("mirflickr25k", root)
    labels, words = real_labels_and_words(ds)
    cfg = load_config(REPO / "configs" / "dcmfg.yaml", [f"train.batch_size={args.batch_size}"])
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = pipeline_cost(n, labels, words, config=cfg, device=args.device, batch_size=args.batch_size,
                        embed_block=args.embed_block, seed=args.seed, log=log)
    if args.reference_steps:
        # The same training step on the real features of the label source (extracted into the cache once) and on
        # synthetic features of the same set's shapes: the ratio says whether the synthetic epoch is representative.
        real = load_data(load_config(REPO / "configs" / "dcmfg.yaml", ["data.name=mirflickr25k", f"data.root={root}",
                                                                         "train.progress=false"]))
        syn, y = synthetic_features(len(ds), labels, words, args.seed)
        both = {name: step_cost(f, lab, np.arange(len(lab)), config=cfg, steps=args.reference_steps,
                                batch_size=args.batch_size, seed=args.seed, device=args.device)
                for name, f, lab in (("real", real.feats, real.labels.float()), ("synthetic", syn, y))}
        out.update({f"{k}_step_s": v["step_s"] for k, v in both.items()},
                   **{f"{k}_step_cpu_s": v["step_cpu_s"] for k, v in both.items()},
                   synthetic_vs_real_step=round(both["synthetic"]["step_s"] / both["real"]["step_s"], 3),
                   epoch_ms_per_pair=round(1000 * out["train_epoch_s"] / out["train"], 3),
                   real_ms_per_pair=both["real"]["ms_per_pair"])
        log(f"[{n}] step: real {both['real']['step_s']:.3f} s, synthetic {both['synthetic']['step_s']:.3f} s "
            f"(ratio {out['synthetic_vs_real_step']:.2f})")
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # the whole process
    out.update(labels=f"{ds.name} ({len(ds)} items)", cpus=os.cpu_count(), torch=torch.__version__,
               machine=platform.machine(), note="one untrained epoch: mAP values only show the pipeline ran",
               time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--embed-block", type=int, default=8192, help="items converted to float32 at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as the study trains each run; 0: torch's default)")
    p.add_argument("--reference-steps", type=int, default=12,
                   help="training steps timed on the real features of the label source and on synthetic features of "
                        "its shapes, for the synthetic-vs-real ratio (0: skip)")
    p.add_argument("--label-root", type=Path, default=None, help="MIRFlickr folder whose label matrix to resample")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run one size in this process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.sizes[0], args)), flush=True)
        return 0
    for n in args.sizes:  # each size in a fresh process: its peak memory is its own
        cmd = [sys.executable, __file__, "--one", "--sizes", str(n), "--device", args.device, "--batch-size",
               str(args.batch_size), "--embed-block", str(args.embed_block), "--seed", str(args.seed),
               "--threads", str(args.threads), "--reference-steps", str(args.reference_steps)]
        if args.label_root:
            cmd += ["--label-root", str(args.label_root)]
        t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"size {n} failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        line = json.loads(done.stdout.strip().splitlines()[-1])
        line["total_s"] = round(time.perf_counter() - t0, 1)
        line["total_cpu_s"] = round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1)
        emit([line], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
