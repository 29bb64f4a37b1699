"""The run folder and checkpoint format, in one place: what a run folder holds, how a checkpoint is written (whole
or not at all) and read back, and how weights go to and from safetensors.

A run folder (`dcmfg train --out RUN`):

    RUN/split.json      the run's own copy of its split (its sha256 is in every checkpoint's meta.json)
    RUN/metrics.jsonl   one JSON line per epoch
    RUN/best/           the selected checkpoint: model.safetensors, config.json, meta.json
    RUN/last/           the resume point: the same plus optimizer.safetensors, state.json, rng.safetensors
    RUN/report.json     the query split scored with best/

A checkpoint folder is written beside its final name and swapped in (`_swap_dir`), so some complete checkpoint exists
at every instant; `X.old` is the previous one while a swap is in flight. Everything loads with safetensors (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dcmfg.config import Config, config_from_json
from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.fileio import read_json, save_safetensors_atomic, write_text_atomic
from dcmfg.models.registry import create_model

# Config fields that may change between a run and its resume without changing what is computed.
RESUME_FREE = {("train", "progress"), ("train", "threads"), ("train", "epochs"), ("train", "device"), ("train", "patience")}


# What a run folder holds once training wrote to it; `--overwrite` removes exactly these.
RUN_PRODUCTS = ("best", "best.old", "last", "last.old", "metrics.jsonl", "report.json", "split.json")


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
    optimizer.safetensors (moments), state.json (param groups, scheduler, loop counters), rng.safetensors."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(model, tmp / "model.safetensors")
        write_text_atomic(tmp / "config.json", cfg.to_json() + "\n")
        write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if optimizer is not None:
            osd = optimizer.state_dict()
            tensors = {f"state/{pid}/{name}": v for pid, st in osd["state"].items() for name, v in st.items()}
            save_safetensors_atomic(tensors, tmp / "optimizer.safetensors")
            save_safetensors_atomic({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
            sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            write_text_atomic(tmp / "state.json", json.dumps(
                {"param_groups": osd["param_groups"], "scheduler": sched, "loop": state}, indent=1) + "\n")
        _swap_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful swap; removed after a failure


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

