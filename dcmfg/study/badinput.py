"""Bad input, tried for real: what a user sees when a file, a folder or an argument is wrong (issue 12).

Each case is a corrupted copy of a real MIRFlickr-25K folder (raw layout) or a bad argument, run through the
`dcmfg` command in a subprocess with this Python, in a temporary folder, as a user would run it. `run_cases()`
returns one row a case: the input, the command, its exit code, how many lines it wrote to stderr, the line the user
reads (the last stderr line; the last stdout line when the command succeeded), the seconds it took, and a note
with what the case checks besides (temporary files left, a run replaced, a file written). Nothing is typed:
the table is what the commands did on this machine, today.

    from dcmfg.study.badinput import run_cases
    table = run_cases()                                  # every case
    table = run_cases(["split-duplicates", "help"])       # a few (names: list(CASES))

Cost: one small copy of the data (the images with ids <= `ids`: 40 pairs of the mini subset), one feature extraction
of it and one 1-epoch training run with a small model, shared by the cases that need them, and a smaller copy for the
stale-feature cases; each case is then one command.
Features, runs and copies live in the temporary folder (the backbone weights are read from the user's cache).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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
        cache = tmp / "cache"
        cache.mkdir()
        from dcmfg.paths import cache_dir

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

    def dcmfg(self, *args: str, note: str = "") -> Outcome:
        argv = self.command(*args)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=self.timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = -9, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {self.timeout:.0f} s)"
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
        return self._stale

    def split(self) -> Path:
        """A valid seeded split of the small copy (made with the Python API), the base of the edited ones."""
        if self._split is None:
            from dcmfg.data import load_dataset
            from dcmfg.data.splits import make_split, save_split

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
    from dcmfg.data.mirflickr import CONCEPTS, find_raw

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


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    what: str  # the input, in words
    run: Callable[[Workspace], Outcome]
    needs: tuple = field(default=())


def _help(ws: Workspace) -> Outcome:
    o = ws.dcmfg("--help")
    o.shows = f"usage and {len(o.stdout.splitlines())} lines of help"
    o.note = "answers in under 2 s" if o.seconds < 2 else "over 2 s"
    return o


def _missing_folder(ws: Workspace) -> Outcome:
    return ws.dcmfg("data", "info", ws.tmp / "no-such-folder")


def _manifest_dotdot(ws: Workspace) -> Outcome:
    root = ws.tmp / "byod"
    (root / "images").mkdir(parents=True)
    photos = sorted((ws.data() / "mirflickr").glob("im*.jpg"))[:3]
    lines = []
    for p in photos[:2]:
        shutil.copy2(p, root / "images" / p.name)
        lines.append({"image": f"images/{p.name}", "text": "a photo", "labels": ["photo"]})
    shutil.copy2(photos[2], ws.tmp / "outside.jpg")  # beside the manifest's folder, not in it
    lines.append({"image": "../outside.jpg", "text": "a photo from elsewhere", "labels": ["photo"]})
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    o = ws.dcmfg("data", "info", root)
    items = re.search(r"^items +(\d+)", o.stdout, re.M)
    o.note = f"loaded {items.group(1)} items" if items else ""
    return o


def _split_size(value: str):
    def run(ws: Workspace) -> Outcome:
        out = ws.tmp / "splits" / f"query-{value}.json"
        o = ws.dcmfg("data", "split", "mirflickr25k", "--root", ws.data(), "--query", value, "--out", out)
        sizes = re.search(r"query \d+, database \d+, train \d+, val \d+", o.stdout)
        o.note = f"split written ({sizes.group(0)})" if out.exists() and sizes else ("split written" if out.exists() else "nothing written")
        return o

    return run


def _move(obj: dict, src: str, dst: str, k: int) -> None:
    """Copy item k of part `src` into part `dst`, with its id (so that only the overlap is wrong)."""
    obj["parts"][dst].append(obj["parts"][src][k])
    obj["ids"][dst].append(obj["ids"][src][k])


def _other_id(obj: dict) -> None:
    obj["ids"]["query"][0] = obj["ids"]["train"][0]  # the id of another item


SPLIT_EDITS: dict[str, tuple[str, Callable[[dict], None]]] = {
    "split-duplicates": ("split file: 3 training indices listed twice",
                         lambda o: [_move(o, "train", "train", k) for k in range(3)]),
    "split-leak": ("split file: 5 query items also in train",
                   lambda o: [_move(o, "query", "train", k) for k in range(5)]),
    "split-float": ("split file: a float index (train[0] + 0.5)",
                    lambda o: o["parts"]["train"].__setitem__(0, o["parts"]["train"][0] + 0.5)),
    "split-wrong-ids": ("split file: query[0] carries another item's id", _other_id),
    "split-parts-list": ("split file: 'parts' is a list, not a mapping",
                         lambda o: o.__setitem__("parts", list(o["parts"].values()))),
    "split-no-val": ("split file: the 'val' part removed",
                     lambda o: [o["parts"].pop("val"), o["ids"].pop("val")]),
}


def _split_case(name: str):
    def run(ws: Workspace) -> Outcome:
        path = ws.edited_split(name, SPLIT_EDITS[name][1])
        out = ws.tmp / "runs" / name
        o = ws.dcmfg(*ws.train(out=out, split=path))
        o.note = "trained and scored" if (out / "report.json").is_file() else ""
        return o

    return run


def _config_case(setting: str):
    def run(ws: Workspace) -> Outcome:
        out = ws.tmp / "runs" / f"config-{setting.replace('=', '-')}"
        o = ws.dcmfg(*ws.train(setting, out=out))
        left = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        o.note = "no run folder" if left is None else (f"run folder left: {', '.join(left)}" if left else "empty run folder left")
        return o

    return run


def _truncated(name: str):
    def run(ws: Workspace) -> Outcome:
        run_dir = ws.run_copy(f"truncated-{name.split('.')[0]}")
        f = run_dir / "best" / name
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        return ws.dcmfg("evaluate", "--checkpoint", run_dir, note=f"best/{name} cut to {len(data) // 2} of {len(data)} bytes")

    return run


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _no_resume(ws: Workspace) -> Outcome:
    run_dir = ws.run_copy("no-resume")
    before = _snapshot(run_dir)
    o = ws.dcmfg(*ws.run_args(run_dir, extra=("--no-resume",)))
    after = _snapshot(run_dir)
    changed = sorted(k for k in before if after.get(k) != before[k])
    o.note = "finished run untouched" if not changed else f"finished run replaced ({len(changed)} files rewritten, report.json among them)" if "report.json" in changed else f"{len(changed)} files rewritten"
    return o


def _split_rewritten(ws: Workspace) -> Outcome:
    """The split file a run was trained on is made again with another seed; the run is then evaluated."""
    run_dir = ws.run_copy("split-rewritten")
    path = ws.run_split()
    before = path.read_bytes()
    try:
        ws.setup("data", "split", "mirflickr25k", "--root", ws.data(), "--seed", "1", "--out", path)
        o = ws.dcmfg("evaluate", "--checkpoint", run_dir)
    finally:
        path.write_bytes(before)  # the other cases use the shared run's split as it was
    if o.returncode == 0:
        o.shows = " / ".join(x for x in (_last_line(o.stdout), _last_line(o.stderr)) if x)  # the result, and a warning
        trained = json.loads((run_dir / "report.json").read_text())
        scored = json.loads((run_dir / "evaluate_query.json").read_text())
        a = (trained["map_i2t"], trained["map_t2i"])
        b = (scored["map_i2t"], scored["map_t2i"])
        same = all(abs(x - y) < 1e-6 for x, y in zip(a, b))
        o.note = ("scored on the split it was trained on (the mAP of its report.json)" if same else
                  f"scored on another split: mAP I->T {a[0]:.3f} -> {b[0]:.3f}, T->I {a[1]:.3f} -> {b[1]:.3f}")
    return o


def _sigint_as_in_a_terminal() -> None:
    """A shell running the study in the background (`nohup ... &`) starts its children with SIGINT ignored; a
    command in a terminal's foreground has the default handler, which is what this case shows."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ctrl_c(ws: Workspace) -> Outcome:
    """SIGINT to the command's process group (what Ctrl-C in a terminal does) once its first epoch is logged."""
    ws.run()  # features extracted already: the interrupt lands in training, not in extraction
    out = ws.tmp / "runs" / "ctrl-c"
    argv = ws.command(*ws.train("train.epochs=500", "train.patience=500", out=out))
    log_out, log_err = ws.tmp / "ctrl-c.out", ws.tmp / "ctrl-c.err"
    t0 = time.perf_counter()
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        proc = subprocess.Popen(argv, cwd=ws.tmp, env=ws.env, stdout=fo, stderr=fe, start_new_session=True,
                                preexec_fn=_sigint_as_in_a_terminal)
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and time.perf_counter() - t0 < ws.timeout:
            if metrics.is_file() and metrics.read_text().strip():
                break
            time.sleep(0.05)
        sent = proc.poll() is None
        if sent:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - t0
    temp = sorted(p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")) if out.is_dir() else []
    mb = sum(f.stat().st_size for p in temp for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 1e6
    left = "no temporary files left" if not temp else f"left {', '.join(p.name for p in temp)} ({mb:.1f} MB)"
    state = out / "last" / "state.json"
    resumable = f"last/ holds epoch {json.loads(state.read_text())['loop']['epoch']}" if state.is_file() else "no last/ checkpoint"
    note = f"{'SIGINT after the first epoch' if sent else 'finished before the signal'}; {left}; {resumable}"
    return Outcome(argv, proc.returncode, log_out.read_text(), log_err.read_text(), seconds, note)


def _stale(kind: str):
    def run(ws: Workspace) -> Outcome:
        root = ws.stale_data()
        images = root / "mirflickr"
        from dcmfg.data import load_dataset

        # each case spoils its own image (the 4th item's, the 3rd's), so either runs first or alone
        target = Path(load_dataset("mirflickr25k", root).image_paths[3 if kind == "replaced" else 2])
        if kind == "replaced":
            other = next(p for p in sorted(images.glob("im*.jpg")) if p != target and p.stat().st_size != target.stat().st_size)
            shutil.copyfile(other, target)
            note = f"{target.name} replaced by the photo {other.name}"
            extra = ()
        else:
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 3])
            note = f"{target.name} cut to {len(data) // 3} of {len(data)} bytes"
            extra = ("--set", "features.on_corrupt=fail")
        o = ws.dcmfg("features", "extract", "--dataset", "mirflickr25k", "--root", root, *extra, note=note)
        if o.returncode == 0:
            o.shows = " / ".join(line for line in o.stdout.splitlines() if line.strip())
        return o

    return run


CASES: dict[str, Case] = {}
for _c in [
    Case("image-replaced", "an image replaced by another photo after extraction; features extract again", _stale("replaced")),
    Case("image-truncated", "an image truncated after extraction; features extract --set features.on_corrupt=fail", _stale("truncated")),
    *(Case(k, v[0], _split_case(k)) for k, v in SPLIT_EDITS.items()),
    Case("query-0", "data split --query 0 (the integer)", _split_size("0")),
    Case("query-1.0", "data split --query 1.0", _split_size("1.0")),
    Case("epochs-0", "train --set train.epochs=0", _config_case("train.epochs=0")),
    Case("batch-size-0", "train --set train.batch_size=0", _config_case("train.batch_size=0")),
    Case("heads-0", "train --set model.heads=0", _config_case("model.heads=0")),
    Case("lr-negative", "train --set train.lr=-1", _config_case("train.lr=-1")),
    Case("lr-nan", "train --set train.lr=nan", _config_case("train.lr=nan")),
    Case("truncated-config", "evaluate a checkpoint whose config.json is cut in half", _truncated("config.json")),
    Case("truncated-meta", "evaluate a checkpoint whose meta.json is cut in half", _truncated("meta.json")),
    Case("ctrl-c", "Ctrl-C (SIGINT) during training, after the first epoch", _ctrl_c),
    Case("split-rewritten", "the split file a run was trained on made again with another seed; evaluate the run",
         _split_rewritten),
    Case("no-resume-finished", "train --no-resume into the folder of a finished run", _no_resume),
    Case("manifest-dotdot", "a manifest line whose image is ../outside.jpg", _manifest_dotdot),
    Case("missing-folder", "data info on a dataset folder that does not exist", _missing_folder),
    Case("help", "dcmfg --help", _help),
]:
    CASES[_c.name] = _c


# ------------------------------------------------------------------------------------------------ table


def find_source() -> Path:
    """A raw MIRFlickr-25K folder: the one under DCMFG_DATA, else the shared mini subset beside the repository."""
    from dcmfg.data.discover import find_datasets
    from dcmfg.data.mirflickr import detect_layout
    from dcmfg.paths import data_dir

    folder = data_dir()
    for name, root in find_datasets(folder) if folder is not None else []:
        if name == "mirflickr25k" and detect_layout(root) == "raw":  # the .mat variants hold no image files
            return root
    mini = Path(__file__).resolve().parents[3] / "shared" / "data" / "mirflickr-mini"
    if (mini / "mirflickr").is_dir():
        return mini
    from dcmfg.errors import DcmfgError

    raise DcmfgError("badinput: no MIRFlickr-25K raw folder under DCMFG_DATA; pass source=PATH")


def _sanitise(text: str, paths: dict[str, str]) -> str:
    for path, name in paths.items():
        text = text.replace(path, name)
    return text


def _last_line(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_cases(cases=None, source=None, ids: int = 60, timeout: float = TIMEOUT, keep: Path | None = None):
    """Run the bad-input cases (all, or the names in `cases`) and return their table (a pandas DataFrame).

    source: a raw MIRFlickr-25K folder (default: `find_source()`); ids: the copy keeps images 1..ids; keep: a folder
    to work in and leave behind (default: a temporary folder, removed at the end). The DataFrame's attrs hold the
    set-up seconds (the shared copy, extraction and run) and the total.
    """
    import pandas as pd

    names = list(CASES) if cases is None else list(cases)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise KeyError(f"unknown case(s) {', '.join(unknown)}; available: {', '.join(CASES)}")
    source = Path(source) if source is not None else find_source()
    t_all = time.perf_counter()
    tmp = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix="dcmfg-badinput-"))
    tmp.mkdir(parents=True, exist_ok=True)
    ws = Workspace(tmp, source, ids, timeout)
    paths = {str(tmp.resolve()): "$TMP", str(tmp): "$TMP", str(source.resolve()): "$DATA", str(source): "$DATA",
             sys.executable: "python", str(Path.home()): "~"}
    rows = []
    try:
        for name in names:
            case = CASES[name]
            o = case.run(ws)
            rc = o.returncode if o.returncode >= 0 else 128 - o.returncode  # as a shell shows a signal's death
            shows = o.shows if o.shows is not None else (_last_line(o.stderr) if o.returncode else _last_line(o.stdout))
            command = "dcmfg " + " ".join(_shorten(o.argv[3:]))
            rows.append({
                "case": name,
                "input": case.what,
                "command": _sanitise(command, paths),
                "exit code": rc,
                "stderr lines": len([line for line in o.stderr.splitlines() if line.strip()]),
                "user sees": _sanitise(shows, paths),
                "seconds": round(o.seconds, 1),
                "note": _sanitise(o.note, paths),
            })
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["setup_seconds"] = round(ws.setup_seconds, 1)
    table.attrs["total_seconds"] = round(time.perf_counter() - t_all, 1)
    return table


def _shorten(args: list[str]) -> list[str]:
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
