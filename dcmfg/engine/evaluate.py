"""Retrieval evaluation (docs/method.md, section 6; the metrics: docs/metrics.md): embed the bank once, the database
and queries against it, score.

`evaluate(checkpoint_dir, split="query") -> dict` is the Python API; `dcmfg evaluate --checkpoint RUN --split query`
the command. Both write a JSON report, `RUN/evaluate_<split>.json` unless told otherwise (train's own
`report.json` is never overwritten). A run is always scored on the split copy it keeps in its folder. An evaluation
that writes into the run folder holds the folder's lock meanwhile (`dcmfg.engine.checkpoint.run_lock`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcmfg.choices import Distance, EvalSplit, Fallback, Inference, Relation
from dcmfg.distributed import env_rank, gather_blocks, init_from_env, rank_world, shard_chunks
from dcmfg.engine.data import DataBundle, load_data, take, word_limit
from dcmfg.data.captions import group_representatives
from dcmfg.config import Config, apply_overrides, config_from_dict
from dcmfg.errors import ConfigError, writing
from dcmfg.engine.checkpoint import load_checkpoint_model, run_folder, run_lock
from dcmfg.fileio import jsonable, write_json_atomic
from dcmfg.graph.mutual import mutual_knn_edges
from dcmfg.graph.stats import inference_report
from dcmfg.modality import IMAGE, TEXT

# What every report holds beside mAP@all: mAP@K under both denominators of docs/metrics.md (the literature's `retrieved`
# variant included, so a reader sees how much the choice moves a number), P/R/NDCG at the default Ks.
REPORT_OPTIONS = {"map_k": (None, 50, 100, 500, 1000, 5000), "denominators": ("relevant", "retrieved")}


# ---------------------------------------------------------------------------------------------- embedding


EMBED_CHUNK = 1024  # items per model.embed chunk unless eval.chunk_size says otherwise
EMBED_BLOCK = 8  # chunks converted to float32 at a time: an evaluation's features never all exist in float32


@torch.no_grad()
def embed_parts(model, data: DataBundle, bank_idx, item_idx, device="cpu", *, chunk: int | None = None,
                distributed: bool = False, inference: str | None = None, return_bank: bool = False):
    """Embeddings of items `item_idx` in both modalities against a bank of `bank_idx` (inductive).

    Items go through `model.embed` in chunks of `chunk` (default EMBED_CHUNK), a few chunks at a time, with one word
    width for all. With `distributed` under torchrun each rank embeds a contiguous share of whole chunks and the
    shares are gathered: every rank returns the single process's result. Returns {"image": {"z", "h"}, "text":
    {"z", "h"}} on the CPU (with a graph also the per-item graph statistics "mutual", "fallback", "degree"), and
    with `return_bank` the bank too. `inference`: graph.inference (bank, none, smooth; default the model's own).
    """
    model.eval()
    bank_idx, item_idx = np.asarray(bank_idx), np.asarray(item_idx)
    bank = model.build_bank(take(data.feats, bank_idx, device), inference=inference)
    # An item that is in the bank (a training item in the database) must not link to its own copy there.
    order = np.argsort(bank_idx, kind="stable")
    at = np.clip(np.searchsorted(bank_idx[order], item_idx), 0, max(len(bank_idx) - 1, 0))
    hit = bank_idx[order][at] == item_idx if len(bank_idx) else np.zeros(len(item_idx), bool)
    own_all = np.where(hit, order[at], -1)
    words = word_limit(data.feats, item_idx)
    chunk = int(chunk or EMBED_CHUNK)
    chunks, sharded = shard_chunks([slice(s, min(s + chunk, len(item_idx))) for s in range(0, len(item_idx), chunk)],
                                   distributed)
    parts: dict[str, list] = {}
    for b in range(0, len(chunks), EMBED_BLOCK):
        block = slice(chunks[b].start, chunks[min(b + EMBED_BLOCK, len(chunks)) - 1].stop)
        feats = take(data.feats, item_idx[block], device, words=words)
        own = torch.as_tensor(own_all[block], dtype=torch.long, device=device)
        for name, modality in (("image", IMAGE), ("text", TEXT)):
            exclude = torch.where(own >= 0, own + (0 if modality == IMAGE else len(bank_idx)), own)
            e = model.embed(feats, modality, bank, exclude=exclude, chunk=chunk)
            for k in ("z", "h", "mutual", "fallback", "degree"):
                if k in e:
                    parts.setdefault(f"{name}/{k}", []).append(e[k].float().cpu())
    flat = {k: torch.cat(v) for k, v in parts.items()}
    if sharded:
        flat = gather_blocks(flat)
    out: dict = {"image": {}, "text": {}}
    for key, t in flat.items():
        name, k = key.split("/")
        out[name][k] = t
    return (out, bank) if return_bank else out


def transductive_refine(zq: torch.Tensor, zdb: torch.Tensor, k: int, temperature: float = 0.1):
    """Transductive re-ranking (reported separately, never mixed with inductive numbers): one parameter-free
    propagation over the mutual-kNN graph of queries + database; each node becomes the attention-weighted mean
    of itself and its mutual neighbours. Unlike the inductive mode, a query's result depends on the others."""
    from torch_geometric.utils import scatter, softmax  # a slow import, needed by transductive runs only

    x = F.normalize(torch.cat([zq, zdb]).float(), dim=1)
    edges = mutual_knn_edges(x, k, relation=Relation.MUTUAL, fallback=Fallback.NEAREST, self_loops=True)
    src, dst = edges
    w = softmax((x[src] * x[dst]).sum(1) / temperature, dst, num_nodes=len(x))
    out = scatter(x[src] * w[:, None], dst, dim=0, dim_size=len(x), reduce="sum")
    out = F.normalize(out, dim=1)
    return out[: len(zq)], out[len(zq) :]


def codes(e: dict, distance: str) -> torch.Tensor:
    """What the metrics rank by: real-valued z for cosine, sign of the tanh code for Hamming."""
    if distance == Distance.HAMMING:
        if "h" not in e:
            raise ConfigError("eval.distance=hamming but this model has no hash head")
        return torch.where(e["h"] >= 0, 1.0, -1.0)
    return e["z"]


def map_pair(q: dict, db: dict, ql, dl, distance: str, chunk_size=None) -> tuple[float, float]:
    """mAP@all image->text and text->image (docs/metrics.md) for query and database embeddings."""
    from dcmfg.metrics import mean_average_precision  # with pandas: not needed to load the package

    kw = dict(distance=distance, chunk_size=chunk_size)
    i2t = mean_average_precision(codes(q["image"], distance), codes(db["text"], distance), ql, dl, **kw)
    t2i = mean_average_precision(codes(q["text"], distance), codes(db["image"], distance), ql, dl, **kw)
    return float(i2t), float(t2i)


def validation_scores(model, data: DataBundle, cfg: Config, device="cpu", distributed: bool = False) -> dict:
    """Model selection: validation queries against the training set as the retrieval set (never the query set).
    `distributed`: under torchrun every rank calls it and the embedding is shared out (see embed_parts)."""
    train_idx, val_idx = data.part("train"), data.part("val")
    emb = embed_parts(model, data, train_idx, np.concatenate([val_idx, train_idx]), device,
                      chunk=cfg.eval.chunk_size, distributed=distributed, inference=cfg.graph.inference)
    nv = len(val_idx)
    q = {m: {k: v[:nv] for k, v in e.items()} for m, e in emb.items()}
    db = {m: {k: v[nv:] for k, v in e.items()} for m, e in emb.items()}
    i2t, t2i = map_pair(q, db, data.labels[val_idx], data.labels[train_idx], cfg.eval.distance, cfg.eval.chunk_size)
    return {"val_map_i2t": i2t, "val_map_t2i": t2i, "val_map_mean": (i2t + t2i) / 2}


def retrieval_for_split(model, data: DataBundle, cfg: Config, split: str = "query", device="cpu",
                        distributed: bool = False) -> dict:
    """The report of one split: queries of `split` against the database (query split) or the training set
    (val split), bank = training set. Both distances when the model has a hash head; the config's is headline.
    `distributed`: under torchrun every rank calls it; the embedding and the metrics are sharded over queries and
    gathered, and every rank returns the single process's report."""
    import pandas as pd  # with dcmfg.metrics: not needed to load the package

    from dcmfg.metrics import report_summary, retrieval_report

    train_idx = data.part("train")
    if split == EvalSplit.QUERY:
        q_idx, db_idx = data.part("query"), data.part("database")
    elif split == EvalSplit.VAL:
        q_idx, db_idx = data.part("val"), train_idx
    else:
        raise ConfigError(f"unknown split part {split!r}; use query or val")
    emb, bank = embed_parts(model, data, train_idx, np.concatenate([q_idx, db_idx]), device, chunk=cfg.eval.chunk_size,
                            distributed=distributed, inference=cfg.graph.inference, return_bank=True)
    nq = len(q_idx)
    q = {m: {k: v[:nq] for k, v in e.items()} for m, e in emb.items()}
    db = {m: {k: v[nq:] for k, v in e.items()} for m, e in emb.items()}
    ql, dl = data.labels[q_idx], data.labels[db_idx]
    distances = [cfg.eval.distance] + [d.value for d in Distance
                                       if d != cfg.eval.distance and (d == Distance.COSINE or "h" in q["image"])]
    groups = getattr(data.dataset, "groups", None)
    # Several captions per image (captions="all"): the image side counts each image once (its group's first row),
    # the text side keeps every caption. Splits are drawn by group, so a query's siblings are never in the database.
    rq = np.arange(len(q_idx)) if groups is None else group_representatives(np.asarray(groups)[q_idx])
    rdb = np.arange(len(db_idx)) if groups is None else group_representatives(np.asarray(groups)[db_idx])
    frames, summaries = [], {}
    for by in distances:
        qi, qt, di, dt = codes(q["image"], by), codes(q["text"], by), codes(db["image"], by), codes(db["text"], by)
        if groups is None:
            df = retrieval_report(qi, qt, di, dt, ql, dl, distance=by, **REPORT_OPTIONS, chunk_size=cfg.eval.chunk_size,
                                  distributed=distributed)
        else:
            i2t = retrieval_report(qi[rq], qt[rq], di, dt, ql[rq], dl, distance=by, **REPORT_OPTIONS,
                                   chunk_size=cfg.eval.chunk_size, distributed=distributed)
            t2i = retrieval_report(qi, qt, di[rdb], dt[rdb], ql, dl[rdb], distance=by, **REPORT_OPTIONS,
                                   chunk_size=cfg.eval.chunk_size, distributed=distributed)
            df = pd.concat([i2t[i2t["direction"] == "I->T"], t2i[t2i["direction"] == "T->I"]], ignore_index=True)
        frames.append(df)
        summaries[by] = {k: jsonable(v) for k, v in report_summary(df).items()}
    report = {
        "map_i2t": summaries[cfg.eval.distance]["map_i2t"],
        "map_t2i": summaries[cfg.eval.distance]["map_t2i"],
        "distance": cfg.eval.distance,
        "mode": "inductive (bank = training split)",
        "split": split,
        "summaries": summaries,
        "n_query": int(nq),
        "n_database": int(len(db_idx)),
        "n_query_images": int(len(rq)),
        "n_database_images": int(len(rdb)),
        "n_bank_pairs": int(len(train_idx)),
        "split_fingerprint": data.split.fingerprint,
        "split_protocol": data.split.protocol,
        "split_seed": data.split.seed,
        # what the graph did for these queries (mutual share, fallback share, degree) and the bank's own graph
        "graph": inference_report(bank, [q["image"], q["text"]]),
        "records": [],
    }
    report["records"] = jsonable(pd.concat(frames, ignore_index=True).astype(object).to_dict("records"))
    if cfg.graph.inference == Inference.TRANSDUCTIVE:
        # Separate, clearly named numbers: queries and database propagated together.
        from dcmfg.metrics import mean_average_precision

        zq_i, zdb_t = transductive_refine(q["image"]["z"], db["text"]["z"], cfg.graph.k)
        zq_t, zdb_i = transductive_refine(q["text"]["z"], db["image"]["z"], cfg.graph.k)
        report["transductive"] = {
            "map_i2t": float(mean_average_precision(zq_i, zdb_t, ql, dl, distance=Distance.COSINE)),
            "map_t2i": float(mean_average_precision(zq_t, zdb_i, ql, dl, distance=Distance.COSINE)),
            "note": "transductive re-ranking: one propagation over the mutual-kNN graph of queries + database",
        }
    return report


def load_run(checkpoint_dir, overrides=(), device="cpu") -> tuple[torch.nn.Module, Config, dict, DataBundle]:
    """A trained run ready to score: its model, config (plus evaluation-side overrides), meta and data, the data
    checked against what the run was trained on (dataset fingerprint, the run's own split copy)."""
    model, cfg, meta = load_checkpoint_model(checkpoint_dir, device)
    if overrides:  # only evaluation-side switches make sense here (eval.*, graph.inference)
        cfg = config_from_dict(apply_overrides(cfg.to_dict(), overrides))
    data = load_data(cfg, run_folder(checkpoint_dir), device=device, write=False)
    if meta.get("dataset_fingerprint") and meta["dataset_fingerprint"] != data.dataset.fingerprint():
        raise ConfigError(
            f"{checkpoint_dir}: checkpoint was trained on dataset fingerprint {meta['dataset_fingerprint']}, "
            f"but {cfg.data.name} at {cfg.data.root} has {data.dataset.fingerprint()}"
        )
    if meta.get("split_sha256") and meta["split_sha256"] != data.split_sha256:
        raise ConfigError(
            f"{run_folder(checkpoint_dir) / 'split.json'}: the run's split copy has changed since training "
            f"(sha256 {data.split_sha256[:12]}, trained on {meta['split_sha256'][:12]}); its scores would not be the run's"
        )
    return model, cfg, meta, data


def evaluate(checkpoint_dir, split: str = "query", out: str | Path | None = None, overrides=(), device="cpu", *,
             wait: bool = False) -> dict:
    """Evaluate a trained checkpoint on a split part (query | val); writes and returns the JSON report.

    A report written into the run folder (the default, `RUN/evaluate_<split>.json`) makes the evaluation one of the
    folder's writers: it holds the folder's lock throughout, so it stops at once (`RunLocked`) while a training
    writes there, or with `wait` waits for it."""
    run = run_folder(checkpoint_dir)
    # not report.json: that one is train's own record (best epoch, validation score) and stays as written
    out = Path(out) if out else run / f"evaluate_{split}.json"
    into_run = run.is_dir() and run.resolve() in out.resolve().parents
    # under torchrun rank 0 holds the lock for all ranks, as in training
    with run_lock(run, wait=wait) if into_run and env_rank() == 0 else contextlib.nullcontext():
        return _evaluate(checkpoint_dir, split, out, overrides, device)


def _evaluate(checkpoint_dir, split: str, out: Path, overrides, device) -> dict:
    dev, started = init_from_env(device)  # under torchrun: sharded over queries, rank 0 writes the report
    try:
        rank, world = rank_world()
        model, cfg, meta, data = load_run(checkpoint_dir, overrides, dev)
        with torch.no_grad():
            report = retrieval_for_split(model, data, cfg, split, dev, distributed=world > 1)
    finally:
        if started:
            dist.destroy_process_group()
    report["config"] = cfg.to_dict()
    report["checkpoint"] = str(checkpoint_dir)
    report["epoch"] = meta.get("epoch")
    report["split_sha256"] = data.split_sha256
    report["notes"] = list(data.notes)
    if rank == 0:
        with writing(out):
            write_json_atomic(out, report)
    report["path"] = str(out)
    return report


def run_command(args) -> int:
    """`dcmfg evaluate` (the arguments are defined in dcmfg/cli.py)."""
    rep = evaluate(args.checkpoint, args.split, args.out, args.overrides, args.device, wait=args.wait)
    if env_rank() != 0:  # torchrun: one report, from rank 0
        return 0
    for note in rep["notes"]:
        print(f"note: {note}")
    print(f"{rep['split']}: mAP@all I->T {rep['map_i2t']:.4f}  T->I {rep['map_t2i']:.4f}  ({rep['distance']})  -> {rep['path']}")
    return 0
