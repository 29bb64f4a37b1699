"""The bad-input cases: each one a corrupted copy of the real data or a bad argument, run through the `dcmfg`
command by the harness (`dcmfg.study.badharness`), one row of the book's table each (`dcmfg.study.badinput`).

A case is a function of the workspace returning the command's `Outcome`, with a note on what it checks besides the
line the user reads (temporary files left, a run replaced, a file written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from dcmfg.data import load_dataset
from dcmfg.fileio import file_sha256

from .badharness import STALE_IDS, Case, Outcome, Workspace, copy_mirflickr, last_line


def _interrupt(proc: subprocess.Popen) -> bool:
    """Ctrl-C to `proc`'s process group if it still runs, then reap it (killed after 120 s); whether it was running."""
    running = proc.poll() is None
    if running:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return running


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
        if not out.exists():
            o.note = "nothing written"
        else:
            o.note = f"split written ({sizes.group(0)})" if sizes else "split written"
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
    if not changed:
        o.note = "finished run untouched"
    elif "report.json" in changed:
        o.note = f"finished run replaced ({len(changed)} files rewritten, report.json among them)"
    else:
        o.note = f"{len(changed)} files rewritten"
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
        o.shows = " / ".join(x for x in (last_line(o.stdout), last_line(o.stderr)) if x)  # the result, and a warning
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
        sent = _interrupt(proc)
    seconds = time.perf_counter() - t0
    temp = sorted(p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")) if out.is_dir() else []
    mb = sum(f.stat().st_size for p in temp for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()) / 1e6
    left = "no temporary files left" if not temp else f"left {', '.join(p.name for p in temp)} ({mb:.1f} MB)"
    state = out / "last" / "state.json"
    resumable = (f"last/ holds epoch {json.loads(state.read_text())['loop']['epoch']}" if state.is_file()
                 else "no last/ checkpoint")
    note = f"{'SIGINT after the first epoch' if sent else 'finished before the signal'}; {left}; {resumable}"
    return Outcome(argv, proc.returncode, log_out.read_text(), log_err.read_text(), seconds, note)


def _stale(kind: str):
    def run(ws: Workspace) -> Outcome:
        root = ws.stale_data()
        images = root / "mirflickr"
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


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name) if folder.is_dir() else []


def _without_bars(o: Outcome) -> Outcome:
    """Drop tqdm's progress bar from stderr (`features extract` always draws one), so that the stderr column counts
    what the command says."""
    o.stderr = "\n".join(line for line in o.stderr.splitlines() if not _BAR.match(line))
    return o


_BAR = re.compile(r"^features \S+: +\d+%\|")


def _not_run(ws: Workspace, args: tuple, why: str) -> Outcome:
    return Outcome(ws.command(*args), 0, "", "", 0.0, note=why, shows=f"(not run here: {why})")


def _chunk_damaged(ws: Workspace) -> Outcome:
    """A feature chunk cut in half on disk, then `features extract` again: the chunk is rebuilt, and said."""
    root, cache = ws.pristine_stale("chunk-damaged")
    chunk = next(cache.glob("*/text-00000.safetensors"))
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    o = _without_bars(ws.dcmfg("features", "extract", "--dataset", "mirflickr25k", "--root", root, "--cache-root", cache))
    if o.returncode == 0:
        o.shows = last_line(o.stderr) or last_line(o.stdout)
    rebuilt = "the same bytes as before" if chunk.read_bytes() == data else "other bytes than before"
    o.note = f"{chunk.name} cut to {len(data) // 2} of {len(data)} bytes; extracted again: {rebuilt}"
    return o


def _tags_not_utf8(ws: Workspace) -> Outcome:
    """A tag file with a Latin-1 byte (a tag typed on another system), then `data info`."""
    root = copy_mirflickr(ws.source, ws.tmp / "data" / "latin1-tags", STALE_IDS)
    path = root / "mirflickr" / "meta" / "tags" / "tags2.txt"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1] + [b"caf\xe9\n"] + lines[1:]))  # 'cafe' with e-acute in Latin-1
    return ws.dcmfg("data", "info", root, note=f"{path.name}: line 2 is 'caf\\xe9' (Latin-1), the other lines UTF-8")


def _features_disk_full(ws: Workspace) -> Outcome:
    """`features extract` into a cache on a 96 kB tmpfs: room for the first chunk of 4 images, not the second."""
    root, _ = ws.pristine_stale("disk-full-features")
    with ws.tiny_disk("disk-features", "96k") as disk:
        args = ("features", "extract", "--dataset", "mirflickr25k", "--root", root, "--cache-root",
                ws.tmp / "disk-features" / "features", "--chunk-size", "4")
        if disk is None:
            return _not_run(ws, args, "mounting a tmpfs needs root")
        o = _without_bars(ws.dcmfg(*args))
        folder = next((disk / "features").iterdir(), None)
        listed = folder / "manifest.json" if folder is not None else None
        chunks = json.loads(listed.read_text())["chunks"] if listed is not None and listed.is_file() else {}
        kept = [name for name, e in chunks.items() if file_sha256(folder / name) == e["sha256"]]
        temp = _temp_files(disk)
    kept_note = f"kept {', '.join(kept)} (in the manifest, bytes as recorded)" if kept else "no chunk kept"
    o.note = f"{kept_note}; {'no temporary file left' if not temp else 'left ' + ', '.join(temp)}"
    return o


def _two_writers(ws: Workspace) -> Outcome:
    """A second `dcmfg train` into the --out of a training that is running (a user who launches twice)."""
    ws.run()  # features extracted already: both commands go straight to training
    out = ws.tmp / "runs" / "two-writers"
    args = ws.train("train.epochs=500", "train.patience=500", out=out)
    log_out, log_err = ws.tmp / "two-writers.out", ws.tmp / "two-writers.err"
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        first = subprocess.Popen(ws.command(*args), cwd=ws.tmp, env=ws.env, stdout=fo, stderr=fe,
                                 start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
        t0 = time.perf_counter()
        metrics = out / "metrics.jsonl"
        while first.poll() is None and time.perf_counter() - t0 < ws.timeout:
            if metrics.is_file() and metrics.read_text().strip():
                break
            time.sleep(0.05)
        o = ws.dcmfg(*args, timeout=120)  # the second: the same command, while the first trains
        still = _interrupt(first)
    named = f"names the first run's pid ({first.pid})" if f"pid {first.pid}" in o.stderr else "names no pid"
    o.note = (f"{named}; the first run {'went on training' if still else 'had ended'} and stopped at SIGINT "
              f"with exit code {first.returncode}")
    return o


def _checkpoint_disk_full(ws: Workspace) -> Outcome:
    """`dcmfg train` whose run folder is on a 2 MB tmpfs: the disk fills while a checkpoint is written."""
    ws.run()  # the features come from the cache (not on the tmpfs): the disk fills while the run writes
    with ws.tiny_disk("disk-run", "2m") as disk:
        out = ws.tmp / "disk-run" / "run"
        args = ws.run_args(out)
        if disk is None:
            return _not_run(ws, tuple(args), "mounting a tmpfs needs root")
        o = ws.dcmfg(*args)
        temp = _temp_files(disk)
        left = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    o.note = (f"run folder holds {', '.join(left) or 'nothing'}; "
              f"{'no temporary file left' if not temp else 'left ' + ', '.join(temp)}")
    return o


CASES: dict[str, Case] = {c.name: c for c in [
    Case("image-replaced", "an image replaced by another photo after extraction; features extract again",
         _stale("replaced")),
    Case("image-truncated", "an image truncated after extraction; features extract --set features.on_corrupt=fail",
         _stale("truncated")),
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
    Case("chunk-damaged", "a feature chunk of the cache cut in half; features extract again", _chunk_damaged),
    Case("tags-not-utf8", "a tag file with a Latin-1 byte; data info", _tags_not_utf8),
    Case("disk-full-features", "features extract into a cache on a 96 kB tmpfs (full after one chunk)",
         _features_disk_full),
    Case("two-writers", "a second train into the --out of a training still running", _two_writers),
    Case("disk-full-checkpoint", "train into a run folder on a 2 MB tmpfs (full while a checkpoint is written)",
         _checkpoint_disk_full),
]}
