"""Time and peak memory of dcmfg.metrics mAP@all and dcmfg.graph.knn.topk against the usual alternatives.

For each size (MIRFlickr: 2,000 queries x 18,015 database items, 24 labels; NUS-WIDE: 2,100 x 193,734, 21 labels)
and each representation (64-bit hash codes, 512-d floats) it runs, in the same process:
  - `loop`: the per-query implementation peer code uses (numpy matmul + argsort per query, stable sort here so the
    definition is the same as ours);
  - `torch.sort`: one bare sort of the same distance matrix, the floor of any exact ranking metric;
  - dcmfg `ties=stable` (exact) and, for codes, dcmfg `ties=expected` (tie-aware, histogram, no sort).
Then search.topk torch vs FAISS flat at 512-d. Prints a markdown table and appends JSON lines to --out.

Data are synthetic but shaped like the real thing: multi-hot labels at the datasets' density, embeddings that carry
the labels plus noise, codes = sign of a random projection of them (so Hamming distances tie the way trained codes do).

    .venv/bin/python benchmarks/bench_metrics.py --out /tmp/bench.jsonl          # full sizes, a few minutes
    .venv/bin/python benchmarks/bench_metrics.py --quick                         # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcmfg.metrics import mean_average_precision  # noqa: E402
from dcmfg.study.scaling import PeakRSS  # noqa: E402
from dcmfg.graph.knn import topk  # noqa: E402

SIZES = {
    # name: (queries, database, labels, mean labels per item)
    "mirflickr": (2000, 18015, 24, 3.8),
    "nuswide": (2100, 193734, 21, 1.9),
}
QUICK_SIZES = {"mirflickr": (200, 1800, 24, 3.8), "nuswide": (210, 19373, 21, 1.9)}


# ----------------------------------------------------------------------------------------------------------------------
# measuring


def measure(fn, device: torch.device):
    """(wall seconds, result, peak extra bytes): RSS on CPU, torch's allocator peak on CUDA.

    The process CPU time (all threads) of the last call is kept in `measure.cpu`: on a shared machine
    wall time moves with the other load, CPU time much less (it charges a 2-thread run for both threads)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        torch.cuda.synchronize()
        measure.cpu = time.process_time() - c0
        return time.perf_counter() - t0, out, torch.cuda.max_memory_allocated() - base
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        seconds = time.perf_counter() - t0
        measure.cpu = time.process_time() - c0
    return seconds, out, mem.extra


# ----------------------------------------------------------------------------------------------------------------------
# data and the reference loop


def make_data(n_query: int, n_db: int, n_labels: int, density: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_query + n_db
    # Label frequencies fall off like the real concept lists do.
    freq = np.geomspace(0.45, 0.02, n_labels)
    freq *= density / freq.sum()
    labels = (rng.random((n, n_labels)) < np.clip(freq, 0, 0.95)).astype(np.uint8)
    proto = rng.standard_normal((n_labels, 512)).astype(np.float32)
    emb = labels.astype(np.float32) @ proto + 2.0 * rng.standard_normal((n, 512)).astype(np.float32)
    codes = np.where(emb @ rng.standard_normal((512, 64)).astype(np.float32) >= 0, 1.0, -1.0).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sl_q, sl_d = slice(0, n_query), slice(n_query, n)
    return {
        "query_labels": labels[sl_q], "database_labels": labels[sl_d],
        "hamming": (codes[sl_q], codes[sl_d]), "cosine": (emb[sl_q], emb[sl_d]),
    }


def loop_map(q: np.ndarray, d: np.ndarray, ql: np.ndarray, dl: np.ndarray, distance: str) -> np.ndarray:
    """Per-query AP@all the way peer code computes it (one query at a time, numpy), stable argsort."""
    n_bits = q.shape[1]
    dl_t = dl.T.astype(np.float32)
    d_t = np.ascontiguousarray(d.T)
    aps = np.zeros(len(q))
    for i in range(len(q)):
        gnd = (ql[i].astype(np.float32) @ dl_t) > 0
        tsum = int(gnd.sum())
        if tsum == 0:
            continue
        if distance == "hamming":
            dist = 0.5 * (n_bits - q[i] @ d_t)
        else:
            dist = -(q[i] @ d_t)
        gnd = gnd[np.argsort(dist, kind="stable")]
        count = np.arange(1, tsum + 1, dtype=np.float64)
        tindex = np.flatnonzero(gnd) + 1.0
        aps[i] = np.mean(count / tindex)
    return aps


def distance_matrix(q: torch.Tensor, d: torch.Tensor, distance: str) -> torch.Tensor:
    ip = q @ d.T
    return ip.neg_().add_(q.shape[1]).mul_(0.5) if distance == "hamming" else ip.neg_()


# ----------------------------------------------------------------------------------------------------------------------
# runs


def bench_map(size: str, dims, device: torch.device, chunk_size, records: list, skip_loop: bool = False):
    n_query, n_db, n_labels, density = dims
    data = make_data(n_query, n_db, n_labels, density)
    ql, dl = data["query_labels"], data["database_labels"]
    base = {"bench": "map@all", "size": size, "n_query": n_query, "n_database": n_db, "n_labels": n_labels}
    for distance in ("hamming", "cosine"):
        qn, dn = data[distance]
        rep = "64-bit codes" if distance == "hamming" else "512-d float"
        q, d = torch.from_numpy(qn).to(device), torch.from_numpy(dn).to(device)
        rec = dict(base, representation=rep)

        def add(method, seconds, mem, value=None, **extra):
            records.append(dict(rec, method=method, seconds=round(seconds, 4), cpu_seconds=round(measure.cpu, 4),
                                peak_extra_mb=round(mem / 2**20, 1), value=value, **extra))
            return measure.cpu

        # The bare sort on the whole matrix when it is small; over the metric's own chunks when it is not
        # (the sort dominates either way, and the whole NUS matrix plus its sort would take ~6.5 GB).
        whole = n_query * n_db * 4 <= 512 * 2**20

        def bare_sort():
            if whole:
                return torch.sort(distance_matrix(q, d, distance), dim=1)[0][:, 0].sum()
            step = max(1, (512 * 2**20) // (n_db * 48))
            return sum(torch.sort(distance_matrix(q[i:i + step], d, distance), dim=1)[0][:, 0].sum()
                       for i in range(0, n_query, step))

        # Warm-up (first-call allocations, thread pools) on a slice, untimed.
        mean_average_precision(q[:50], d, ql[:50], dl, distance=distance)
        s_sort, _, m_sort = measure(bare_sort, device)
        c_sort = add("torch.sort (bare)" + ("" if whole else ", chunked"), s_sort, m_sort)

        kw = dict(distance=distance, chunk_size=chunk_size, return_per_query=True)
        s_st, (v_st, per_st), m_st = measure(lambda: mean_average_precision(q, d, ql, dl, **kw), device)
        c_st = add("dcmfg ties=stable", s_st, m_st, v_st)
        if distance == "hamming":
            s_ex, (v_ex, _), m_ex = measure(
                lambda: mean_average_precision(q, d, ql, dl, ties="expected", **kw), device)
            c_ex = add("dcmfg ties=expected", s_ex, m_ex, v_ex)
        if skip_loop:
            continue
        s_loop, per_loop, m_loop = measure(lambda: loop_map(qn, dn, ql, dl, distance), torch.device("cpu"))
        diff = float(np.max(np.abs(per_loop - per_st.cpu().numpy())))
        c_loop = add("per-query loop (numpy argsort)", s_loop, m_loop, float(per_loop.mean()), max_abs_ap_diff=diff)
        ratios = {"stable / bare sort": s_st / s_sort, "loop / stable": s_loop / s_st,
                  "cpu: stable / bare sort": c_st / c_sort, "cpu: loop / stable": c_loop / c_st}
        if distance == "hamming":
            ratios["loop / expected"] = s_loop / s_ex
            ratios["cpu: loop / expected"] = c_loop / c_ex
        records.append(dict(rec, method="ratios", **{k: round(v, 2) for k, v in ratios.items()},
                            max_abs_ap_diff_vs_loop=diff))


def bench_topk(n_db: int, n_query: int, k: int, device: torch.device, records: list):
    g = torch.Generator().manual_seed(1)
    d = torch.randn(n_db, 512, generator=g).to(device)
    q = torch.randn(n_query, 512, generator=g).to(device)
    base = {"bench": "topk", "n_query": n_query, "n_database": n_db, "k": k, "dim": 512}
    s_t, (st, it), m_t = measure(lambda: topk(q, d, k, backend="torch"), device)
    records.append(dict(base, method="search.topk torch", seconds=round(s_t, 4), cpu_seconds=round(measure.cpu, 4),
                        peak_extra_mb=round(m_t / 2**20, 1)))
    s_f, (sf, i_f), m_f = measure(lambda: topk(q, d, k, backend="faiss"), device)
    agree = float((it.cpu() == i_f.cpu()).float().mean())
    records.append(dict(base, method="search.topk faiss flat", seconds=round(s_f, 4), cpu_seconds=round(measure.cpu, 4),
                        peak_extra_mb=round(m_f / 2**20, 1), index_agreement=agree,
                        max_abs_score_diff=float((st.cpu() - sf.cpu()).abs().max())))


def markdown(records: list) -> str:
    lines = ["| bench | size | representation | method | wall s | CPU s | peak extra MB | value / notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["method"] == "ratios":
            notes = ", ".join(f"{k} = {v}" for k, v in r.items() if " / " in k)
            notes += f", max AP diff vs loop = {r['max_abs_ap_diff_vs_loop']:.1e}"
            lines.append(f"| {r['bench']} | {r['size']} | {r['representation']} | **ratios** | | | | {notes} |")
            continue
        size = r.get("size", f"{r['n_query']} x {r['n_database']}")
        rep = r.get("representation", f"{r.get('dim')}-d, k={r.get('k')}")
        value = r.get("value")
        notes = "" if value is None else f"mAP {value:.6f}"
        for key in ("max_abs_ap_diff", "index_agreement", "max_abs_score_diff"):
            if key in r:
                notes += f" {key}={r[key]:.3g}"
        lines.append(f"| {r['bench']} | {size} | {rep} | {r['method']} | {r['seconds']:.3f} | "
                     f"{r['cpu_seconds']:.3f} | {r['peak_extra_mb']:.0f} | {notes.strip()} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="append the figures as JSON lines to this file")
    ap.add_argument("--quick", action="store_true", help="one tenth of the sizes: a smoke run")
    ap.add_argument("--skip-nus", action="store_true", help="leave out the NUS-WIDE size")
    ap.add_argument("--skip-nus-loop", action="store_true", help="NUS size without the (slow) per-query loop")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--chunk-size", type=int, default=None, help="metrics chunk size (default: from the memory budget)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = QUICK_SIZES if args.quick else SIZES
    records: list[dict] = []
    print(f"running on {device}, {torch.get_num_threads()} threads ...", file=sys.stderr, flush=True)
    bench_map("mirflickr", sizes["mirflickr"], device, args.chunk_size, records)
    print(markdown(records), file=sys.stderr, flush=True)  # progress: the full run takes minutes
    if not args.skip_nus:
        bench_map("nuswide", sizes["nuswide"], device, args.chunk_size, records, skip_loop=args.skip_nus_loop)
    scale = 10 if args.quick else 1
    for n_db in (20_000 // scale, 190_000 // scale):
        bench_topk(n_db, 2000 // scale, 50, device, records)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
           "machine": platform.machine(), "cpus": os.cpu_count(), "quick": args.quick,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(markdown(records))
    print(f"\n{json.dumps(env)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(dict(r, **env)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
