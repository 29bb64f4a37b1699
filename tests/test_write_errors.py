"""A full disk (or any OS error) while a run writes: one line naming the file and the OS error, exit 2, no traceback,
the last good checkpoint left as it was (the same command resumes from it to the uninterrupted run's numbers), no
temporary files left behind. A real tiny tmpfs for the checkpoints; ENOSPC injected at the OS call for the rest."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dcmfg.cli import main
from dcmfg.config import load_config
from dcmfg.data import load_dataset
from dcmfg.data.splits import make_split, save_split
from dcmfg.engine.checkpoint import RUN_LOCK, find_checkpoint
from dcmfg.engine.data import load_data
from dcmfg.engine.train import train

REPO = Path(__file__).resolve().parents[1]

SYN = [
    "data.name=synthetic", "data.options.n=120", "data.options.seed=0", "model.dim=64", "model.hidden=128",
    "model.token_dim=32", "model.hash_bits=16", "model.heads=2", "graph.k=4", "train.batch_size=32",
    "train.epochs=3", "train.patience=100", "train.warmup_epochs=1", "train.lr=0.003", "train.progress=false",
    "train.val_every=1", "train.threads=1",  # one thread in this process and in the subprocesses: the same sums
]
ENOSPC = f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"


def _cfg(*extra):
    return load_config(REPO / "configs/dcmfg.yaml", SYN + list(extra))


def _args(run: Path, *extra: str) -> list[str]:
    args = ["train", "--config", str(REPO / "configs/dcmfg.yaml"), "--out", str(run)]
    for s in SYN + list(extra):
        args += ["--set", s]
    return args


def _curve(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["loss"], r["val_map_i2t"], r["val_map_t2i"]) for r in rows]


def _leftovers(run: Path) -> list[Path]:
    """Temporary files and folders (`last.tmp<pid>/`, `.<name>.<random>.tmp`), the lock file."""
    return [p for p in run.rglob("*") if ".tmp" in p.name or p.name == RUN_LOCK]


def _pages(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must end as."""
    load_data(_cfg())  # features into DCMFG_CACHE (shared with the subprocesses)
    run = tmp_path_factory.mktemp("reference") / "run"
    train(_cfg(), run)
    return run


def _fail_os_call(monkeypatch, name: str, target: str, after: int = 0):
    """Make the OS call `os.<name>` fail with ENOSPC when it acts on a file called `target` (after `after` calls
    that succeed): a full disk at that write, whatever code path makes it."""
    real = getattr(os, name)
    calls = []

    def call(*args, **kw):
        first = args[0]
        path = os.readlink(f"/proc/self/fd/{first}") if isinstance(first, int) else os.fspath(args[-1])
        if Path(path).name == target:
            calls.append(path)
            if len(calls) > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kw)

    monkeypatch.setattr(os, name, call)
    return calls


@pytest.mark.slow  # real trainings in subprocesses
def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_last_good_one(tmp_path, reference):
    """A real 'No space left on device': the run folder on a tmpfs with room for one set of checkpoints."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    # room for epoch 1's checkpoints and files, and half a model more: epoch 2's checkpoint cannot be written
    pages = _pages(reference) + _pages(reference / "best") // 2 + 4
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4096}", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        run = mnt / "run"
        cmd = [sys.executable, "-m", "dcmfg.cli", *_args(run)]
        full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert full.returncode == 2, full.stderr[-3000:]
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert re.fullmatch(
            rf"dcmfg: error: cannot write {re.escape(str(run))}/(best|last)/[a-z_.]+: {re.escape(ENOSPC)}; "
            rf"training stopped at epoch 2\. Last good checkpoint: {re.escape(str(run))}/last \(after epoch 1\); run "
            rf"the same command again to resume once the disk has room", lines[0]), lines[0]
        assert find_checkpoint(run / "last") == run / "last"  # complete, under its own name
        assert json.loads((run / "last" / "state.json").read_text())["loop"]["epoch"] == 1
        # epoch 2's metrics line may be in (when only last/ failed): the resume point says where a resume starts
        assert _curve(run) == _curve(reference)[:len(_curve(run))] and not _leftovers(run)

        subprocess.run(["mount", "-o", f"remount,size={64 << 20}", str(mnt)], check=True)
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert _curve(run) == _curve(reference)  # resumed from the kept checkpoint: the uninterrupted run
        assert not _leftovers(run)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_failed_metrics_line_is_cut_off_again(tmp_path, reference, monkeypatch, capsys):
    run = tmp_path / "run"
    _fail_os_call(monkeypatch, "fsync", "metrics.jsonl")  # the first append (epoch 2) is written, then not synced
    assert main(_args(run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dcmfg: error: cannot write {run}/metrics.jsonl: {ENOSPC}; training stopped at epoch 2. Last good "
                   f"checkpoint: {run}/last (after epoch 1); run the same command again to resume once the disk has "
                   f"room"]
    assert _curve(run) == _curve(reference)[:1] and not _leftovers(run)
    monkeypatch.undo()
    assert main(_args(run)) == 0
    assert _curve(run) == _curve(reference)


def test_a_failed_report_keeps_the_checkpoints_and_the_same_command_writes_it(tmp_path, reference, monkeypatch,
                                                                                capsys):
    run = tmp_path / "run"
    _fail_os_call(monkeypatch, "replace", "report.json")
    assert main(_args(run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dcmfg: error: cannot write {run}/report.json: {ENOSPC}; the trained checkpoints in {run} are "
                   f"kept: run the same command again to write the report once the disk has room"]
    assert not (run / "report.json").exists() and not _leftovers(run)
    monkeypatch.undo()
    assert main(_args(run)) == 0
    assert _curve(run) == _curve(reference)
    mine, ref = (json.loads((r / "report.json").read_text()) for r in (run, reference))
    assert (mine["map_i2t"], mine["map_t2i"]) == (ref["map_i2t"], ref["map_t2i"])

    _fail_os_call(monkeypatch, "replace", "evaluate_query.json")
    assert main(["evaluate", "--checkpoint", str(run), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dcmfg: error: cannot write {run}/evaluate_query.json: {ENOSPC}"]
    assert not (run / "evaluate_query.json").exists() and not _leftovers(run)


@pytest.mark.parametrize("given", [True, False])  # data.split copied into the run, or a split drawn and saved there
def test_a_failed_split_copy_leaves_no_partial_split(tmp_path, reference, monkeypatch, capsys, given):
    run = tmp_path / "run"
    extra = []
    if given:
        split = tmp_path / "split.json"
        save_split(make_split(load_dataset("synthetic", None, n=120, seed=0), seed=0), split)
        extra = [f"data.split={split}"]
    # a given split is copied by shutil (its own write calls); the copy is then moved in by os.replace
    _fail_os_call(monkeypatch, "replace", "split.json")
    assert main(_args(run, *extra)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"dcmfg: error: cannot write {run}/split.json: {ENOSPC}"]
    assert not (run / "split.json").exists() and not _leftovers(run)
