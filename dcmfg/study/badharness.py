"""The bad-input harness: a temporary workspace with a small copy of the real data, the `dcmfg` command run in a
subprocess as a user runs it, and the table of what each case showed (`run_table`), with the build machine's paths
replaced by $TMP, $DATA, ~. The cases themselves are `dcmfg.study.badcases`; `dcmfg.study.badinput` is the front door.

Features, runs and copies live in the temporary folder (the backbone weights are read from the user's cache).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from dcmfg.data import load_dataset
from dcmfg.data.discover import find_datasets
from dcmfg.data.mirflickr import CONCEPTS, detect_layout, find_raw
from dcmfg.data.splits import make_split, save_split
from dcmfg.errors import DcmfgError
from dcmfg.paths import cache_dir, data_dir

COLUMNS = ["case", "input", "command", "exit code", "stderr lines", "user sees", "seconds", "note"]
# A tiny run on the small copy: one epoch, a small model, no progress bars (one line a case, not a bar).
TINY_RUN = ["train.epochs=1", "train.progress=false", "model.dim=64", "model.hidden=128", "model.token_dim=32"]
TIMEOUT = 600
STALE_IDS = 12  # the copy the stale-feature cases spoil: a few items, so that (re-)extraction is cheap


@dataclass
class Outcome:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    note: str = ""
    shows: str | None = None  # what the user reads, when not the default line


class Workspace:
    """The temporary folder of one `run_cases` call and the shared things cases need, each made on first use."""

    def __init__(self, tmp: Path, source: Path, ids: int, timeout: float):
        self.tmp, self.source, self.ids, self.timeout = tmp, source, ids, timeout
        self.setup_seconds = 0.0
        self._data: Path | None = None
        self._split: Path | None = None
        self._run: Path | None = None
        self._stale: Path | None = None
        self._stale_cache: Path | None = None
        cache = tmp / "cache"
        cache.mkdir()
        weights = cache_dir() / "weights"  # converted backbone weights: reused, not converted again
        weights.mkdir(parents=True, exist_ok=True)
        (cache / "weights").symlink_to(weights, target_is_directory=True)
        self.env = dict(os.environ, DCMFG_CACHE=str(cache), PYTHONUNBUFFERED="1")
        self.env.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.env.pop("DCMFG_DATA", None)  # every command names its data

    # -------------------------------------------------------------------------------------------- commands

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dcmfg.cli", *map(str, args)]

    def dcmfg(self, *args: str, note: str = "", timeout: float | None = None) -> Outcome:
        """Run `dcmfg ARGS` as a user would (at most `timeout` seconds, default the workspace's)."""
        argv = self.command(*args)
        timeout = self.timeout if timeout is None else timeout
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = -9, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {timeout:.0f} s)"
        return Outcome(argv, rc, out, err, time.perf_counter() - t0, note)

    def setup(self, *args: str) -> Outcome:
        """A command that prepares a case (not a case itself): it must succeed."""
        out = self.dcmfg(*args)
        self.setup_seconds += out.seconds
        if out.returncode != 0:
            raise RuntimeError(f"badinput set-up failed: dcmfg {' '.join(args)}\n{out.stderr[-3000:]}")
        return out

    def train(self, *sets: str, out: Path, split: Path | None = None, extra: tuple = ()) -> list[str]:
        """`dcmfg train` arguments for the tiny run on the small copy, plus `sets` (KEY=VALUE)."""
        args = ["train", "--set", "data.name=mirflickr25k", "--set", f"data.root={self.data()}"]
        if split is not None:
            args += ["--set", f"data.split={split}"]
        for s in TINY_RUN + list(sets):
            args += ["--set", s]
        return args + ["--out", str(out), *extra]

    # -------------------------------------------------------------------------------------------- shared things

    def data(self) -> Path:
        """A small copy of the real data: images with ids <= `ids`, their tags, the annotations restricted to them."""
        if self._data is None:
            t0 = time.perf_counter()
            self._data = copy_mirflickr(self.source, self.tmp / "data" / "mirflickr", self.ids)
            self.setup_seconds += time.perf_counter() - t0
        return self._data

    def stale_data(self) -> Path:
        """A smaller copy (images 1..12) whose features are extracted once, for the cases that then change an image."""
        if self._stale is None:
            t0 = time.perf_counter()
            self._stale = copy_mirflickr(self.source, self.tmp / "data" / "stale", STALE_IDS)
            self.setup_seconds += time.perf_counter() - t0
            self.setup("features", "extract", "--dataset", "mirflickr25k", "--root", self._stale)  # the first extraction
            key = load_dataset("mirflickr25k", self._stale).fingerprint()
            features = self.tmp / "cache" / "features"
            made = next(d for d in features.iterdir() if key in (d / "manifest.json").read_text())
            self._stale_cache = self.tmp / "pristine" / "features"
            shutil.copytree(made, self._stale_cache / made.name)  # as extracted, before any case spoils it
        return self._stale

    def pristine_stale(self, name: str) -> tuple[Path, Path]:
        """A fresh copy of the stale set (the original images, their mtimes kept) and a copy of its features cache
        as first extracted: (dataset root, --cache-root). For cases that damage the cache, not the images."""
        self.stale_data()
        t0 = time.perf_counter()
        root = copy_mirflickr(self.source, self.tmp / "data" / name, STALE_IDS)
        cache = self.tmp / "caches" / name
        shutil.copytree(self._stale_cache, cache)
        self.setup_seconds += time.perf_counter() - t0
        return root, cache

    @contextlib.contextmanager
    def tiny_disk(self, name: str, size: str) -> Iterator[Path | None]:
        """A tmpfs of `size` (e.g. "96k") mounted at $TMP/<name> for the block, or None where mounting is not
        allowed (it needs root): a real full disk, not a simulated one."""
        mnt = self.tmp / name
        mnt.mkdir(parents=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            yield None
            return
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

    def split(self) -> Path:
        """A valid seeded split of the small copy (made with the Python API), the base of the edited ones."""
        if self._split is None:
            t0 = time.perf_counter()
            ds = load_dataset("mirflickr25k", self.data())
            self._split = save_split(make_split(ds, "random", query=0.2, val=0.1, seed=0), self.tmp / "splits" / "good.json")
            self.setup_seconds += time.perf_counter() - t0
        return self._split

    def edited_split(self, name: str, edit: Callable[[dict], None]) -> Path:
        obj = json.loads(self.split().read_text())
        edit(obj)
        path = self.tmp / "splits" / f"{name}.json"
        path.write_text(json.dumps(obj, indent=1))
        return path

    def run_split(self) -> Path:
        """The split file the shared run's config names (a copy of the valid split, so it may be rewritten)."""
        path = self.tmp / "splits" / "run.json"
        if not path.is_file():
            shutil.copyfile(self.split(), path)
        return path

    def run_args(self, out: Path, extra: tuple = ()) -> list[str]:
        """The `dcmfg train` arguments of the shared run, into `out`."""
        return self.train(out=out, split=self.run_split(), extra=extra)

    def run(self) -> Path:
        """One finished tiny run (features extracted on the way): the checkpoint the checkpoint cases copy."""
        if self._run is None:
            self._run = self.tmp / "runs" / "shared"
            self.setup(*self.run_args(self._run))
        return self._run

    def run_copy(self, name: str) -> Path:
        dest = self.tmp / "runs" / name
        shutil.copytree(self.run(), dest)
        return dest


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def copy_mirflickr(source: Path, dest: Path, ids: int) -> Path:
    """Copy the raw MIRFlickr-25K layout under `source` for image ids 1..`ids` into `dest` (same layout)."""
    source, dest = Path(source), Path(dest)
    images, annotations = find_raw(source, beside=True)
    if images is None or annotations is None:
        raise FileNotFoundError(f"{source}: no MIRFlickr-25K raw layout (mirflickr/ + mirflickr25k_annotations_v080/)")
    img_out, ann_out = dest / "mirflickr", dest / "mirflickr25k_annotations_v080"
    (img_out / "meta" / "tags").mkdir(parents=True)
    (img_out / "doc").mkdir()
    ann_out.mkdir()
    shutil.copy2(images / "doc" / "common_tags.txt", img_out / "doc" / "common_tags.txt")
    for i in range(1, ids + 1):
        for src, dst in ((images / f"im{i}.jpg", img_out / f"im{i}.jpg"),
                         (images / "meta" / "tags" / f"tags{i}.txt", img_out / "meta" / "tags" / f"tags{i}.txt")):
            if src.is_file():
                shutil.copy2(src, dst)
    for c in CONCEPTS:
        kept = [line for line in (annotations / f"{c}.txt").read_text().split() if int(line) <= ids]
        (ann_out / f"{c}.txt").write_text("".join(f"{x}\n" for x in kept))
    return dest


@dataclass
class Case:
    name: str
    what: str  # the input, in words
    run: Callable[[Workspace], Outcome]
    needs: tuple = field(default=())


# ------------------------------------------------------------------------------------------------ table


def find_source() -> Path:
    """A raw MIRFlickr-25K folder: the one under DCMFG_DATA, else the shared mini subset beside the repository."""
    folder = data_dir()
    for name, root in find_datasets(folder) if folder is not None else []:
        if name == "mirflickr25k" and detect_layout(root) == "raw":  # the .mat variants hold no image files
            return root
    mini = Path(__file__).resolve().parents[3] / "shared" / "data" / "mirflickr-mini"
    if (mini / "mirflickr").is_dir():
        return mini
    raise DcmfgError("badinput: no MIRFlickr-25K raw folder under DCMFG_DATA; pass source=PATH")


def sanitise(text: str, paths: dict[str, str]) -> str:
    for path, name in paths.items():
        text = text.replace(path, name)
    return text


def last_line(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_table(registry: dict[str, Case], cases=None, source=None, ids: int = 60, timeout: float = TIMEOUT,
              keep: Path | None = None) -> pd.DataFrame:
    """Run the cases of `registry` (all, or the names in `cases`) and return their table (a pandas DataFrame).

    source: a raw MIRFlickr-25K folder (default: `find_source()`); ids: the copy keeps images 1..ids; keep: a folder
    to work in and leave behind (default: a temporary folder, removed at the end). The DataFrame's attrs hold the
    set-up seconds (the shared copy, extraction and run) and the total.
    """
    names = list(registry) if cases is None else list(cases)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise KeyError(f"unknown case(s) {', '.join(unknown)}; available: {', '.join(registry)}")
    source = Path(source) if source is not None else find_source()
    t_all = time.perf_counter()
    tmp = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix="dcmfg-badinput-"))
    tmp.mkdir(parents=True, exist_ok=True)
    ws = Workspace(tmp, source, ids, timeout)
    paths = {str(tmp.resolve()): "$TMP", str(tmp): "$TMP", str(source.resolve()): "$DATA", str(source): "$DATA",
             sys.executable: "python", str(Path.home()): "~", f" on {socket.gethostname()}": " on $HOST"}
    rows = []
    try:
        for name in names:
            case = registry[name]
            o = case.run(ws)
            rc = o.returncode if o.returncode >= 0 else 128 - o.returncode  # as a shell shows a signal's death
            shows = o.shows if o.shows is not None else (last_line(o.stderr) if o.returncode else last_line(o.stdout))
            command = "dcmfg " + " ".join(shorten(o.argv[3:]))
            rows.append({
                "case": name,
                "input": case.what,
                "command": sanitise(command, paths),
                "exit code": rc,
                "stderr lines": len([line for line in o.stderr.splitlines() if line.strip()]),
                "user sees": sanitise(shows, paths),
                "seconds": round(o.seconds, 1),
                "note": sanitise(o.note, paths),
            })
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["setup_seconds"] = round(ws.setup_seconds, 1)
    table.attrs["total_seconds"] = round(time.perf_counter() - t_all, 1)
    return table


def shorten(args: list[str]) -> list[str]:
    """The tiny-run settings every train command shares, folded into one word."""
    out, skip = [], set()
    tiny = {"data.name=mirflickr25k", *TINY_RUN}
    for i, a in enumerate(args):
        if i in skip:
            continue
        if a == "--set" and i + 1 < len(args) and (args[i + 1] in tiny or args[i + 1].startswith("data.root=")):
            skip.add(i + 1)
            if "[tiny run]" not in out:
                out.append("[tiny run]")
            continue
        out.append(a)
    return out
