"""Does a smaller image input cost accuracy? The shipped DCMFG trained on features extracted at two input sizes,
paired over split seeds, and the extraction speed at each size.

A 126 px input holds every pixel of a 128 px photo (DINOv2's 14 px patches: 9 x 9 of them instead of 16 x 16 at
224 px) and costs about half the backbone time. Whether it may replace 224 px for a dataset of small photos is
decided on VALIDATION mAP@all (the selection criterion), paired over the study's split seeds: accepted unless the
verdict of (small - 224) is "worse". The query mAP is printed for information. Runs come from (or go to) the study's
cache (dcmfg.study.Study), so the 224 px runs of a built book are reused.

    DCMFG_CACHE=... .venv/bin/python benchmarks/check_image_size.py                  # mini subset, 126 vs 224, 5 seeds
    .venv/bin/python benchmarks/check_image_size.py --sizes 224 126 --seeds 0 1 2 --out results.jsonl

Prints a table and one JSON line per comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.jsonl import emit  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="$DCMFG_DATA/mirflickr-mini")
    p.add_argument("--sizes", type=int, nargs=2, default=[224, 126], metavar=("REFERENCE", "SMALL"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--speed-images", type=int, default=96, help="images for the extraction speed (0: skip)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("DCMFG_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

    import pandas as pd

    from dcmfg.config import FeatureConfig
    from dcmfg.study import Study
    from dcmfg.study.scaling import extraction_throughput
    from dcmfg.study.tables import interval_table

    ref, small = args.sizes
    s = Study.from_parameters({"dataset": "mirflickr25k", "data_root": args.data_root, "seeds": args.seeds})
    arms = [(f"{ref} px", "dcmfg", {} if ref == FeatureConfig.image_size else {"features.image_size": ref}),
            (f"{small} px", "dcmfg", {"features.image_size": small})]
    for _, _, st in arms:  # each size's features extracted once, here, before the pool's workers read them
        s.bundle(s.config("dcmfg", args.seeds[0], st))
    t0 = time.perf_counter()
    reports = s.runs(arms)
    rows = [{"arm": r["label"], "seed": r["seed"], "val mAP": r["best_val"],
             "I->T": r["summaries"]["cosine"]["map_i2t"], "T->I": r["summaries"]["cosine"]["map_t2i"],
             "best epoch": r["best_epoch"], "epochs run": len(r["history"]), "CPU seconds": r["cpu_seconds"]}
            for r in reports]
    frame = pd.DataFrame(rows)
    table = interval_table(frame, arm="arm", reference=f"{small} px", values=["val mAP", "I->T", "T->I"],
                           value_name="measure")
    print(frame.to_string(index=False))
    print(table.to_string(index=False))
    val = table[table["measure"] == "val mAP"].iloc[0]
    accepted = val["verdict"] != "worse"
    print(f"{small} px against {ref} px on validation mAP@all: {val['verdict']} ({val['difference [95% t interval]']}, "
          f"{val['seeds']} seeds): {'accepted' if accepted else 'refused'} as a features setting")
    lines = [{"check": "image_size", "reference": ref, "small": small, "seeds": args.seeds, "measure": r["measure"],
              "difference": r["difference [95% t interval]"], "verdict": r["verdict"],
              "accepted": bool(accepted), "runs_s": round(time.perf_counter() - t0, 1)}
             for r in table.to_dict("records")]
    if args.speed_images:
        ds = s.load_dataset()
        for size in (ref, small):
            speed = extraction_throughput(ds, FeatureConfig(image_size=size), images=args.speed_images)
            lines.append({"check": "extraction", "image_size": size, **{k: speed[k] for k in (
                "bare_img_per_s", "extract_img_per_s", "ratio", "cpu_ratio", "bare_cpu_s", "extract_cpu_s")}})
            print(f"extraction at {size} px: bare {speed['bare_img_per_s']:.2f} img/s, extraction "
                  f"{speed['extract_img_per_s']:.2f} img/s (ratio {speed['ratio']:.2f})")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
