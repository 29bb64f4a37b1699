"""One writer per run folder: a second training (or an evaluation writing into the folder) stops at once with one line
naming the folder and the holder's pid, or waits with --wait; a folder whose writer was killed is taken over. Real
processes on the synthetic set."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dcmfg.config import load_config
from dcmfg.engine.checkpoint import RUN_LOCK, RunLocked, run_lock
from dcmfg.engine.data import load_data
from dcmfg.engine.train import train

REPO = Path(__file__).resolve().parents[1]

SYN = [
    "data.name=synthetic", "data.options.n=120", "data.options.seed=0", "model.dim=64", "model.hidden=128",
    "model.token_dim=32", "model.hash_bits=16", "model.heads=2", "graph.k=4", "train.batch_size=32",
    "train.epochs=2", "train.warmup_epochs=1", "train.lr=0.003", "train.progress=false", "train.val_every=1",
]

# Holds a run folder's lock until its stdin closes (another process than the test's, as a second `dcmfg train` is).
HOLDER = """
import sys
from dcmfg.engine.checkpoint import run_lock
with run_lock(sys.argv[1]):
    print("holding", flush=True)
    sys.stdin.read()
"""


def _cfg(*extra):
    return load_config(REPO / "configs/dcmfg.yaml", SYN + list(extra))


def _train_cmd(run: Path, *settings: str, wait: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "dcmfg.cli", "train", "--config", str(REPO / "configs/dcmfg.yaml"), "--out", str(run)]
    for s in SYN + list(settings):
        cmd += ["--set", s]
    return cmd + (["--wait"] if wait else [])


def _locked_line(run: Path, pid: int) -> str:
    return (f"dcmfg: error: run folder {run} is locked by pid {pid} on {socket.gethostname()}, which is writing into "
            f"it; pass --wait to wait until it is done, or use another folder")


def _temps(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def syn_data():
    """Synthetic features (extracted once into DCMFG_CACHE, which the subprocesses share)."""
    return load_data(_cfg())


@pytest.fixture
def holder(tmp_path):
    """Start a process holding a folder's lock; returns (start(folder) -> Popen); every holder is ended after."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "holding"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait()


@pytest.mark.slow  # real trainings in subprocesses
def test_a_second_training_stops_at_once_and_a_killed_ones_folder_is_taken_over(tmp_path, syn_data):
    run = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(run, "train.epochs=1000", "train.patience=1000"), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics.jsonl"
        while first.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert (run / RUN_LOCK).read_text().split() == [str(first.pid), socket.gethostname()]

        second = subprocess.run(_train_cmd(run), cwd=REPO, capture_output=True, text=True)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [_locked_line(run, first.pid)]
        assert first.poll() is None  # the first run goes on, untouched
        # --overwrite is refused the same way: nothing of the first run is deleted
        third = subprocess.run(_train_cmd(run) + ["--overwrite"], cwd=REPO, capture_output=True, text=True)
        assert third.returncode == 2 and third.stderr.strip().splitlines() == [_locked_line(run, first.pid)]
        assert (run / "last" / "state.json").is_file()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # the killed run left its lock file, naming a process that no longer exists: the kernel released the lock
    assert (run / RUN_LOCK).read_text().split()[0] == str(first.pid)
    done = subprocess.run(_train_cmd(run, "train.epochs=1"), cwd=REPO, capture_output=True, text=True)  # resume, end
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "report.json").is_file()
    assert not (run / RUN_LOCK).exists() and not _temps(run)


@pytest.mark.slow  # real trainings in subprocesses
def test_wait_waits_for_the_holder_and_evaluate_into_the_folder_is_a_writer(tmp_path, syn_data, holder):
    run = tmp_path / "run"
    train(_cfg(), run, data=syn_data)
    report = (run / "report.json").read_bytes()
    held = holder(run)

    # an evaluation writing its report into the run folder stops; one writing elsewhere only reads, and runs
    ev = [sys.executable, "-m", "dcmfg.cli", "evaluate", "--checkpoint", str(run), "--device", "cpu"]
    refused = subprocess.run(ev, cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [_locked_line(run, held.pid)]
    assert not (run / "evaluate_query.json").exists()
    elsewhere = subprocess.run(ev + ["--out", str(tmp_path / "ev.json")], cwd=REPO, capture_output=True, text=True)
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]

    waiter = subprocess.Popen(_train_cmd(run, wait=True), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    line = waiter.stderr.readline().strip()
    assert line == (f"dcmfg: run folder {run} is locked by pid {held.pid} on {socket.gethostname()}; waiting for it "
                    f"(--wait)"), line
    assert waiter.poll() is None and (run / "report.json").read_bytes() == report  # nothing written while it waits
    held.stdin.close()
    held.wait()
    out, err = waiter.communicate()
    assert waiter.returncode == 0, err[-2000:]
    assert "query mAP@all" in out and not err.strip()
    assert not (run / RUN_LOCK).exists()


def test_train_itself_takes_the_lock_so_a_worker_pool_follows_the_same_rule(tmp_path, syn_data, holder):
    run = tmp_path / "run"
    held = holder(run)
    with pytest.raises(RunLocked) as info:
        train(_cfg(), run, data=syn_data)  # what the study's worker processes call
    assert str(info.value) == _locked_line(run, held.pid).removeprefix("dcmfg: error: ")
    assert sorted(p.name for p in run.iterdir()) == [RUN_LOCK]  # nothing written


def test_a_stale_lock_file_and_a_killed_writers_temporary_files_are_taken_over(tmp_path, syn_data):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / RUN_LOCK).write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")  # its process has ended
    (run / "last.tmp999999").mkdir()  # what a writer killed inside save_checkpoint leaves
    (run / "last.tmp999999" / "model.safetensors").write_bytes(b"partial")
    (run / ".metrics.jsonl.abc123.tmp").write_text("partial")  # ... and inside an atomic write
    res = train(_cfg(), run, data=syn_data)
    assert res.report is not None
    assert not (run / RUN_LOCK).exists() and not _temps(run)


def test_the_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path):
    run = tmp_path / "run"
    seen = []

    def other_thread():
        try:
            with run_lock(run):
                seen.append("entered")
        except RunLocked as exc:
            seen.append(str(exc))

    with run_lock(run):
        with run_lock(run):  # a study that trains and records its run under one lock
            assert (run / RUN_LOCK).read_text().split()[0] == str(os.getpid())
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert (run / RUN_LOCK).is_file()  # the inner exit did not let go
    assert seen == [f"run folder {run} is locked by pid {os.getpid()} on {socket.gethostname()}, which is writing "
                    f"into it; pass --wait to wait until it is done, or use another folder"]
    assert not (run / RUN_LOCK).exists()
    with run_lock(run):  # free again
        pass
