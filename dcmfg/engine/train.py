"""Training, as named steps: set-up, data, model and optimiser, resume, one epoch, validate-and-select, finish.

Python API: `train(config, out_dir) -> RunResult`. Command: `dcmfg train --config configs/dcmfg.yaml --set a.b=c
--out runs/x [--wait]`; distributed: `torchrun --nproc_per_node=N -m dcmfg.engine.train --config ... --out ...`.

AdamW with a linear warm-up and cosine decay (transformers' schedule), model selection and early stopping on the
validation split only, checkpoints with exact resume (weights, optimiser, schedule, RNG), seeded determinism on CPU,
DistributedDataParallel, mixed precision on CUDA behind `train.amp`.

Run folder (its layout, lock and checkpoint format: dcmfg.engine.checkpoint): split.json (the run's own copy of its
split), metrics.jsonl (one JSON line per epoch), best/ (selected weights), last/ (weights + optimiser + scheduler +
RNG state for resume), report.json (query split, best/). A run holds the folder's lock from start to end: a second
writer stops at once or waits. A failed write (a full disk) stops the run with one line naming the file; the last
good checkpoint stays as it was, and the same command resumes from it. The objective: docs/method.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dcmfg.engine.data import DataBundle, load_data, resolve_split, take, word_limit
from dcmfg.config import Config, config_digest, config_from_dict, load_config
from dcmfg.choices import EvalSplit
from dcmfg.distributed import batch_gather, env_rank, init_from_env, rank_world
from dcmfg.errors import ConfigError, DcmfgError, Interrupted, WriteFailed, writing
from dcmfg.engine.checkpoint import (RUN_PRODUCTS, find_checkpoint, load_training_state, load_weights, run_lock,
                                     save_checkpoint)
from dcmfg.engine.interrupts import interrupts_deferred
from dcmfg.engine.evaluate import retrieval_for_split, validation_scores
from dcmfg.fileio import read_json, write_json_atomic, write_text_atomic
from dcmfg.graph import NonFiniteFeatures
from dcmfg.engine.losses import total_loss
from dcmfg.models.registry import create_model
from dcmfg.paths import cache_dir


class TrainingDiverged(DcmfgError):
    """The loss became NaN/inf: stop, keep the last good checkpoint, tell the user what to change."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C: the last complete checkpoint is kept and resumable; the message says how."""


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


@dataclass
class Session:
    """Where and how this process trains (set-up's result)."""

    cfg: Config
    out: Path
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


@dataclass
class Trainer:
    """The model and what updates it."""

    model: torch.nn.Module
    ddp: torch.nn.Module  # the DDP wrapper (the model itself in one process)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    meta: dict  # written beside every checkpoint: what the weights were trained for
    budget: Budget  # the epoch cap, patience, validation interval and warm-up of this run, in epochs
    clock: Clock | None = None  # set once the resume point is read


@dataclass(frozen=True)
class Budget:
    """A run's budget in epochs: train.epochs / patience / val_every / warmup_epochs, or their `*_steps` twins
    converted with the run's steps per epoch (see `epoch_budget`)."""

    epochs: int
    patience: int
    val_every: int
    warmup_epochs: int
    steps_per_epoch: int


def epoch_budget(tc, steps_per_epoch: int) -> Budget:
    """The budget of a run with `steps_per_epoch` optimizer steps an epoch.

    A `train.*_steps` value s > 0 replaces its epoch twin by ceil(s / steps_per_epoch) (at least 1; warm-up may be
    0): the same step budget then holds at every training size, where a cap in epochs gives a 10x larger training
    split 10x the steps."""
    def epochs(steps: int, fallback: int, least: int = 1) -> int:
        return max(least, -(-int(steps) // steps_per_epoch)) if steps else int(fallback)

    return Budget(epochs(tc.max_steps, tc.epochs), epochs(tc.patience_steps, tc.patience),
                  epochs(tc.val_every_steps, tc.val_every), epochs(tc.warmup_steps, tc.warmup_epochs, least=0),
                  steps_per_epoch)


@dataclass
class Loop:
    """Loop counters: saved in every checkpoint, so a resumed run continues exactly."""

    epoch: int = 0
    step: int = 0
    best: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    done: bool = False
    # time this run has spent, across resumes, up to its last resume point (time after it is lost with a kill)
    seconds: float = 0.0
    cpu_seconds: float = 0.0


@dataclass
class Clock:
    """The wall and CPU clocks of a run that may be resumed: they continue from the resume point's Loop.seconds."""

    wall0: float
    cpu0: float

    @classmethod
    def resuming(cls, loop: Loop) -> Clock:
        return cls(time.perf_counter() - loop.seconds, time.process_time() - loop.cpu_seconds)

    def stamp(self, loop: Loop) -> None:
        loop.seconds, loop.cpu_seconds = time.perf_counter() - self.wall0, time.process_time() - self.cpu0


# ---------------------------------------------------------------------------------------------- step 1: set-up


def setup(cfg: Config, out: Path, *, resume: bool, overwrite: bool) -> Session:
    """Devices and processes, and the run folder (its lock already held): refuse to replace a run's results unless
    told to."""
    if overwrite:
        if env_rank() == 0:
            for name in RUN_PRODUCTS:
                path = out / name
                with writing(path):
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    elif not resume and any((out / name).exists() for name in ("report.json", "last", "best")):
        what = "a finished run (report.json)" if (out / "report.json").exists() else "checkpoints of a run"
        raise ConfigError(f"{out} holds {what}; pass --overwrite to replace it, or resume it without --no-resume")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device, _ = init_from_env(cfg.train.device)  # run_command ends the group
    rank, world = rank_world()
    return Session(cfg, out, rank, world, device)


def default_run_dir(cfg: Config) -> Path:
    return cache_dir() / "runs" / f"{cfg.model.name}-seed{cfg.seed}-{config_digest(cfg)}"


# ---------------------------------------------------------------------------------------------- step 2: data


def load_run_data(s: Session) -> DataBundle:
    """Dataset, the run's split (rank 0 writes the run's copy) and features. Every rank loads at once: the feature
    extraction shares its chunks out across the ranks of a process group, and a split is the same on every rank
    (read from one file, or drawn with the run's seed)."""
    data = load_data(s.cfg, s.out, device=s.device, write=s.main)
    s.barrier()
    return data


def _with_run_split(s: Session, data: DataBundle) -> DataBundle:
    """A caller's loaded data (features reused across runs), with the split this run keeps in its own folder."""
    split, sha, _ = resolve_split(s.cfg, data.dataset, s.out, write=s.main)
    return data if sha == data.split_sha256 else dataclasses.replace(data, split=split, split_sha256=sha)


# ---------------------------------------------------------------------------------------------- step 3: model


def build(s: Session, data: DataBundle) -> Trainer:
    """The model (initial weights depend on the seed only), AdamW and the warm-up + cosine schedule."""
    from transformers.optimization import get_cosine_schedule_with_warmup  # a slow import, needed to train only

    cfg, tc = s.cfg, s.cfg.train
    train_idx = data.part("train")
    if len(train_idx) < 2:
        raise ConfigError(f"the training split has {len(train_idx)} usable items; need at least 2")
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, cfg, *data.dims).to(s.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = len(batches(len(train_idx), tc.batch_size, torch.Generator().manual_seed(0)))
    budget = epoch_budget(tc, steps_per_epoch)
    total = steps_per_epoch * budget.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(budget.warmup_epochs * steps_per_epoch, max(total - 1, 1)),
                                                total)
    ddp = model
    if s.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[s.device.index] if s.device.type == "cuda" else None)
    image_dim, text_dim, num_labels = data.dims
    meta = {
        "model": cfg.model.name,
        "image_dim": image_dim,
        "text_dim": text_dim,
        "num_labels": num_labels,
        "dataset_fingerprint": data.dataset.fingerprint(),
        "split_sha256": data.split_sha256,
        "feature_key": data.feature_key,
        "config_digest": config_digest(cfg),
    }
    return Trainer(model, ddp, optimizer, scheduler, meta, budget)


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded permutation cut into batches; a last batch under half the size joins the previous one (a tiny
    graph would make kNN meaningless and k could exceed it)."""
    perm = torch.randperm(n, generator=generator)
    chunks = list(torch.split(perm, batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < batch_size // 2:
        last = chunks.pop()  # pop first: `chunks[-2] = cat(..., pop())` would write to the wrong slot
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


# ---------------------------------------------------------------------------------------------- step 4: resume


def resume_state(s: Session, t: Trainer) -> tuple[Loop, list[dict]]:
    """The loop state and metrics history of `out/last` when it exists (else a fresh loop)."""
    ckpt = find_checkpoint(s.out / "last")
    if ckpt is None:
        return Loop(), []
    loop = Loop(**load_training_state(ckpt, t.model, s.cfg, t.optimizer, t.scheduler))
    # train.epochs / patience may have been raised to extend a finished run
    loop.done = loop.bad_epochs >= t.budget.patience or loop.epoch >= t.budget.epochs
    history = _trim_jsonl(s.out / "metrics.jsonl", loop.epoch) if s.main else []
    return loop, history


def _trim_jsonl(path: Path, epochs_done: int) -> list[dict]:
    """On resume, drop lines of epochs the checkpoint does not include (a kill after logging, before saving)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("epoch", 0) <= epochs_done]  # record epochs are 1-based
    with writing(path):
        write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


# ---------------------------------------------------------------------------------------------- step 5: one epoch


def run_epoch(s: Session, t: Trainer, data: DataBundle, loop: Loop) -> dict:
    """One pass over the training split; returns the epoch's mean loss terms (and graph statistics)."""
    cfg, tc, epoch = s.cfg, s.cfg.train, loop.epoch
    train_idx = data.part("train")
    labels = data.labels.to(s.device)
    # Everything random in an epoch derives from (seed, epoch): a resumed epoch replays exactly.
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    order = batches(len(train_idx), tc.batch_size, torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    t.model.train()
    sums: dict[str, float] = {}
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=tc.amp and s.device.type == "cuda")
    bar = tqdm(order, desc=f"epoch {epoch + 1}/{t.budget.epochs}", disable=not tc.progress or not s.main, leave=False)
    for b in bar:
        idx = train_idx[b.numpy()]
        gather, local = None, idx
        if s.world > 1:
            shards = np.array_split(idx, s.world)
            local = shards[s.rank]
            gather = batch_gather([len(x) for x in shards], s.rank)
        batch = take(data.feats, local, s.device, words=word_limit(data.feats, idx))  # same width on every rank
        try:
            with amp:
                out = t.ddp(batch, gather=gather)
                loss, parts = total_loss(out, labels[torch.as_tensor(idx, device=s.device)], cfg.loss)
            note = ""
        except NonFiniteFeatures as exc:  # NaN reached the graph before the loss: the same failure
            loss, parts, note = torch.tensor(float("nan")), {"graph": float("nan")}, f" ({exc})"
        if not torch.isfinite(loss):
            _diverged(s, loop, parts, note, float(loss))
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), tc.grad_clip)
        t.optimizer.step()
        t.scheduler.step()
        loop.step += 1
        stats = getattr(out, "stats", None) or {}  # graph statistics of this batch's graph, when the model has one
        for k, v in {"loss": float(loss.detach()), **parts, **stats}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return {k: v / len(order) for k, v in sums.items()}


def _diverged(s: Session, loop: Loop, parts: dict, note: str, value: float):
    raise TrainingDiverged(
        f"loss became {value} at epoch {loop.epoch + 1}, step {loop.step + 1} "
        f"(terms: {', '.join(f'{k}={v:.4g}' for k, v in parts.items())}){note}; training stopped. "
        f"Last good checkpoint: {_last_good(s)}. Lower train.lr or check the features."
    )


def _last_good(s: Session) -> str:
    last = find_checkpoint(s.out / "last")
    return (f"{last} (after epoch {read_json(last / 'state.json')['loop']['epoch']})" if last
            else "none yet (none is written before the first validated epoch)")


# ---------------------------------------------------------------------------------------------- step 6: validate


def validate_and_select(s: Session, t: Trainer, data: DataBundle, loop: Loop, terms: dict, seconds: float) -> dict:
    """Validation mAP (never the query split), selection by train.select_metric, early stopping, checkpoints."""
    tc, b = s.cfg.train, t.budget
    epoch = loop.epoch + 1
    # validated: every val_every-th epoch, and any epoch the run may end on (the cap, or patience running out)
    due = epoch % b.val_every == 0 or epoch >= b.epochs or loop.bad_epochs + 1 >= b.patience
    val = validation_scores(t.model, data, s.cfg, s.device, distributed=s.world > 1) if due else {}  # all ranks
    improved = due and val[f"val_{tc.select_metric}"] > loop.best
    score = val.get(f"val_{tc.select_metric}")
    if improved:
        loop.best, loop.best_epoch, loop.bad_epochs = score, epoch, 0
    else:
        loop.bad_epochs += 1
    loop.epoch += 1
    loop.done = loop.bad_epochs >= b.patience or loop.epoch >= b.epochs
    record = {"epoch": loop.epoch, "step": loop.step, "lr": t.scheduler.get_last_lr()[0], **terms, **val,
              "best_epoch": loop.best_epoch, "seconds": round(seconds, 3)}
    if s.main:
        if t.clock:
            t.clock.stamp(loop)
        meta = {**t.meta, "epoch": loop.epoch, **val}
        try:
            with interrupts_deferred():  # a checkpoint and its metrics line are written whole or not at all
                if improved:
                    save_checkpoint(s.out / "best", t.model, s.cfg, meta)
                _log_epoch(s.out / "metrics.jsonl", record, fresh=loop.epoch == 1)
                # the resume point at validated epochs only (the last epoch is one): a resumed run replays the
                # epochs after it exactly (everything random derives from seed and epoch)
                if due:
                    save_checkpoint(s.out / "last", t.model, s.cfg, meta, t.optimizer, t.scheduler, vars(loop))
        except WriteFailed as exc:
            again = "resume" if find_checkpoint(s.out / "last") else "start"
            raise WriteFailed(f"{exc}; training stopped at epoch {epoch}. Last good checkpoint: {_last_good(s)}; "
                              f"run the same command again to {again} once the disk has room") from exc
        if tc.progress:
            shown = f"  val mAP I->T {val['val_map_i2t']:.4f} T->I {val['val_map_t2i']:.4f}" if due else ""
            print(f"epoch {loop.epoch}: loss {record.get('loss', float('nan')):.4f}{shown}{'  *' if improved else ''}",
                  file=sys.stderr)
    return record


def _log_epoch(path: Path, record: dict, fresh: bool) -> None:
    """metrics.jsonl: a fresh run replaces the file at its first epoch (not before: nothing is lost early); later
    lines are appended whole or not at all (a failed append is cut off again, then raised as WriteFailed)."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with writing(path):
        if fresh:
            write_text_atomic(path, line)
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        end = os.fstat(fd).st_size
        try:
            data = line.encode("utf-8")
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, end)
            raise
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- step 7: finish


def finish(s: Session, t: Trainer, data: DataBundle, loop: Loop) -> dict | None:
    """The selected checkpoint scored once on the query split: report.json (rank 0)."""
    s.barrier()
    best = s.out / "best"
    if not (best / "model.safetensors").is_file():
        raise DcmfgError(f"{s.out}: no best checkpoint was written (no epoch finished)")
    load_weights(t.model, best / "model.safetensors")
    # every rank scores its share of the queries; rank 0 writes the report
    report = retrieval_for_split(t.model, data, s.cfg, EvalSplit.QUERY, s.device, distributed=s.world > 1)
    if s.main:
        report.update(config=s.cfg.to_dict(), config_digest=t.meta["config_digest"], best_epoch=loop.best_epoch,
                      best_val=loop.best, select_metric=s.cfg.train.select_metric, epochs_run=loop.epoch,
                      budget=dataclasses.asdict(t.budget), train_seconds=loop.seconds,
                      train_cpu_seconds=loop.cpu_seconds, checkpoint="best", split_sha256=data.split_sha256)
        try:
            with writing(s.out / "report.json"):
                write_json_atomic(s.out / "report.json", report)
        except WriteFailed as exc:
            raise WriteFailed(f"{exc}; the trained checkpoints in {s.out} are kept: run the same command again to "
                              f"write the report once the disk has room") from exc
    s.barrier()
    return report if s.main else None


# ---------------------------------------------------------------------------------------------- all steps


def train(config: Config | dict | str | Path, out_dir: str | Path | None = None, *, resume: bool = True,
          overwrite: bool = False, data: DataBundle | None = None, wait: bool = False) -> RunResult:
    """Train a model by the config; resumes from `out_dir/last` when present; ends by evaluating the selected
    checkpoint on the query split (report.json). `data` lets a caller reuse loaded features.

    The run holds the folder's lock throughout (`dcmfg.engine.checkpoint.run_lock`; under torchrun rank 0 holds it
    for all ranks): another process writing into the folder makes it raise `RunLocked` at once, or with `wait`
    wait for that process to finish."""
    cfg = _as_config(config)
    out = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    if env_rank() != 0:
        return _train_locked(cfg, out, resume=resume, overwrite=overwrite, data=data)
    with run_lock(out, wait=wait):
        return _train_locked(cfg, out, resume=resume, overwrite=overwrite, data=data)


def _train_locked(cfg: Config, out: Path, *, resume: bool, overwrite: bool, data: DataBundle | None) -> RunResult:
    """`train` once the run folder is this process's."""
    # Multi-threaded CPU scatter/index kernels add in a varying order; the deterministic variants make the same
    # seed give the same numbers to the last bit (without them, epoch losses differ in the last digits).
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    s = setup(cfg, out, resume=resume, overwrite=overwrite)
    loop = Loop()
    try:
        data = load_run_data(s) if data is None else _with_run_split(s, data)
        t = build(s, data)
        loop, history = resume_state(s, t)
        t.clock = Clock.resuming(loop)
        while not loop.done:
            t0 = time.time()
            terms = run_epoch(s, t, data, loop)
            history.append(validate_and_select(s, t, data, loop, terms, time.time() - t0))
        report = finish(s, t, data, loop)
        return RunResult(s.out, report, loop.best_epoch, loop.best, history)
    except KeyboardInterrupt:
        kept = find_checkpoint(s.out / "last")
        saved = read_json(kept / "state.json")["loop"]["epoch"] if kept else 0
        # the resume point is written at validated epochs (train.val_every): epochs after it run again on resume
        again = "" if loop.epoch <= saved else (
            f"; epoch{'s' if loop.epoch > saved + 1 else ''} {saved + 1}{f'-{loop.epoch}' if loop.epoch > saved + 1 else ''}"
            f" ran after it and will run again")
        if kept:
            where = f"the checkpoint of epoch {saved} is kept in {kept}{again}"
        elif loop.epoch:
            where = (f"no checkpoint yet: {loop.epoch} epoch(s) ran, and one is written at each validated epoch "
                     f"(train.val_every={s.cfg.train.val_every})")
        else:
            where = "no epoch had finished"
        raise TrainingInterrupted(
            f"interrupted; {where} (run the same command again to {'resume' if kept else 'start'})") from None
    finally:
        # a library call leaves the process as it found it: a later run in the same process (a notebook, a test)
        # must not inherit this run's thread count, or its sums come out in another order
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)


def _as_config(config) -> Config:
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, dict):
        return config_from_dict(config)
    return config


# ---------------------------------------------------------------------------------------------- CLI


def run_command(args) -> int:
    """`dcmfg train` (the arguments are defined in dcmfg/cli.py); under torchrun every rank runs it."""
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if getattr(args, "device", None) else [])
    cfg = load_config(args.config, overrides)
    try:
        res = train(cfg, args.out, resume=not args.no_resume, overwrite=args.overwrite, wait=args.wait)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if res.report is not None:
        print(
            f"best epoch {res.best_epoch} (val {res.best_val:.4f}); query mAP@all I->T {res.map_i2t:.4f} "
            f"T->I {res.map_t2i:.4f} ({res.report['distance']}) -> {res.out_dir / 'report.json'}"
        )
    return 0


def main(argv=None) -> int:
    """`python -m dcmfg.engine.train` / `torchrun -m dcmfg.engine.train`: the same as `dcmfg train` (and `-m dcmfg.cli train`)."""
    from dcmfg.cli import main as cli_main  # the command layer sits above the engine

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
