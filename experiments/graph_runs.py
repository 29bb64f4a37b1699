"""Does the graph help? One measured run (issue 10): train a config on one split seed, then score its selected
checkpoint on the query split three ways with the same weights: with the graph (`graph.inference=bank`), without it
(`none`) and with parameter-free bank smoothing (`smooth`), and record the graph statistics (training batches,
the bank's own graph, the query step) with CPU and wall seconds. Appends one JSON line per run to --results.

    .venv/bin/python experiments/graph_runs.py --name dcmfg --seed 0 --set graph.k=16 --results /tmp/h1/results.jsonl

Data: the real MIRFlickr subset (--root) with the split file split-seed<S>.json from --splits (random protocol,
query 0.2, val 0.1: `dcmfg data split ... --seed S`). Runs one torch thread (two runs share the 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from dcmfg.choices import Inference
from dcmfg.config import load_config
from dcmfg.engine.checkpoint import load_weights
from dcmfg.engine.evaluate import load_data, retrieval_for_split, take
from dcmfg.engine.train import batches as _batches
from dcmfg.engine.train import train
from dcmfg.graph.stats import GraphTally, graph_steps, item_share
from dcmfg.modality import IMAGE, TEXT
from dcmfg.models.base import GraphModel, RetrievalModel
from dcmfg.models.registry import create_model


def graph_numbers(model: RetrievalModel, data, cfg) -> dict:
    """Graph statistics of the trained model: training batches (eval mode, the final weights), the bank's own
    graph, and the query step (query split, both modalities)."""
    if not isinstance(model, GraphModel) or not len(model.layers) and model.gcfg.inference != Inference.SMOOTH:
        return {}
    out = {}
    train_idx, q_idx = data.part("train"), data.part("query")
    model.eval()
    tally = GraphTally()
    with torch.no_grad():
        for b in _batches(len(train_idx), cfg.train.batch_size, torch.Generator().manual_seed(0)):
            idx = train_idx[b.numpy()]
            enc = model.encode(take(data.feats, idx))
            model.propagate(torch.cat([enc["p_img"], enc["p_txt"]]), model.batch_graph(enc), tally)
    out["train"] = tally.summary("")
    bank = model.build_bank(take(data.feats, train_idx))
    out["bank"] = {k.removeprefix("graph_"): v for k, v in bank.stats.items()}
    feats = take(data.feats, q_idx)
    q = GraphTally(shared_candidates=True)
    mutual = []
    for m in (IMAGE, TEXT):
        e = model.embed(feats, m, bank)
        q += e["graph"]
        mutual.append(e["mutual"])
    out["query"] = q.summary("")
    out["query_mutual_share"] = item_share(torch.cat(mutual), graph_steps(bank))  # as in the run report
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="label of the arm in the results")
    p.add_argument("--config", default="configs/dcmfg.yaml")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--root", default="/work/shared/data/mirflickr-mini")
    p.add_argument("--splits", default="/tmp/h1")
    p.add_argument("--runs", default="/tmp/h1/runs")
    p.add_argument("--results", required=True)
    p.add_argument("--inference", default="bank,none,smooth", help="inference modes to score (comma separated)")
    a = p.parse_args()
    torch.set_num_threads(1)
    over = [f"data.root={a.root}", f"data.split={a.splits}/split-seed{a.seed}.json", f"seed={a.seed}",
            "train.progress=false", "train.threads=1", *a.overrides]
    cfg = load_config(a.config, over)
    out_dir = Path(a.runs) / f"{a.name}-seed{a.seed}"
    data = load_data(cfg)
    t_cpu, t_wall = time.process_time(), time.time()
    res = train(cfg, out_dir, data=data, resume=False)
    train_cpu, train_wall = time.process_time() - t_cpu, time.time() - t_wall
    hist = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    best = next(r for r in hist if r["epoch"] == res.best_epoch)
    row = {
        "name": a.name, "seed": a.seed, "config": a.config, "overrides": a.overrides,
        "best_epoch": res.best_epoch, "epochs_run": hist[-1]["epoch"], "epochs_max": cfg.train.epochs,
        "val_map_mean": best["val_map_mean"], "val_map_i2t": best["val_map_i2t"], "val_map_t2i": best["val_map_t2i"],
        "val_curve": [round(r["val_map_mean"], 5) for r in hist],
        "train_cpu_s": round(train_cpu, 2), "train_wall_s": round(train_wall, 2),
        "train_stats": {k: v for k, v in hist[-1].items() if k.startswith("graph_")},
    }
    model = res_model(out_dir, cfg, data)
    t_cpu, t_wall = time.process_time(), time.time()
    has_graph = isinstance(model, GraphModel)
    for mode in a.inference.split(","):
        if mode != Inference.BANK and not has_graph:
            continue
        if has_graph:
            model.gcfg = dataclasses.replace(model.gcfg, inference=mode)
        rep = retrieval_for_split(model, data, cfg, "query")
        row[f"map_i2t_{mode}"], row[f"map_t2i_{mode}"] = rep["map_i2t"], rep["map_t2i"]
        if has_graph and mode != Inference.NONE:
            row[f"graph_{mode}"] = graph_numbers(model, data, cfg)
    row["eval_cpu_s"], row["eval_wall_s"] = round(time.process_time() - t_cpu, 2), round(time.time() - t_wall, 2)
    with open(a.results, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}))


def res_model(out_dir: Path, cfg, data) -> RetrievalModel:
    """The selected (best validation epoch) weights."""
    dims = (data.feats["image_global"].shape[1], data.feats["text_global"].shape[1], data.labels.shape[1])
    model = create_model(cfg.model.name, cfg, *dims)
    load_weights(model, out_dir / "best" / "model.safetensors")
    return model.eval()


if __name__ == "__main__":
    main()
