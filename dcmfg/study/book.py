"""The runner: `dcmfg study run [--params quick|full|FILE.yaml]` executes notebooks/ with papermill into
book/chapters/ and builds the Jupyter Book from them, offline.

papermill is imported inside the functions that drive it: this module is loaded by every `from dcmfg import study`
(the first cell of each notebook), and the notebooks' kernels never run papermill.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.fileio import write_text_atomic
from dcmfg.paths import cache_dir
from dcmfg.study.page import papermill_command, tag_injected_parameters
from dcmfg.study.params import load_params, notebook_parameters, resolve_params_path
from dcmfg.study.repo import notebook_names, repo_dir
from dcmfg.study.study import DataChoice, resolve_dataset


@dataclass
class NotebookRun:
    notebook: str
    output: str
    parameters: dict
    seconds: float
    cpu_seconds: float = 0.0  # the notebook's kernel and the worker processes it started
    runs: list = field(default_factory=list)  # the training runs it asked for: dcmfg.study.Study.run's journal lines
    # CPU seconds the runs first used by this chapter cost when they were trained (in this build or an earlier one
    # whose runs it reused): summed over chapters, what the edition costs from an empty cache
    runs_cpu_seconds: float = 0.0


@dataclass
class StudyResult:
    param_set: str
    book_dir: str
    html_dir: str | None
    data: dict
    runs: list[NotebookRun] = field(default_factory=list)
    build_seconds: float = 0.0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- the notebooks
def rerun_commands(param_set: str) -> list[str]:
    """The papermill command that re-runs each notebook on its own with a parameter set's values."""
    import papermill as pm

    p = load_params(resolve_params_path(param_set))
    lines = []
    for nb in notebook_names():
        declared = pm.inspect_notebook(str(repo_dir() / "notebooks" / f"{nb}.ipynb"))
        lines.append(papermill_command(nb, notebook_parameters(p, nb, declared), out=f"out/{nb}.ipynb"))
    return lines


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (a notebook's kernel, reaped at its end, with its workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_line_per_run(lines: list[dict]) -> list[dict]:
    """A chapter's journal with each run folder once: a chapter that trains its runs in one pool and then reads them
    back (`Study.train_all`, then `Study.runs`), or reads a run twice, journals it more than once; what it did to the
    run is the first line of trained or resumed, else reused."""
    first: dict[str, dict] = {}
    for x in lines:
        key = x.get("run") or f"{x['label']}:{x['seed']}"
        if key not in first or (first[key]["status"] == "reused" and x["status"] != "reused"):
            first[key] = x
    return list(first.values())


def runs_summary(lines: list[dict]) -> str:
    """What a notebook did with its training runs, in one line: how many it trained, resumed and reused, and which
    (by label and seeds)."""
    if not lines:
        return "no training runs"
    parts = []
    for status in ("trained", "resumed", "reused"):
        chosen = [x for x in lines if x["status"] == status]
        if not chosen:
            continue
        by_label: dict[str, list] = {}
        for x in chosen:
            by_label.setdefault(x["label"], []).append(x["seed"])
        which = "; ".join(f"{label} seed{'s' if len(s) > 1 else ''} {','.join(map(str, sorted(set(s))))}"
                          for label, s in by_label.items())
        extra = ""
        if status == "resumed":
            extra = " from their checkpoints (" + ", ".join(f"{x['label']} seed {x['seed']} after epoch "
                                                           f"{x.get('from_epoch')}" for x in chosen) + ")"
        parts.append(f"{status} {len(chosen)}{extra}" + (f" [{which}]" if status != "resumed" else ""))
    return f"{len(lines)} runs: " + ", ".join(parts)


def runs_cpu_seconds(names: list[str]) -> float:
    """The CPU seconds the named run folders cost when trained, resumes included (their study-run.json)."""
    total = 0.0
    for name in names:
        try:
            total += float(json.loads((cache_dir() / "runs" / name / "study-run.json").read_text())["cpu_seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a run without its record (trained by `dcmfg train`): its time is not known
    return total


def run_notebooks(params: dict, out_dir: Path, notebooks: list[str] | None = None, log=print) -> list[NotebookRun]:
    """Execute the notebooks in order with papermill; each output lands in out_dir with its parameters recorded.
    A notebook that declares `timings` receives the wall and CPU seconds of those run before it (the appendix).
    Each notebook's training runs are logged as trained, resumed or reused (found by content in the cache)."""
    import papermill as pm

    src = repo_dir() / "notebooks"
    order = notebooks or params.get("chapters") or notebook_names()
    unknown = sorted(set(order) - set(notebook_names()))
    if unknown:
        raise ConfigError(f"unknown notebooks {unknown}; the study has {notebook_names()}")
    # Check every notebook's parameters before running any, so a typo in the last section fails in seconds.
    declared_by = {nb: pm.inspect_notebook(str(src / f"{nb}.ipynb")) for nb in order}
    for nb in order:
        notebook_parameters(params, nb, declared_by[nb])
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[NotebookRun] = []
    # The kernels inherit these: no progress bars or hub chatter in the executed notebooks.
    for key, value in {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}.items():
        os.environ.setdefault(key, value)
    timings: dict[str, dict] = {}
    seen: set[str] = set()  # run folders an earlier chapter of this build already used
    journal_dir = cache_dir() / "study" / "journal"
    journal_dir.mkdir(parents=True, exist_ok=True)
    for nb in order:
        path = src / f"{nb}.ipynb"
        declared = declared_by[nb]
        values = notebook_parameters(params, nb, declared)
        if "param_set" in declared:
            values["param_set"] = params["name"]
        if "timings" in declared:
            values["timings"] = dict(timings)
        out = out_dir / f"{nb}.ipynb"
        tmp = out_dir / f".{nb}.running.ipynb"
        log(f"[study] {nb}: running with {json.dumps(values, default=str)}")
        journal = journal_dir / f"{params['name']}-{nb}-{os.getpid()}.jsonl"
        journal.unlink(missing_ok=True)
        os.environ["DCMFG_STUDY_JOURNAL"] = str(journal)  # the kernel and its workers append a line per run
        t0, c0 = time.perf_counter(), _children_cpu()
        try:
            pm.execute_notebook(str(path), str(tmp), parameters=values, kernel_name="python3", progress_bar=False,
                                cwd=str(repo_dir()))
        except pm.PapermillExecutionError as exc:
            raise DcmfgError(
                f"{path}: cell {exc.exec_count} failed with {exc.ename}: {exc.evalue} (partial output kept in {tmp})"
            ) from None
        finally:
            os.environ.pop("DCMFG_STUDY_JOURNAL", None)
        tag_injected_parameters(tmp)  # the page header shows what papermill injected: its cell leaves the page
        os.replace(tmp, out)  # an earlier good output is replaced only by a complete one
        dt, cpu = time.perf_counter() - t0, _children_cpu() - c0
        lines = one_line_per_run([json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
                                 if journal.is_file() else [])
        journal.unlink(missing_ok=True)
        first = [x["run"] for x in lines if x.get("run") and x["run"] not in seen]
        seen.update(first)
        runs_cpu = runs_cpu_seconds(first)
        log(f"[study] {nb}: done in {dt:.1f} s (CPU {cpu:.0f} s); {runs_summary(lines)}"
            + (f"; the {len(first)} runs first used here cost {runs_cpu:.0f} CPU-s when trained" if first else ""))
        runs.append(NotebookRun(nb, str(out), values, dt, cpu, lines, runs_cpu))
        timings[nb] = {"seconds": round(dt, 1), "cpu_seconds": round(cpu, 1), "runs_cpu_seconds": round(runs_cpu, 1)}
    return runs


# --------------------------------------------------------------------------------------------- the book
def stage_book_sources(out_book: Path) -> None:
    """Copy the book's prose, config and assets into another folder (outputs and builds are not copied)."""
    src = repo_dir() / "book"
    if out_book.resolve() == src.resolve():
        return
    ignore = shutil.ignore_patterns("_build", "*.ipynb", ".ipynb_checkpoints", "__pycache__")
    shutil.copytree(src, out_book, ignore=ignore, dirs_exist_ok=True)


def book_toc(book_dir: Path, params: dict, dest: Path) -> Path:
    """The book's _toc.yml with only the chapters this parameter set runs (the API page goes with the library
    chapter), and the set's own front page when it names one (`book.root`)."""
    toc = yaml.safe_load((book_dir / "_toc.yml").read_text())
    ran = set(params.get("chapters") or notebook_names())

    def kept(entry: dict) -> bool:
        name = str(entry.get("file", ""))
        if name.startswith("chapters/"):
            return name.removeprefix("chapters/") in ran
        return name != "api" or "12-library" in ran

    parts = []
    for part in toc.get("parts", []):
        chapters = [c for c in part.get("chapters", []) if kept(c)]
        if chapters:
            parts.append({**part, "chapters": chapters})
    toc["parts"] = parts
    if params.get("book", {}).get("root"):
        toc["root"] = params["book"]["root"]
    write_text_atomic(dest, "# written by dcmfg study run from book/_toc.yml\n" + yaml.safe_dump(toc, sort_keys=False))
    return dest


def book_config(book_dir: Path, choice: DataChoice, dest: Path, title: str | None = None) -> Path:
    """The book's _config.yml plus a site-wide announcement when the data are synthetic."""
    cfg = yaml.safe_load((book_dir / "_config.yml").read_text())
    if title:
        cfg["title"] = title
    if choice.synthetic:
        opts = cfg.setdefault("sphinx", {}).setdefault("config", {}).setdefault("html_theme_options", {})
        opts["announcement"] = "Built from the SYNTHETIC fallback set, not real data: " + choice.reason + "."
    write_text_atomic(dest, yaml.safe_dump(cfg, sort_keys=False))
    return dest


def build_book(book_dir: Path, config: Path | None = None, log=print, toc: Path | None = None) -> Path:
    """`jupyter-book build` (offline, notebooks are not executed again); returns the html folder."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(book_dir), "--all"]
    if config is not None:
        cmd += ["--config", str(config)]
    if toc is not None:
        cmd += ["--toc", str(toc)]
    log("[study] " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DcmfgError(f"jupyter-book build {book_dir} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    html = book_dir / "_build" / "html"
    problems = check_offline_html(html)
    if problems:
        raise DcmfgError(f"{html}: the book loads external resources: {problems[:5]}")
    return html


_EXTERNAL = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*?\b(?:src|href)\s*=\s*["'](?:https?:)?//""", re.I)


def check_offline_html(html_dir: Path) -> list[str]:
    """Pages that pull scripts, styles, images or frames from the network (the book must work offline)."""
    problems = []
    for page in sorted(Path(html_dir).rglob("*.html")):
        text = page.read_text(errors="replace")
        for m in _EXTERNAL.finditer(text):
            tag = text[m.start() : text.find(">", m.start()) + 1]
            if re.match(r"<link\b", tag, re.I) and not re.search(r"""rel=["']?(stylesheet|preload|modulepreload|icon)""", tag, re.I):
                continue  # a plain hyperlink-like <link rel=canonical/...> loads nothing
            problems.append(f"{page.relative_to(html_dir)}: {tag[:160]}")
    return problems


# --------------------------------------------------------------------------------------------- the whole study
def run_study(params: str | os.PathLike | None = "full", out_book: str | os.PathLike | None = None,
              skip_build: bool = False, notebooks: list[str] | None = None, device: str | None = None,
              log=print) -> StudyResult:
    """Run the whole study: notebooks into <out_book>/chapters, then the book into <out_book>/_build/html."""
    t0 = time.perf_counter()
    p = load_params(resolve_params_path(params))
    book = Path(out_book) if out_book else repo_dir() / "book"
    stage_book_sources(book)
    choice = resolve_dataset(str(p["common"].get("dataset", "auto")), str(p["common"].get("data_root") or ""))
    log(f"[study] parameter set {p['name']} ({p['source']}); data: {choice.name} ({choice.reason})")
    # Every notebook gets the same resolved real dataset, so they cannot disagree about the data (the synthetic
    # fallback stays "auto": each notebook resolves it the same way and keeps the reason for its banner).
    if not choice.synthetic:
        p["common"] = {**p["common"], "dataset": choice.name, "data_root": choice.root}
    if device:
        p["common"] = {**p["common"], "device": device}
    runs = run_notebooks(p, book / "chapters", notebooks=notebooks, log=log)
    result = StudyResult(p["name"], str(book), None, asdict(choice), runs)
    if not skip_build:
        t1 = time.perf_counter()
        cfg = book_config(book, choice, cache_dir() / "study" / f"_book_config-{p['name']}.yml", p["book"].get("title"))
        toc = book_toc(book, p, cache_dir() / "study" / f"_toc-{p['name']}.yml")
        result.html_dir = str(build_book(book, cfg, log=log, toc=toc))
        result.build_seconds = time.perf_counter() - t1
    result.seconds = time.perf_counter() - t0
    times = [{"chapter": r.notebook, "seconds": round(r.seconds, 1), "cpu_seconds": round(r.cpu_seconds, 1),
              "runs_cpu_seconds": round(r.runs_cpu_seconds, 1), "runs": runs_summary(r.runs)} for r in runs]
    write_text_atomic(book / "study-times.json", json.dumps({"param_set": p["name"], "chapters": times,
                                                             "build_seconds": round(result.build_seconds, 1),
                                                             "seconds": round(result.seconds, 1)}, indent=1))
    log(f"[study] finished in {result.seconds:.0f} s" + (f"; book: {result.html_dir}/index.html" if result.html_dir else ""))
    return result


def run_command(args) -> int:
    """`dcmfg study run` (the arguments are defined in dcmfg/cli.py)."""
    run_study(args.params, out_book=args.out_book, skip_build=args.skip_build, notebooks=args.only or None,
              device=args.device)
    return 0
