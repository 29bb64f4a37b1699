"""Training: AdamW + warm-up/cosine schedule, validation-only model selection and early stopping, checkpoints
with exact resume, seeded determinism, DistributedDataParallel.

Python API: `train(config, out_dir) -> RunResult`. Command: `dcmfg train --config configs/dcmfg.yaml --set a.b=c
--out runs/x`; distributed: `torchrun --nproc_per_node=N -m dcmfg.train --config ... --out ...`.

Run folder: split.json (when the config names none), metrics.jsonl (one JSON line per epoch), best/ (selected
weights), last/ (weights + optimiser + scheduler + RNG state for resume), report.json (query split, best/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dcmfg.config import Config, config_from_dict, load_config
from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.evaluate import (
    DataBundle,
    load_data,
    retrieval_for_split,
    take,
    validation_scores,
    word_limit,
    write_json_atomic,
)
from dcmfg.graph import NonFiniteFeatures
from dcmfg.fileio import save_safetensors_atomic, write_text_atomic
from dcmfg.losses import total_loss
from dcmfg.model import load_weights, save_weights
from dcmfg.registry import create_model

# Config fields that may change between a run and its resume without changing what is computed.
RESUME_FREE = {("train", "progress"), ("train", "threads"), ("train", "epochs"), ("train", "device"), ("train", "patience")}


class TrainingDiverged(DcmfgError):
    """The loss became NaN/inf: stop, keep the last good checkpoint, tell the user what to change."""


@dataclass
class RunResult:
    out_dir: Path
    report: dict | None
    best_epoch: int
    best_val: float
    history: list[dict] = field(default_factory=list)

    @property
    def map_i2t(self) -> float | None:
        return None if self.report is None else self.report["map_i2t"]

    @property
    def map_t2i(self) -> float | None:
        return None if self.report is None else self.report["map_t2i"]


# ---------------------------------------------------------------------------------------------- distributed


def _dist_setup(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


class _GatherShards(torch.autograd.Function):
    """All ranks' shards of a batch, concatenated in rank order, with gradients.

    Every rank then computes the same graph and the same loss L on the whole batch, so dL/d(gathered) is equal on
    all ranks; scaling the local slice by the world size makes DDP's gradient average equal the single-process
    gradient (the projection heads of each shard get dL/dtheta from every rank's copy of the loss).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int):
        world = len(sizes)
        m = max(sizes)
        pad = torch.zeros((m - len(x),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        buf = [torch.empty((m,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
        dist.all_gather(buf, torch.cat([x, pad]).contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([b[:s] for b, s in zip(buf, sizes)])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        start = sum(ctx.sizes[: ctx.rank])
        return g[start : start + ctx.sizes[ctx.rank]] * len(ctx.sizes), None, None


def _gather_fn(sizes: list[int], rank: int):
    def gather(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bool:
            return _GatherShards.apply(x.to(torch.uint8), sizes, rank).bool()
        return _GatherShards.apply(x, sizes, rank)

    return gather


# ---------------------------------------------------------------------------------------------- checkpoints


def _swap_dir(tmp: Path, final: Path) -> None:
    """Replace folder `final` by `tmp` so that some complete checkpoint exists at every instant."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(folder: Path, model, cfg: Config, meta: dict, optimizer=None, scheduler=None, state=None) -> None:
    """Weights (safetensors) + config.json + meta.json, and with an optimiser the full training state:
    optimizer.safetensors (moments), state.json (param groups, scheduler, loop counters), rng.safetensors."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / "model.safetensors")
    write_text_atomic(tmp / "config.json", cfg.to_json() + "\n")
    write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if optimizer is not None:
        osd = optimizer.state_dict()
        tensors = {f"state/{pid}/{name}": t for pid, s in osd["state"].items() for name, t in s.items()}
        save_safetensors_atomic(tensors, tmp / "optimizer.safetensors")
        save_safetensors_atomic({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        write_text_atomic(
            tmp / "state.json",
            json.dumps({"param_groups": osd["param_groups"], "scheduler": sched, "loop": state}, indent=1) + "\n",
        )
    _swap_dir(tmp, folder)


def _find_checkpoint(folder: Path) -> Path | None:
    for cand in (folder, folder.with_name(folder.name + ".old")):  # .old survives a kill inside _swap_dir
        if (cand / "state.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


def _config_diff(a: dict, b: dict, prefix="") -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb and tuple(f"{prefix}{key}".split(".")) not in RESUME_FREE:
            diffs.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return diffs


def load_training_state(folder: Path, model, cfg: Config, optimizer, scheduler) -> dict:
    """Resume: refuse a checkpoint from another model or config (naming the keys), then restore everything."""
    from safetensors.torch import load_file

    saved = json.loads((folder / "config.json").read_text())
    diffs = _config_diff(saved, cfg.to_dict())
    if diffs:
        raise ConfigError(
            f"{folder}: checkpoint was made with a different config ({'; '.join(diffs[:6])}); "
            f"use another --out folder or the same config"
        )
    load_weights(model, folder / "model.safetensors")
    st = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict = {}
    for key, t in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": st["param_groups"]})
    sched = scheduler.state_dict()
    sched.update(st["scheduler"])
    scheduler.load_state_dict(sched)
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch_cpu"])
    return st["loop"]


# ---------------------------------------------------------------------------------------------- loop


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded permutation cut into batches; a last batch under half the size joins the previous one (a tiny
    graph would make kNN meaningless and k could exceed it)."""
    perm = torch.randperm(n, generator=generator)
    chunks = list(torch.split(perm, batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < batch_size // 2:
        last = chunks.pop()  # pop first: `chunks[-2] = cat(..., pop())` would write to the wrong slot
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _trim_jsonl(path: Path, epochs_done: int) -> list[dict]:
    """On resume, drop lines of epochs the checkpoint does not include (a kill after logging, before saving)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("epoch", 0) <= epochs_done]  # record epochs are 1-based
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


def default_run_dir(cfg: Config) -> Path:
    from hashlib import sha256

    from dcmfg.paths import cache_dir

    h = sha256(cfg.to_json().encode()).hexdigest()[:10]
    return cache_dir() / "runs" / f"{cfg.model.name}-seed{cfg.seed}-{h}"


def train(config: Config | dict | str | Path, out_dir: str | Path | None = None, *, resume: bool = True,
          data: DataBundle | None = None) -> RunResult:
    """Train a model by the config; resumes from `out_dir/last` when present; ends by evaluating the selected
    checkpoint on the query split (report.json). `data` lets a caller reuse loaded features."""
    # Multi-threaded CPU scatter/index kernels add in a varying order; the deterministic variants make the same
    # seed give the same numbers to the last bit (measured: without it, epoch losses differ at 1e-7).
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(config, out_dir, resume=resume, data=data)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(config, out_dir, *, resume: bool, data: DataBundle | None) -> RunResult:
    if isinstance(config, (str, Path)):
        cfg = load_config(config)
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    else:
        cfg = config
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    rank, world, device = _dist_setup(tc.device)
    out = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()  # the split file is made by rank 0 below; others read it
    if data is None:
        if world > 1 and rank != 0:
            dist.barrier()
        data = load_data(cfg, out)
        if world > 1 and rank == 0:
            dist.barrier()
    if rank == 0 and not cfg.data.split and not (out / "split.json").is_file():
        from dcmfg.data.splits import save_split

        save_split(data.split, out / "split.json")  # evaluate reads the run's own split back
    train_idx = data.part("train")
    if len(train_idx) < 2:
        raise ConfigError(f"the training split has {len(train_idx)} usable items; need at least 2")
    dims = (data.feats["image_global"].shape[1], data.feats["text_global"].shape[1], data.labels.shape[1])
    cfg.model.num_labels = int(dims[2])
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = create_model(cfg.model.name, cfg, *dims).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = len(_batches(len(train_idx), tc.batch_size, torch.Generator().manual_seed(0)))
    total = steps_per_epoch * tc.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, min(tc.warmup_epochs * steps_per_epoch, max(total - 1, 1)))
    )
    meta = {
        "model": cfg.model.name,
        "image_dim": int(dims[0]),
        "text_dim": int(dims[1]),
        "num_labels": int(dims[2]),
        "dataset_fingerprint": data.dataset.fingerprint(),
        "split_fingerprint": data.split.fingerprint,
        "feature_key": data.feature_key,
    }
    loop = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "bad_epochs": 0, "done": False}
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    ckpt = _find_checkpoint(out / "last") if resume else None
    fresh_metrics = ckpt is None  # a fresh run replaces metrics.jsonl at its first epoch (not before: nothing lost)
    if ckpt is not None:
        loop = load_training_state(ckpt, model, cfg, optimizer, scheduler)
        # train.epochs / patience may have been raised to extend a finished run
        loop["done"] = loop["bad_epochs"] >= tc.patience or loop["epoch"] >= tc.epochs
        if rank == 0:
            history = _trim_jsonl(metrics_path, loop["epoch"])
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from tqdm.auto import tqdm

    labels = data.labels.to(device)
    for epoch in range(loop["epoch"], tc.epochs):
        if loop["done"]:
            break
        # Everything random in an epoch derives from (seed, epoch): a resumed epoch replays exactly.
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        batches = _batches(len(train_idx), tc.batch_size, torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        model.train()
        sums: dict[str, float] = {}
        t0 = time.time()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not tc.progress or rank != 0, leave=False)
        for b in bar:
            idx = train_idx[b.numpy()]
            gather = None
            if world > 1:
                shards = np.array_split(idx, world)
                sizes = [len(s) for s in shards]
                local = shards[rank]
                gather = _gather_fn(sizes, rank)
            else:
                local = idx
            batch = take(data.feats, local, device, words=word_limit(data.feats, idx))  # same width on every rank
            try:
                out_ = ddp(batch, gather=gather)
                loss, parts = total_loss(out_, labels[torch.as_tensor(idx, device=device)], cfg.loss)
            except NonFiniteFeatures as exc:  # NaN reached the graph before the loss: the same failure
                loss, parts = torch.tensor(float("nan")), {"graph": float("nan")}
                parts_note = f" ({exc})"
            else:
                parts_note = ""
            if not torch.isfinite(loss):
                last = _find_checkpoint(out / "last")
                where = f"{last} (after epoch {json.loads((last / 'state.json').read_text())['loop']['epoch']})" if last else "none yet (it failed in the first epoch)"
                raise TrainingDiverged(
                    f"loss became {float(loss)} at epoch {epoch + 1}, step {loop['step'] + 1} "
                    f"(terms: {', '.join(f'{k}={v:.4g}' for k, v in parts.items())}){parts_note}; training stopped. "
                    f"Last good checkpoint: {where}. Lower train.lr or check the features."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            loop["step"] += 1
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        val = validation_scores(model, data, cfg, device)
        score = val[tc.select_metric] if tc.select_metric in val else val["val_map_mean"]
        improved = score > loop["best"]
        if improved:
            loop["best"], loop["best_epoch"], loop["bad_epochs"] = score, epoch + 1, 0
        else:
            loop["bad_epochs"] += 1
        loop["epoch"] = epoch + 1
        loop["done"] = loop["bad_epochs"] >= tc.patience or epoch + 1 >= tc.epochs
        record = {
            "epoch": epoch + 1,
            "step": loop["step"],
            "lr": scheduler.get_last_lr()[0],
            **{k: v / len(batches) for k, v in sums.items()},
            **val,
            "best_epoch": loop["best_epoch"],
            "seconds": round(time.time() - t0, 3),
        }
        history.append(record)
        if rank == 0:
            if improved:
                save_checkpoint(out / "best", model, cfg, {**meta, "epoch": epoch + 1, **val})
            if fresh_metrics:
                write_text_atomic(metrics_path, json.dumps(record, sort_keys=True) + "\n")
                fresh_metrics = False
            else:
                _append_jsonl(metrics_path, record)
            save_checkpoint(out / "last", model, cfg, {**meta, "epoch": epoch + 1, **val}, optimizer, scheduler, dict(loop))
            if tc.progress:
                print(
                    f"epoch {epoch + 1}: loss {record.get('loss', float('nan')):.4f}  val mAP I->T {val['val_map_i2t']:.4f} "
                    f"T->I {val['val_map_t2i']:.4f}{'  *' if improved else ''}",
                    file=sys.stderr,
                )
        if loop["done"]:
            break

    report = None
    if world > 1:
        dist.barrier()
    if rank == 0:
        best = out / "best"
        if not (best / "model.safetensors").is_file():
            raise DcmfgError(f"{out}: no best checkpoint was written (no epoch finished)")
        load_weights(model, best / "model.safetensors")
        report = retrieval_for_split(model, data, cfg, "query", device)
        report["config"] = cfg.to_dict()
        report["best_epoch"] = loop["best_epoch"]
        report["best_val"] = loop["best"]
        report["checkpoint"] = str(best)
        write_json_atomic(out / "report.json", report)
    if world > 1:
        dist.barrier()
    return RunResult(out, report, loop["best_epoch"], loop["best"], history)


# ---------------------------------------------------------------------------------------------- CLI


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (configs/dcmfg.yaml, linear, dcmh, dcmht)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set graph.k=8 (repeatable; values parsed as YAML)")
    p.add_argument("--out", default=None, help="run folder (default: under DCMFG_CACHE/runs)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/last exists")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model; ends with report.json on the query split")
    _add_args(p)
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = load_config(args.config, args.overrides)
    res = train(cfg, args.out, resume=not args.no_resume)
    if res.report is not None:
        print(
            f"best epoch {res.best_epoch} (val {res.best_val:.4f}); query mAP@all I->T {res.map_i2t:.4f} "
            f"T->I {res.map_t2i:.4f} ({res.report['distance']}) -> {res.out_dir / 'report.json'}"
        )
    return 0


def main(argv=None) -> int:
    """`python -m dcmfg.train` / `torchrun -m dcmfg.train`: the same arguments as `dcmfg train`."""
    from dcmfg.errors import is_user_error

    p = argparse.ArgumentParser(prog="dcmfg.train", description=__doc__)
    _add_args(p)
    args = p.parse_args(argv)
    try:
        return _cli(args)
    except Exception as exc:
        if is_user_error(exc):
            print(f"dcmfg: error: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
