"""Notebooks as experiments a reader re-runs alone: parameters checked before any work, one source of settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import nbformat
import pytest

from dcmfg import study

REPO = Path(__file__).resolve().parents[1]
PAPERMILL = str(Path(sys.executable).with_name("papermill"))


def _namespace(**injected) -> tuple[dict, set]:
    """What a kernel holds after the hidden first cell, the parameters cell and papermill's injected cell."""
    ns: dict = {"study": study, "Optional": Optional}
    before = set(ns)
    exec('seeds: list = [0, 1]\nquery: float = 0.2\ntrain: Optional[float] = None\nname: str = "x"\n', ns)
    ns.update(injected)
    return ns, before


def test_parameters_are_checked_against_the_parameters_cell():
    ns, before = _namespace(seeds="[3, 4]", query=200)  # papermill -p passes "[3, 4]" as a string
    assert study.check_parameters(ns, before) == {"seeds": [3, 4], "query": 200, "train": None, "name": "x"}
    assert ns["seeds"] == [3, 4]  # written back for the cells below
    ns, before = _namespace(seedz=[1])
    with pytest.raises(study.ParameterError, match=r"unknown parameter 'seedz'; this notebook's parameters are: seeds, query, train, name"):
        study.check_parameters(ns, before)
    ns, before = _namespace(seeds="zero")
    with pytest.raises(study.ParameterError, match=r"parameter 'seeds' must be list, got 'zero' \(e.g. -p seeds '\[0, 1\]'\)"):
        study.check_parameters(ns, before)
    ns, before = _namespace(train="half")
    with pytest.raises(study.ParameterError, match=r"parameter 'train' must be Optional\[float\], got 'half'"):
        study.check_parameters(ns, before)
    assert study.ParameterError("x")._render_traceback_() == ["ParameterError: x"]  # one line in the notebook


def test_every_notebook_declares_typed_parameters_and_starts_with_the_check():
    for nb in study.notebook_names():
        cells = nbformat.read(REPO / "notebooks" / f"{nb}.ipynb", as_version=4).cells
        params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, nb
        lines = [x for x in params[0].source.splitlines() if x.strip() and not x.lstrip().startswith("#")]
        assert all(":" in x.split("=", 1)[0] for x in lines), f"{nb}: every parameter needs a type annotation"
        # papermill must parse every line (an unparsed one would never receive the study's value)
        import papermill as pm

        names = [x.split(":", 1)[0].strip() for x in lines]
        assert list(pm.inspect_notebook(str(REPO / "notebooks" / f"{nb}.ipynb"))) == names, nb
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        assert "study.start(globals(), _before)" in code, nb
        assert "work_dir" not in code and "data.json" not in code, f"{nb} reads another notebook's files"


def test_a_notebook_run_alone_with_its_defaults_is_the_published_chapter():
    # the defaults of every parameters cell are the full study's values, so `papermill NB out.ipynb` repeats the book
    import papermill as pm

    full = study.load_params(study.resolve_params_path("full"))
    for nb in study.notebook_names():
        declared = pm.inspect_notebook(str(REPO / "notebooks" / f"{nb}.ipynb"))
        for name, value in study.notebook_parameters(full, nb, declared).items():
            assert eval(declared[name]["default"]) == value, f"{nb}: {name} defaults to {declared[name]['default']}, the full study uses {value!r}"


def test_the_study_defaults_are_the_full_study_and_the_training_config():
    # a Study made without a value (a worker, a test, a notebook that does not declare it) has the book's budget
    from dcmfg.config import TrainConfig

    full = study.load_params(study.resolve_params_path("full"))["common"]
    defaults = study.Study()
    shared = [name for name in full if name in study.Study.__dataclass_fields__]
    assert {"epochs", "patience", "seeds", "synthetic_n"} <= set(shared)
    assert {name: getattr(defaults, name) for name in shared} == {name: full[name] for name in shared}
    assert (defaults.epochs, defaults.patience) == (TrainConfig().epochs, TrainConfig().patience)


@pytest.mark.slow
def test_an_unknown_parameter_fails_before_any_work(tmp_path):
    done = subprocess.run([PAPERMILL, str(REPO / "notebooks" / "03-training.ipynb"), str(tmp_path / "out.ipynb"),
                           "-p", "seedz", "[0]"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DCMFG_CACHE": str(tmp_path / "cache")})
    assert done.returncode != 0
    assert "ParameterError: unknown parameter 'seedz'; this notebook's parameters are: dataset," in done.stderr
    assert not (tmp_path / "cache" / "runs").exists()  # nothing was trained


@pytest.mark.slow
def test_a_feature_setting_changes_the_features_of_every_chapter(tmp_path):
    """settings={"features.regions": r} reaches the features chapter and the training runs alike, for two r."""
    base = {"dataset": "synthetic", "synthetic_n": 48, "seeds": [0], "epochs": 1, "patience": 1}
    for regions in (2, 3):
        values = {**base, "settings": {"features.regions": regions, "train.batch_size": 16, "graph.k": 4}}
        for nb, extra in (("02-features", {}), ("03-training", {"models": ["dcmfg"]})):
            out = tmp_path / f"{nb}-{regions}.ipynb"
            done = subprocess.run([PAPERMILL, str(REPO / "notebooks" / f"{nb}.ipynb"), str(out), "-y",
                                   json.dumps({**values, **extra})], capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
        features = (tmp_path / f"02-features-{regions}.ipynb").read_text()
        assert f"(48, {regions * regions}, 384)" in features  # the region tokens the features chapter shows
        assert f"{regions}x{regions} regions" in features
        s = study.Study.from_parameters(values)
        run = s.run("dcmfg", 0)  # read back: 03-training trained it with the same settings
        assert run["reused"] and run["config"]["features"]["regions"] == regions


@pytest.mark.slow
def test_runs_trained_side_by_side_equal_runs_trained_one_at_a_time(tmp_path, monkeypatch):
    """Study.runs trains what is missing in worker processes; every run has one thread, so the numbers are those of
    the same runs trained one after the other in this process."""
    params = {"dataset": "synthetic", "synthetic_n": 48, "seeds": [0, 1], "epochs": 2, "patience": 2,
              "settings": {"train.batch_size": 16, "graph.k": 4, "model.dim": 64, "model.hidden": 64}}
    shared = Path(os.environ["DCMFG_CACHE"])
    results = {}
    for workers in ("2", "1"):
        cache = tmp_path / f"cache-{workers}"
        cache.mkdir()
        for name in ("weights", "features"):
            (shared / name).mkdir(exist_ok=True)
            (cache / name).symlink_to(shared / name, target_is_directory=True)
        monkeypatch.setenv("DCMFG_CACHE", str(cache))
        monkeypatch.setenv("DCMFG_WORKERS", workers)
        reports = study.Study.from_parameters(params).runs(["dcmfg", "linear"])
        # with two workers the pool trained every run and this process read them back; with one, it trained them;
        # either way none had finished before the call
        assert [r["reused"] for r in reports] == [False] * 4
        results[workers] = [(r["model"], r["seed"], r["map_i2t"], r["map_t2i"], r["best_epoch"]) for r in reports]
    assert results["2"] == results["1"] and len(results["1"]) == 4


@pytest.mark.slow
def test_a_study_run_cut_off_resumes_from_its_checkpoint_with_the_same_numbers(tmp_path, monkeypatch):
    """A study killed mid-run (the machine went away) and started again: the run resumes from its checkpoint, the
    runner's journal says so, and the numbers are those of a run never interrupted."""
    import signal
    import time

    params = {"dataset": "synthetic", "synthetic_n": 48, "seeds": [0], "epochs": 8, "patience": 8,
              "settings": {"train.batch_size": 16, "graph.k": 4, "model.dim": 64, "model.hidden": 64,
                           "train.val_every": 1}}
    shared = Path(os.environ["DCMFG_CACHE"])
    caches = {}
    for name in ("ref", "cut"):
        cache = caches[name] = tmp_path / f"cache-{name}"
        cache.mkdir()
        for part in ("weights", "features"):
            (shared / part).mkdir(exist_ok=True)
            (cache / part).symlink_to(shared / part, target_is_directory=True)
    monkeypatch.setenv("DCMFG_CACHE", str(caches["ref"]))
    ref = study.Study.from_parameters(params).run("dcmfg", 0)

    monkeypatch.setenv("DCMFG_CACHE", str(caches["cut"]))
    s = study.Study.from_parameters(params)
    s.bundle(s.config("dcmfg", 0))  # features ready: the child below starts training at once
    out = s.run_dir("dcmfg", 0)[1]
    code = (f"from dcmfg import study; study.Study.from_parameters({params!r}).run('dcmfg', 0)")
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "DCMFG_CACHE": str(caches["cut"])})
    deadline = time.time() + 300
    while not (out / "last" / "state.json").is_file() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    point = json.loads((out / "last" / "state.json").read_text())["loop"]
    epoch = point["epoch"]
    assert not (out / "report.json").exists() and 0 < epoch < 8 and point["seconds"] > 0 and point["cpu_seconds"] > 0

    journal = tmp_path / "journal.jsonl"
    monkeypatch.setenv("DCMFG_STUDY_JOURNAL", str(journal))
    again = s.run("dcmfg", 0)
    lines = [json.loads(x) for x in journal.read_text().splitlines()]
    assert lines[0]["status"] == "resumed" and lines[0]["from_epoch"] == epoch
    assert (again["map_i2t"], again["map_t2i"], again["best_epoch"]) == (ref["map_i2t"], ref["map_t2i"], ref["best_epoch"])
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in ref["history"]]
    # the time it spent before the kill is counted: the resumed run's clock starts from its resume point
    assert again["seconds"] > point["seconds"] and again["train_seconds"] > point["seconds"]
    assert again["cpu_seconds"] > point["cpu_seconds"]
