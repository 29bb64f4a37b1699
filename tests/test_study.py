"""The study runner: parameter sets, the offline-HTML check, and the end-to-end quick study rendered in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from dcmfg import study
from dcmfg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ parameter sets
def test_named_sets_resolve_to_config_files():
    assert study.resolve_params_path("quick") == REPO / "configs" / "study-quick.yaml"
    assert study.resolve_params_path(None) == REPO / "configs" / "study-full.yaml"
    for name in ("quick", "full", "mirflickr12k", "mirflickr25k", "nuswide"):
        p = study.load_params(study.resolve_params_path(name))
        assert p["name"] == name
        # every per-notebook section names a real notebook and only parameters that notebook declares
        import papermill as pm

        for nb in study.notebook_names():
            declared = pm.inspect_notebook(str(REPO / "notebooks" / f"{nb}.ipynb"))
            study.notebook_parameters(p, nb, declared)


def test_an_edition_runs_its_chapters_and_its_book_lists_only_them(tmp_path):
    import yaml

    p = study.load_params(study.resolve_params_path("mirflickr12k"))
    assert p["chapters"][:3] == ["01-data", "02-features", "03-training"] and "05b-learning-curve" in p["chapters"]
    assert "06-ablations" not in p["chapters"] and p["book"]["root"] == "intro-mirflickr12k"
    toc = yaml.safe_load(study.book_toc(REPO / "book", p, tmp_path / "toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert files == [f"chapters/{c}" for c in p["chapters"]]  # in the book's order; no API page without chapter 12
    assert toc["root"] == "intro-mirflickr12k" and (REPO / "book" / "intro-mirflickr12k.md").is_file()
    full = study.load_params(study.resolve_params_path("full"))
    files = [c["file"] for part in yaml.safe_load(study.book_toc(REPO / "book", full, tmp_path / "full.yml").read_text())["parts"]
             for c in part["chapters"]]
    assert "api" in files and "chapters/05b-learning-curve" not in files and "chapters/05-graph" in files
    # every chapter of the book's template is a notebook of the study
    template = yaml.safe_load((REPO / "book" / "_toc.yml").read_text())
    named = {c["file"].removeprefix("chapters/") for part in template["parts"] for c in part["chapters"]
             if c["file"].startswith("chapters/")}
    assert named == set(study.notebook_names())


def test_the_runner_says_what_each_chapter_trained_resumed_and_reused():
    from dcmfg.study.book import one_line_per_run, runs_summary

    lines = [{"label": "DCMFG", "seed": 0, "status": "reused"}, {"label": "DCMFG", "seed": 1, "status": "reused"},
             {"label": "layers=0", "seed": 0, "status": "trained"},
             {"label": "linear", "seed": 2, "status": "resumed", "from_epoch": 12}]
    assert runs_summary(lines) == ("4 runs: trained 1 [layers=0 seed 0], resumed 1 from their checkpoints (linear seed 2 "
                                   "after epoch 12), reused 2 [DCMFG seeds 0,1]")
    assert runs_summary([]) == "no training runs"
    # trained in one pool, then read back (train_all, then runs), or read twice: each run counted once, as trained
    journal = [{"label": "DCMFG", "seed": 0, "run": "a", "status": "reused"},
               {"label": "DCMFG", "seed": 0, "run": "a", "status": "trained"},
               {"label": "DCMFG", "seed": 1, "run": "b", "status": "reused"},
               {"label": "DCMFG", "seed": 1, "run": "b", "status": "reused"}]
    assert runs_summary(one_line_per_run(journal)) == "2 runs: trained 1 [DCMFG seed 0], reused 1 [DCMFG seed 1]"


def test_a_run_journal_line_per_run_trained_resumed_or_reused(tmp_path, monkeypatch):
    from dcmfg.study.study import _journal, _resume_point

    journal = tmp_path / "journal.jsonl"
    monkeypatch.setenv("DCMFG_STUDY_JOURNAL", str(journal))
    run = tmp_path / "dcmfg-seed0-abc"
    (run / "last").mkdir(parents=True)
    assert _resume_point(run) == {}  # no state.json: nothing to resume
    (run / "last" / "state.json").write_text(json.dumps({"loop": {"epoch": 8, "seconds": 31.5}}))
    assert _resume_point(run) == {"epoch": 8, "seconds": 31.5}
    for damaged in ("{damaged", json.dumps({"loop": {"epoch": "eight"}}), json.dumps({"loop": [8]})):
        (run / "last" / "state.json").write_text(damaged)
        assert _resume_point(run) == {}, damaged
    _journal("DCMFG", 0, run, "resumed", from_epoch=8)
    _journal("DCMFG", 1, run, "reused")
    rows = [json.loads(x) for x in journal.read_text().splitlines()]
    assert rows == [{"label": "DCMFG", "seed": 0, "run": run.name, "status": "resumed", "from_epoch": 8},
                    {"label": "DCMFG", "seed": 1, "run": run.name, "status": "reused"}]


def test_a_chapter_is_charged_what_its_runs_cost_when_trained(tmp_path, monkeypatch):
    from dcmfg.study.book import runs_cpu_seconds

    monkeypatch.setenv("DCMFG_CACHE", str(tmp_path))
    for name, record in {"a": {"cpu_seconds": 12.5, "seconds": 7.0}, "b": {"cpu_seconds": 30.0}}.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "study-run.json").write_text(json.dumps(record))
    (tmp_path / "runs" / "damaged").mkdir()
    (tmp_path / "runs" / "damaged" / "study-run.json").write_text("{")
    assert runs_cpu_seconds(["a", "b"]) == 42.5
    assert runs_cpu_seconds(["a", "damaged", "missing"]) == 12.5  # a run without its record adds nothing
    assert runs_cpu_seconds([]) == 0.0

def test_unknown_set_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no study parameter set 'nope'.*known sets: .*quick"):
        study.resolve_params_path("nope")
    with pytest.raises(ConfigError, match="not found"):
        study.resolve_params_path(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    for text, message in [("common: {}\nnotebooks:\n  99-nothing: {x: 1}\n", r"bad.yaml: unknown notebooks \['99-nothing'\]"),
                          ("common: [1, 2]\n", "must be mappings"), ("common: {a: [\n", "not valid YAML"),
                          ("chapters: [01-data, 99-nope]\n", "chapters must list notebooks of the study"),
                          ("book: {root: no-such-page}\n", "no book/no-such-page.md")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            study.load_params(bad)


def test_per_notebook_typo_is_refused_and_common_values_are_filtered(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("common: {seed: 3, unrelated: 1}\nnotebooks:\n  01-data: {sedds: [1]}\n")
    p = study.load_params(f)
    declared = {"seed": {}, "seeds": {}}
    with pytest.raises(ConfigError, match=r"notebooks.01-data sets \['sedds'\]"):
        study.notebook_parameters(p, "01-data", declared)
    p["notebooks"]["01-data"] = {"seeds": [1]}
    assert study.notebook_parameters(p, "01-data", declared) == {"seed": 3, "seeds": [1]}


def test_cli_registers_study_run():
    from dcmfg.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["study", "run", "--params", "quick", "--out-book", "/x", "--skip-build"])
    assert args.handler == "dcmfg.study:run_command" and callable(study.run_command)
    assert args.params == "quick" and args.out_book == "/x" and args.skip_build
    assert parser.parse_args(["study", "run"]).params == "full"


# ------------------------------------------------------------------------------------------ data choice
def test_no_data_folder_falls_back_to_synthetic_with_a_banner(monkeypatch, tmp_path):
    monkeypatch.delenv("DCMFG_DATA", raising=False)
    c = study.resolve_dataset("auto", "")
    assert c.synthetic and "DCMFG_DATA is not set" in c.reason
    assert "Synthetic data" in study.banner_html(c)
    c = study.resolve_dataset("auto", str(tmp_path / "absent"))
    assert c.synthetic and "does not exist" in c.reason
    assert study.banner_html(study.DataChoice("mirflickr25k", "/d", False, "found")) == ""
    with pytest.raises(ConfigError, match="no data_root given and none found under DCMFG_DATA"):
        study.resolve_dataset("mirflickr25k", "")


def test_real_dataset_is_found_under_the_data_folder(mirflickr_root):
    c = study.resolve_dataset("auto", str(mirflickr_root.parent))
    assert not c.synthetic and c.name == "mirflickr25k"
    assert Path(os.path.expandvars(c.root)).resolve() == mirflickr_root.resolve()  # shown as $DCMFG_DATA/...



def test_one_data_folder_spelled_two_ways_is_one_run(mirflickr_root, tmp_path):
    # `make study` spells the folder <repo>/../shared/...; a script may spell it resolved or through a symlink.
    # A run found by content must be found again whichever spelling reached it.
    link = tmp_path / "data"
    link.symlink_to(mirflickr_root.resolve(), target_is_directory=True)
    dotted = mirflickr_root.resolve().parent / ".." / mirflickr_root.resolve().parent.name / mirflickr_root.name
    params = {"dataset": "mirflickr25k", "query": 146, "seeds": [0], "epochs": 2}
    folders = {study.Study.from_parameters({**params, "data_root": str(root)}).run_dir("dcmfg", 0)[1].name
               for root in (mirflickr_root.resolve(), link, dotted)}
    assert len(folders) == 1, folders

# ------------------------------------------------------------------------------------------ offline HTML
def test_offline_check_flags_external_scripts_and_styles(tmp_path):
    (tmp_path / "ok.html").write_text(
        '<script src="_static/a.js"></script><link rel="stylesheet" href="_static/b.css">'
        '<a href="https://example.org">a link is fine</a><link rel="canonical" href="https://x.org/p.html">'
    )
    assert study.check_offline_html(tmp_path) == []
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.html").write_text(
        '<script async src="https://cdn.example/mathjax.js"></script>'
        "<link href='//fonts.example/css' rel='stylesheet'>"
    )
    problems = study.check_offline_html(tmp_path)
    assert len(problems) == 2 and all(p.startswith("sub/bad.html") for p in problems)


# ------------------------------------------------------------------------------------------ end to end
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 1600) -> None:
    """Render a local page in headless Chromium (no network, fresh profile) and save a screenshot."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--hide-scrollbars", f"--window-size={width},{height}", "--virtual-time-budget=3000",
            f"--screenshot={png}", page.resolve().as_uri(),
        ]
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.is_file(), f"chromium wrote no screenshot of {page}"


def assert_not_blank(png: Path) -> None:
    im = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    colours = len(np.unique(im.reshape(-1, 3)[::7], axis=0))
    assert im.std() > 10 and colours > 50, f"{png}: looks blank (std {im.std():.1f}, {colours} colours)"


@pytest.fixture(scope="module")
def quick_study(quick_study):
    """The session's quick book (conftest.py), for the tests here that look at it in Chromium."""
    if _chromium() is None:
        pytest.skip("chromium not installed (make browser installs it)")
    return quick_study


@pytest.mark.slow
def test_quick_study_builds_an_offline_book_that_renders(quick_study):
    result, tmp_path = quick_study
    book = Path(result.book_dir)

    # every notebook ran, with its parameters recorded by papermill in its output
    for nb in study.notebook_names():
        out = nbformat.read(book / "chapters" / f"{nb}.ipynb", as_version=4)
        assert "parameters" in out.metadata["papermill"]
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in out.cells)
        for cell in out.cells:  # no library warning and no error in a published output
            for o in cell.get("outputs", []):
                assert o.get("output_type") != "error", f"{nb}: {o.get('ename')}: {o.get('evalue')}"
                assert not (o.get("output_type") == "stream" and o.get("name") == "stderr"), f"{nb}: stderr {o['text'][:300]}"

    html = Path(result.html_dir)
    assert study.check_offline_html(html) == []
    for page in html.rglob("*.html"):
        text = page.read_text()
        assert '<script src="http' not in text and '<link href="http' not in text
    pages = {nb: (html / "chapters" / f"{nb}.html").read_text() for nb in study.notebook_names()}
    # the published book names no path of the build machine (parameter cells included)
    machine = [str(Path.home()), str(REPO), str(tmp_path), os.environ.get("DCMFG_CACHE", "/nonexistent")]
    # ... nor do the executed notebooks the book offers for download (papermill records where it ran)
    downloads = {p.name: p.read_text() for p in html.rglob("*.ipynb")}
    assert downloads
    for nb, text in {**pages, **downloads}.items():
        for path in machine:
            assert path not in text, f"{nb}: shows the build machine's path {path}"
    # what each chapter's runs cost when trained (here, or in a build whose runs a later one reuses) is on record
    times = json.loads((book / "study-times.json").read_text())["chapters"]
    assert sum(c["runs_cpu_seconds"] for c in times) > 0
    assert "CPU seconds of the runs first used here" in pages["11-reproducibility"]
    for nb in ["01-data", "04-benchmark", "06-ablations", "07-interpretability", "08-scaling", "09-comparison"]:
        assert "dcmfg-figure" in pages[nb] and "data:image/png;base64," in pages[nb], f"{nb}: no figure"
    for nb in ["01-data", "03-training", "04-benchmark", "06-ablations", "08-scaling", "09-comparison", "11-reproducibility"]:
        assert "dcmfg-table" in pages[nb] and "<caption" in pages[nb], f"{nb}: no captioned table"
    assert "mAP@all" in pages["04-benchmark"] and "reported" in pages["09-comparison"] and "measured" in pages["09-comparison"]
    banner = "dcmfg-synthetic-banner"
    assert (banner in pages["04-benchmark"]) == bool(result.data["synthetic"])

    for name, page in [("intro", html / "intro.html"), ("benchmark", html / "chapters" / "04-benchmark.html")]:
        png = tmp_path / f"{name}.png"
        screenshot(page, png)
        assert_not_blank(png)


def test_a_typo_in_any_section_fails_before_any_notebook_runs(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("common: {seeds: [0]}\nnotebooks:\n  08-scaling: {repeets: 2}\n")
    with pytest.raises(ConfigError, match=r"notebooks.08-scaling sets \['repeets'\]"):
        study.run_study(str(f), out_book=tmp_path / "book", skip_build=True, log=lambda *_: None)
    assert not list((tmp_path / "book").rglob("*.ipynb"))  # nothing was executed


def test_synthetic_books_carry_a_site_wide_announcement(tmp_path):
    dest = study.book_config(REPO / "book", study.DataChoice("synthetic", "", True, "no data here"), tmp_path / "c.yml")
    import yaml

    cfg = yaml.safe_load(dest.read_text())
    assert "SYNTHETIC" in cfg["sphinx"]["config"]["html_theme_options"]["announcement"]
    assert cfg["execute"]["execute_notebooks"] == "off" and cfg["launch_buttons"]["thebe"] is False
    real = yaml.safe_load(study.book_config(REPO / "book", study.DataChoice("mirflickr25k", "/d", False, "found"),
                                             tmp_path / "r.yml").read_text())
    assert "announcement" not in real["sphinx"]["config"]["html_theme_options"]


@pytest.mark.slow
def test_each_notebook_alone_in_a_fresh_cache_gives_the_study_numbers(quick_study, tmp_path):
    """Every notebook run on its own with papermill, with the quick set's parameters, in a fresh cache of its own
    (only the converted backbone weights and the extracted features are shared: they are pure functions of the
    data and the backbone settings), finishes, and the runs and split files it makes equal the study's."""
    import papermill as pm

    result, _ = quick_study
    params = study.load_params(study.resolve_params_path("quick"))
    if not result.data["synthetic"]:
        params["common"] = {**params["common"], "dataset": result.data["name"], "data_root": result.data["root"]}
    shared = Path(os.environ["DCMFG_CACHE"])
    compared = 0
    for nb in study.notebook_names():
        cache = tmp_path / f"cache-{nb}"
        cache.mkdir()
        for name in ("weights", "features"):
            (cache / name).symlink_to(shared / name, target_is_directory=True)
        declared = pm.inspect_notebook(str(REPO / "notebooks" / f"{nb}.ipynb"))
        values = study.notebook_parameters(params, nb, declared)
        env = {**os.environ, "DCMFG_CACHE": str(cache)}
        cmd = [str(Path(sys.executable).with_name("papermill")), str(REPO / "notebooks" / f"{nb}.ipynb"),
               str(tmp_path / f"{nb}.ipynb"), "-y", json.dumps(values)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, f"{nb} alone failed:\n{done.stderr[-3000:]}"
        for report in cache.glob("runs/*/report.json"):
            mine = json.loads(report.read_text())
            theirs = json.loads((shared / "runs" / report.parent.name / "report.json").read_text())
            assert (mine["map_i2t"], mine["map_t2i"]) == (theirs["map_i2t"], theirs["map_t2i"]), f"{nb}: {report.parent.name}"
            compared += 1
        for split in cache.glob("study/splits/*/*.json"):
            assert split.read_bytes() == (shared / split.relative_to(cache)).read_bytes(), f"{nb}: {split.name}"
    assert compared > 0


@pytest.mark.slow  # a real second process trains a run (about 10 s idle, a minute on busy cores)
def test_a_second_study_waits_for_a_run_another_is_training_and_reads_it_back(tmp_path, monkeypatch, capfd):
    """Two studies on one cache (two chapters built at once) ask for the same run: the second waits on the run
    folder's lock and reads the finished run back, instead of failing on the lock or training the run twice."""
    from dcmfg.engine.checkpoint import RUN_LOCK

    monkeypatch.setenv("DCMFG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DCMFG_STUDY_JOURNAL", str(tmp_path / "journal.jsonl"))
    monkeypatch.delenv("DCMFG_DATA", raising=False)  # the synthetic set
    params = {"synthetic_n": 200, "seeds": [0], "epochs": 15, "patience": 15, "settings": {"train.val_every": 1}}
    s = study.Study.from_parameters(params)
    out = s.run_dir("linear", 0)[1]
    code = f"from dcmfg.study import study; study.Study.from_parameters({params!r}).run('linear', 0)"
    first = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ))
    deadline = time.monotonic() + 120
    while not (out / RUN_LOCK).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    got = s.run("linear", 0)
    assert first.wait(timeout=300) == 0
    assert "waiting for it" in capfd.readouterr().err  # it did wait: the first was still training
    assert got["reused"] is True and got["history"] and (out / "report.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["trained", "reused"]  # trained once, by the first
