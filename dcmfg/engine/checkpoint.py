"""The run folder and checkpoint format, in one place: what a run folder holds, how a checkpoint is written (whole
or not at all) and read back, and how weights go to and from safetensors.

A run folder (`dcmfg train --out RUN`):

    RUN/split.json      the run's own copy of its split (its sha256 is in every checkpoint's meta.json)
    RUN/metrics.jsonl   one JSON line per epoch
    RUN/best/           the selected checkpoint: model.safetensors, config.json, meta.json
    RUN/last/           the resume point: the same plus optimizer.safetensors, state.json, rng.safetensors
    RUN/report.json     the query split scored with best/
    RUN/.lock           while a process writes into the folder: its pid and host (`run_lock`)

A run folder has one writer at a time: training (`dcmfg.engine.train.train`) holds `run_lock` for the whole run, and
an evaluation that writes its report into the folder holds it too; a second writer stops at once naming the holder,
or waits (`--wait`). The lock is an flock, which the kernel releases when its process dies, so a folder whose writer
was killed is taken over at once; the pid in the file only names the holder in messages, it never decides.

A checkpoint folder is written beside its final name and swapped in (`_swap_dir`), so some complete checkpoint exists
at every instant; `X.old` is the previous one while a swap is in flight. A write that fails (a full disk) raises
`WriteFailed` naming the file, removes what it had begun and leaves the previous checkpoint as it was. Everything
loads with safetensors (no pickle).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dcmfg.config import Config, config_from_json
from dcmfg.errors import ConfigError, DcmfgError, writing
from dcmfg.fileio import read_json, save_safetensors_atomic, write_text_atomic
from dcmfg.models.registry import create_model

# Config fields that may change between a run and its resume without changing what is computed.
RESUME_FREE = {("train", "progress"), ("train", "threads"), ("train", "epochs"), ("train", "device"), ("train", "patience")}


# What a run folder holds once training wrote to it; `--overwrite` removes exactly these.
RUN_PRODUCTS = ("best", "best.old", "last", "last.old", "metrics.jsonl", "report.json", "split.json")

RUN_LOCK = ".lock"  # the run folder's lock file (never one of RUN_PRODUCTS: --overwrite runs under the lock)


def find_checkpoint(folder: Path) -> Path | None:
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
    diffs = _config_diff(read_json(folder / "config.json"), cfg.to_dict())
    if diffs:
        raise ConfigError(
            f"{folder}: checkpoint was made with a different config ({'; '.join(diffs[:6])}); "
            f"use another --out folder, the same config, or --overwrite"
        )
    load_weights(model, folder / "model.safetensors")
    st = read_json(folder / "state.json")
    state: dict = {}
    for key, tensor in load_file(str(folder / "optimizer.safetensors")).items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": st["param_groups"]})
    sched = scheduler.state_dict()
    sched.update(st["scheduler"])
    scheduler.load_state_dict(sched)
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch_cpu"])
    return st["loop"]


def save_checkpoint(folder: Path, model, cfg: Config, meta: dict, optimizer=None, scheduler=None, state=None) -> None:
    """Weights (safetensors) + config.json + meta.json, and with an optimiser the full training state:
    optimizer.safetensors (moments), state.json (param groups, scheduler, loop counters), rng.safetensors.

    Written into `folder.tmp<pid>` and swapped in whole. A failed write raises `WriteFailed` naming the file (its
    name inside `folder`), removes the temporary folder and leaves the previous checkpoint in `folder` as it was."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    files = {
        "model.safetensors": lambda p: save_weights(model, p),
        "config.json": lambda p: write_text_atomic(p, cfg.to_json() + "\n"),
        "meta.json": lambda p: write_text_atomic(p, json.dumps(meta, indent=1, sort_keys=True) + "\n"),
    }
    if optimizer is not None:
        osd = optimizer.state_dict()
        tensors = {f"state/{pid}/{name}": v for pid, st in osd["state"].items() for name, v in st.items()}
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        files.update({
            "optimizer.safetensors": lambda p: save_safetensors_atomic(tensors, p),
            "rng.safetensors": lambda p: save_safetensors_atomic({"torch_cpu": torch.get_rng_state()}, p),
            "state.json": lambda p: write_text_atomic(p, json.dumps(
                {"param_groups": osd["param_groups"], "scheduler": sched, "loop": state}, indent=1) + "\n"),
        })
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(folder):
            tmp.mkdir(parents=True)
        for name, write in files.items():
            with writing(folder / name, also=(SafetensorError,)):  # safetensors reports I/O errors as its own
                write(tmp / name)
        with writing(folder):
            _swap_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful swap; removed after a failure


def _swap_dir(tmp: Path, final: Path) -> None:
    """Replace folder `final` by `tmp` so that some complete checkpoint exists at every instant."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    # else a swap was killed between its two renames: `old` is the one complete checkpoint until `tmp` is in
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists() and not final.exists():
            os.replace(old, final)  # the previous checkpoint back under its name
        raise
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint_model(path, device="cpu") -> tuple[torch.nn.Module, Config, dict]:
    """A trained model from a checkpoint folder (or a run folder: its `best/` checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise DcmfgError(f"{path}: run or checkpoint folder not found")
    if (path / "best" / "model.safetensors").is_file():
        path = path / "best"
    for name in ("model.safetensors", "config.json", "meta.json"):
        if not (path / name).is_file():
            raise DcmfgError(f"{path}: not a dcmfg checkpoint ({name} missing)")
    try:
        cfg = config_from_json((path / "config.json").read_text())
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{path / 'config.json'}: {exc}") from None
        raise ConfigError(f"{path / 'config.json'}: unreadable ({exc}); the checkpoint is damaged") from None
    meta = read_json(path / "meta.json")
    missing = [k for k in ("image_dim", "text_dim", "num_labels") if k not in meta]
    if missing:
        raise ConfigError(f"{path / 'meta.json'}: lacks {', '.join(missing)}; the checkpoint is damaged")
    model = create_model(cfg.model.name, cfg, meta["image_dim"], meta["text_dim"], meta["num_labels"])
    load_weights(model, path / "model.safetensors")
    model.to(device).eval()
    return model, cfg, meta


def run_folder(checkpoint_dir) -> Path:
    """The run folder of a run or checkpoint folder (`RUN/best` -> `RUN`)."""
    path = Path(checkpoint_dir)
    return path.parent if path.name in ("best", "last") else path



class RunLocked(DcmfgError):
    """Another process is writing into this run folder (it holds the folder's lock)."""


_HELD: dict[Path, list] = {}  # run folders this process holds: resolved path -> [thread id, depth] (re-entrant)
_TEMPS = re.compile(r"^(best|last)\.tmp\d+$|^\..+\.tmp$")  # what save_checkpoint and the atomic writers leave


@contextlib.contextmanager
def run_lock(folder, *, wait: bool = False) -> Iterator[Path]:
    """Hold the run folder's lock (`RUN/.lock`, created with the folder if needed) for the block.

    Another holder makes it raise `RunLocked` at once, naming the folder and the holder's pid and host, or with
    `wait` block until the holder is done (one line on stderr says so). Re-entrant within one thread (a study that
    trains and then records the run under one lock). On entry the temporary files a killed writer left behind are
    removed: with the lock held no one else writes here. On exit the lock file is removed."""
    folder = Path(folder)
    key = folder.resolve()
    held = _HELD.get(key)
    if held is not None and held[0] == threading.get_ident():
        held[1] += 1
        try:
            yield folder
        finally:
            held[1] -= 1
        return
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_LOCK
    fd = _acquire(path, folder, wait)
    _HELD[key] = [threading.get_ident(), 1]
    try:
        _remove_stale_temps(folder)
        yield folder
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):  # remove our lock file only: never one a later holder made
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        os.close(fd)  # releases the flock


def _acquire(path: Path, folder: Path, wait: bool) -> int:
    """An open, flocked descriptor of the lock file now at `path`, with this process's pid and host written in."""
    told = False
    while True:
        with writing(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(path)
                if not wait:
                    raise RunLocked(f"run folder {folder} is locked by {holder}, which is writing into it; "
                                    f"pass --wait to wait until it is done, or use another folder") from None
                if not told:
                    print(f"dcmfg: run folder {folder} is locked by {holder}; waiting for it (--wait)",
                          file=sys.stderr, flush=True)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # the holder we waited for removes its lock file as it lets go: we may hold a file no longer at `path`
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                with writing(path):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def lock_holder(path: Path) -> str:
    """`pid N on HOST` as the lock file at `path` names its holder (`another process` while it is being written)."""
    try:
        pid, host = Path(path).read_text().split()
        return f"pid {int(pid)} on {host}"
    except (OSError, ValueError):
        return "another process"


def _remove_stale_temps(folder: Path) -> None:
    for p in folder.iterdir():
        if _TEMPS.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def save_weights(model: nn.Module, path) -> None:
    """safetensors, written atomically so a kill never leaves half a file."""
    save_safetensors_atomic(model.state_dict(), path)


def load_weights(model: nn.Module, path) -> None:
    """Load safetensors weights; a file from another model or config is refused, naming what differs."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        detail = "; ".join(
            s
            for s in (
                f"missing {', '.join(missing[:5])}" if missing else "",
                f"unexpected {', '.join(extra[:5])}" if extra else "",
                f"shape {', '.join(shapes[:5])}" if shapes else "",
            )
            if s
        )
        raise ConfigError(f"{path}: checkpoint does not fit this model/config ({type(model).__name__}): {detail}")
    model.load_state_dict(state)

