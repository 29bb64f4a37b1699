"""The study: run the notebooks in order with papermill, then build the Jupyter Book from their outputs.

`dcmfg study run [--params quick|full|FILE.yaml] [--out-book DIR] [--skip-build]`. A parameter set is a YAML file
with a `common:` mapping (passed to every notebook that declares the name in its `parameters` cell) and a
`notebooks:` mapping of per-notebook overrides. Named sets resolve to `configs/study-<name>.yaml`.
Notebooks also run on their own (`papermill notebooks/01-data.ipynb out.ipynb -p dataset synthetic`, or in
JupyterLab): every path they use comes from a parameter with a default computed by the helpers below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.fileio import write_text_atomic
from dcmfg.paths import cache_dir, data_dir

# Run order: each notebook reads what the earlier ones wrote under work_dir.
NOTEBOOKS = [
    "01-data",
    "02-features",
    "03-training",
    "04-benchmark",
    "06-ablations",
    "07-interpretability",
    "08-scaling",
    "09-comparison",
    "11-reproducibility",
]


def repo_dir() -> Path:
    """The source checkout (configs/, notebooks/, book/ live here)."""
    return Path(__file__).resolve().parents[1]


def default_work_dir(param_set: str = "default") -> Path:
    """Where notebooks exchange files (features, splits, runs, tables): under the cache, never beside data."""
    return cache_dir() / "study" / param_set


# --------------------------------------------------------------------------------------------- parameters
def resolve_params_path(spec: str | os.PathLike | None) -> Path:
    """`quick` -> configs/study-quick.yaml; an existing file path stays as it is; None -> full."""
    spec = "full" if spec in (None, "") else str(spec)
    if re.fullmatch(r"[A-Za-z0-9_-]+", spec) and not spec.endswith((".yaml", ".yml")):
        path = repo_dir() / "configs" / f"study-{spec}.yaml"
        if not path.is_file():
            known = sorted(p.stem.removeprefix("study-") for p in (repo_dir() / "configs").glob("study-*.yaml"))
            raise ConfigError(f"no study parameter set {spec!r} ({path} missing); known sets: {', '.join(known)}")
        return path
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{path}: study parameter file not found")
    return path


def load_params(path: str | os.PathLike) -> dict:
    """Read and check a parameter set: {name, common: {...}, notebooks: {notebook: {...}}}."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'common' and 'notebooks', got {type(raw).__name__}")
    unknown = set(raw) - {"name", "description", "common", "notebooks"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)} (allowed: name, description, common, notebooks)")
    common = raw.get("common") or {}
    notebooks = raw.get("notebooks") or {}
    if not isinstance(common, dict) or not isinstance(notebooks, dict):
        raise ConfigError(f"{path}: 'common' and 'notebooks' must be mappings")
    bad = sorted(set(notebooks) - set(NOTEBOOKS))
    if bad:
        raise ConfigError(f"{path}: unknown notebooks {bad}; the study has {NOTEBOOKS}")
    for nb, values in notebooks.items():
        if not isinstance(values or {}, dict):
            raise ConfigError(f"{path}: notebooks.{nb} must be a mapping of parameters")
    return {
        "name": str(raw.get("name") or path.stem.removeprefix("study-")),
        "description": str(raw.get("description") or ""),
        "common": common,
        "notebooks": {k: dict(v or {}) for k, v in notebooks.items()},
        "source": str(path),
    }


def notebook_parameters(params: dict, notebook: str, declared: dict) -> dict:
    """The values papermill injects into one notebook: the common ones it declares, then its own section.

    A per-notebook key the notebook does not declare is a typo in the parameter file: refuse it.
    """
    own = params["notebooks"].get(notebook, {})
    unknown = sorted(set(own) - set(declared))
    if unknown:
        raise ConfigError(
            f"{params.get('source', 'parameters')}: notebooks.{notebook} sets {unknown}, which the notebook does not "
            f"declare (it declares {sorted(declared)})"
        )
    values = {k: v for k, v in params["common"].items() if k in declared}
    values.update(own)
    return values


# --------------------------------------------------------------------------------------------- data choice
@dataclass
class DataChoice:
    name: str  # loader name for load_dataset
    root: str  # "" for synthetic
    synthetic: bool
    reason: str  # one sentence for the book


def resolve_dataset(dataset: str = "auto", data_root: str = "") -> DataChoice:
    """Which dataset the study uses. `auto`: the first recognised dataset under DCMFG_DATA, else synthetic."""
    if dataset == "synthetic":
        return DataChoice("synthetic", "", True, "the synthetic set was requested explicitly")
    if dataset != "auto":
        if not data_root:
            raise ConfigError(f"dataset {dataset!r} needs data_root (the folder holding it)")
        return DataChoice(dataset, str(data_root), False, f"{dataset} from {data_root} was requested")
    folder = Path(data_root) if data_root else data_dir()
    if folder is None:
        return DataChoice("synthetic", "", True, "DCMFG_DATA is not set, so no real dataset was available")
    if not folder.is_dir():
        return DataChoice("synthetic", "", True, f"the data folder {folder} does not exist")
    from dcmfg.data.discover import pick_dataset

    name, root = pick_dataset(folder)
    if name == "synthetic":
        return DataChoice("synthetic", "", True, f"no dataset in a recognised layout was found under {folder}")
    return DataChoice(name, str(root), False, f"found {name} under {folder}")


def banner_html(choice: DataChoice | dict) -> str:
    """A visible warning for pages built from the synthetic set (empty for real data)."""
    c = choice if isinstance(choice, dict) else asdict(choice)
    if not c["synthetic"]:
        return ""
    return (
        '<div class="admonition warning dcmfg-synthetic-banner"><p class="admonition-title">Synthetic data</p>'
        f"<p>These results come from the procedural <b>synthetic</b> set ({c['reason']}). They exercise the "
        "pipeline only and say nothing about MIRFlickr or NUS-WIDE. Set <code>DCMFG_DATA</code> to a folder holding "
        "a real dataset and rerun <code>dcmfg study run</code>.</p></div>"
    )


# --------------------------------------------------------------------------------------------- notebook helpers
def notebook_setup(dataset: str = "auto", data_root: str = "", work_dir: str = "", param_set: str = "default"):
    """What every notebook does first: resolve the data and the work dir, and show the synthetic banner if needed."""
    choice = resolve_dataset(dataset, data_root)
    work = Path(work_dir) if work_dir else default_work_dir(param_set)
    work.mkdir(parents=True, exist_ok=True)
    html = banner_html(choice)
    if html:
        from IPython.display import HTML, display

        display(HTML(html))
    return choice, work


def load_choice(choice: DataChoice, synthetic_n: int = 600, seed: int = 0):
    """Load the chosen dataset (the synthetic one with its size and seed)."""
    from dcmfg.data import load_dataset

    if choice.synthetic:
        return load_dataset("synthetic", None, n=int(synthetic_n), seed=int(seed))
    return load_dataset(choice.name, choice.root)


def show_figure(fig, caption: str, name: str = "") -> None:
    """Display a matplotlib figure as one self-contained <figure> with its caption (offline, no external file)."""
    import base64
    import html as _html
    import io

    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    alt = _html.escape(caption.split(".")[0], quote=True)
    ident = f' id="{_html.escape(name, quote=True)}"' if name else ""
    display(HTML(
        f'<figure class="dcmfg-figure"{ident} style="margin:1em 0"><img alt="{alt}" style="max-width:100%" '
        f'src="data:image/png;base64,{data}"/><figcaption style="font-size:0.9em;color:#333">'
        f"<b>Figure.</b> {_html.escape(caption)}</figcaption></figure>"
    ))


def show_table(df, caption: str, precision: int = 4, index: bool = False) -> None:
    """Display a pandas table with a caption that states protocol, metric variant, seeds and data size."""
    from IPython.display import HTML, display

    styler = df.style.format(precision=precision, na_rep="-").set_caption(caption)
    if not index:
        styler = styler.hide(axis="index")
    styler = styler.set_table_attributes('class="dcmfg-table"').set_table_styles(
        [{"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: normal; color: #333"}]
    )
    display(HTML(styler.to_html()))


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves a half-written file for the next notebook."""
    write_text_atomic(Path(path), json.dumps(obj, indent=1, default=str))


def _set_dotted(values: dict, dotted: str, value) -> None:
    node = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def study_data_overrides(data_info: dict) -> dict:
    """Config values that point a training run at the study's dataset (from 01-data's data.json)."""
    if data_info["synthetic"]:
        return {"data.name": "synthetic", "data.root": None,
                "data.options": {"n": int(data_info["synthetic_n"]), "seed": int(data_info["synthetic_seed"])}}
    return {"data.name": data_info["loader"], "data.root": data_info["root"]}


def train_run(model: str, work: Path, split_file: str, seed: int, settings: dict, group: str = "runs",
              data=None) -> dict:
    """Train `configs/<model>.yaml` with dotted `settings` on one split file; returns its report.json plus timing.

    The run folder is named by a hash of the full config and the split file's bytes: the same config on the same
    split is deterministic on CPU, so a finished run is read back instead of trained again (rerunning the study
    after a change only trains what changed).
    """
    import hashlib

    from dcmfg.config import config_from_dict

    path = repo_dir() / "configs" / f"{model}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no config for model {model!r}")
    values = yaml.safe_load(path.read_text()) or {}
    for dotted, value in {**settings, "data.split": str(split_file), "seed": int(seed)}.items():
        _set_dotted(values, dotted, value)
    values.setdefault("train", {})["progress"] = False
    cfg = config_from_dict(values)
    digest = hashlib.sha256(cfg.to_json().encode() + Path(split_file).read_bytes()).hexdigest()[:12]
    out = Path(work) / group / f"{model}-{digest}"
    done = out / "study-run.json"
    if done.is_file() and (out / "report.json").is_file():
        info = json.loads(done.read_text())
        return {**json.loads((out / "report.json").read_text()), "run_dir": str(out), "seconds": info["seconds"],
                "reused": True}
    from dcmfg.train import train

    t0 = time.perf_counter()
    result = train(cfg, out, data=data)
    seconds = time.perf_counter() - t0
    write_text_atomic(done, json.dumps({"seconds": seconds, "model": model, "seed": int(seed), "settings": settings},
                                       default=str))
    return {**result.report, "run_dir": str(out), "seconds": seconds, "reused": False,
            "history": result.history}


def run_embeddings(run_dir: str | os.PathLike) -> dict:
    """A finished run's query and database embeddings (inductive: bank = its training split), for curves and
    metrics the run's report does not hold. Returns query/database {"image": {"z", "h"}, "text": ...} and labels."""
    import numpy as np
    import torch

    from dcmfg.evaluate import embed_parts, load_checkpoint_model, load_data

    model, cfg, meta = load_checkpoint_model(run_dir)
    data = load_data(cfg, Path(run_dir))
    q_idx, db_idx = data.part("query"), data.part("database")
    with torch.no_grad():
        emb = embed_parts(model, data, data.part("train"), np.concatenate([q_idx, db_idx]))
    nq = len(q_idx)
    return {
        "query": {m: {k: v[:nq] for k, v in e.items()} for m, e in emb.items()},
        "database": {m: {k: v[nq:] for k, v in e.items()} for m, e in emb.items()},
        "query_labels": data.labels[q_idx],
        "database_labels": data.labels[db_idx],
        "query_idx": q_idx,
        "database_idx": db_idx,
        "config": cfg,
        "model": model,
        "data": data,
    }


# --------------------------------------------------------------------------------------------- running
@dataclass
class NotebookRun:
    notebook: str
    output: str
    parameters: dict
    seconds: float


@dataclass
class StudyResult:
    param_set: str
    book_dir: str
    work_dir: str
    html_dir: str | None
    data: dict
    runs: list[NotebookRun] = field(default_factory=list)
    build_seconds: float = 0.0
    seconds: float = 0.0


def stage_book_sources(out_book: Path) -> None:
    """Copy the book's prose, config and assets into another folder (outputs and builds are not copied)."""
    src = repo_dir() / "book"
    if out_book.resolve() == src.resolve():
        return
    ignore = shutil.ignore_patterns("_build", "*.ipynb", ".ipynb_checkpoints", "__pycache__")
    shutil.copytree(src, out_book, ignore=ignore, dirs_exist_ok=True)


def run_notebooks(
    params: dict,
    out_dir: Path,
    work_dir: Path,
    notebooks: list[str] | None = None,
    log=print,
) -> list[NotebookRun]:
    """Execute the notebooks in order with papermill; each output lands in out_dir with its parameters recorded."""
    import papermill as pm

    src = repo_dir() / "notebooks"
    order = notebooks or NOTEBOOKS
    # Check every notebook's parameters before running any, so a typo in the last section fails in seconds.
    declared_by = {}
    for nb in order:
        path = src / f"{nb}.ipynb"
        if not path.is_file():
            raise DcmfgError(f"{path}: notebook missing")
        declared_by[nb] = pm.inspect_notebook(str(path))
        notebook_parameters(params, nb, declared_by[nb])
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    runs: list[NotebookRun] = []
    # The kernels inherit these: no progress bars or hub chatter in the executed notebooks.
    for key, value in {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}.items():
        os.environ.setdefault(key, value)
    timings_path = work_dir / "study-timings.json"
    timings = []
    for nb in order:
        path = src / f"{nb}.ipynb"
        declared = declared_by[nb]
        values = notebook_parameters(params, nb, declared)
        values["work_dir"] = str(work_dir)
        if "param_set" in declared:
            values["param_set"] = params["name"]
        values = {k: v for k, v in values.items() if k in declared}
        out = out_dir / f"{nb}.ipynb"
        tmp = out_dir / f".{nb}.running.ipynb"
        log(f"[study] {nb}: running with {json.dumps(values, default=str)}")
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(
                str(path), str(tmp), parameters=values, kernel_name="python3", progress_bar=False, cwd=str(work_dir)
            )
        except pm.PapermillExecutionError as exc:
            raise DcmfgError(
                f"{path}: cell {exc.exec_count} failed with {exc.ename}: {exc.evalue} (partial output kept in {tmp})"
            ) from None
        os.replace(tmp, out)  # an earlier good output is replaced only by a complete one
        dt = time.perf_counter() - t0
        log(f"[study] {nb}: done in {dt:.1f} s")
        runs.append(NotebookRun(nb, str(out), values, dt))
        timings.append({"notebook": nb, "seconds": round(dt, 2)})
        write_text_atomic(timings_path, json.dumps(timings, indent=1))
    return runs


def _book_config(book_dir: Path, choice: DataChoice, dest: Path) -> Path:
    """The book's _config.yml plus a site-wide announcement when the data are synthetic."""
    cfg = yaml.safe_load((book_dir / "_config.yml").read_text())
    if choice.synthetic:
        opts = cfg.setdefault("sphinx", {}).setdefault("config", {}).setdefault("html_theme_options", {})
        opts["announcement"] = "Built from the SYNTHETIC fallback set, not real data: " + choice.reason + "."
    write_text_atomic(dest, yaml.safe_dump(cfg, sort_keys=False))
    return dest


def build_book(book_dir: Path, config: Path | None = None, log=print) -> Path:
    """`jupyter-book build` (offline, notebooks are not executed again); returns the html folder."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(book_dir), "--all"]
    if config is not None:
        cmd += ["--config", str(config)]
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


def run_study(
    params: str | os.PathLike | None = "full",
    out_book: str | os.PathLike | None = None,
    skip_build: bool = False,
    work_dir: str | os.PathLike | None = None,
    notebooks: list[str] | None = None,
    log=print,
) -> StudyResult:
    """Run the whole study: notebooks into <out_book>/chapters, then the book into <out_book>/_build/html."""
    t0 = time.perf_counter()
    p = load_params(resolve_params_path(params))
    book = Path(out_book) if out_book else repo_dir() / "book"
    stage_book_sources(book)
    work = Path(work_dir) if work_dir else Path(p["common"].get("work_dir") or default_work_dir(p["name"]))
    choice = resolve_dataset(str(p["common"].get("dataset", "auto")), str(p["common"].get("data_root") or ""))
    log(f"[study] parameter set {p['name']} ({p['source']}); data: {choice.name} ({choice.reason}); work dir {work}")
    # Every notebook gets the same resolved real dataset, so they cannot disagree about the data (the synthetic
    # fallback stays "auto": each notebook resolves it the same way and keeps the reason for its banner).
    if not choice.synthetic:
        p["common"] = {**p["common"], "dataset": choice.name, "data_root": choice.root}
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(work / "study-params.json", json.dumps({**p, "data": asdict(choice)}, indent=1, default=str))
    runs = run_notebooks(p, book / "chapters", work, notebooks=notebooks, log=log)
    result = StudyResult(p["name"], str(book), str(work), None, asdict(choice), runs)
    if not skip_build:
        t1 = time.perf_counter()
        cfg = _book_config(book, choice, work / "_book_config.yml")
        result.html_dir = str(build_book(book, cfg, log=log))
        result.build_seconds = time.perf_counter() - t1
    result.seconds = time.perf_counter() - t0
    log(f"[study] finished in {result.seconds:.0f} s" + (f"; book: {result.html_dir}/index.html" if result.html_dir else ""))
    return result


# --------------------------------------------------------------------------------------------- CLI
def _cmd_run(args) -> int:
    run_study(args.params, out_book=args.out_book, skip_build=args.skip_build, work_dir=args.work_dir,
              notebooks=args.only or None)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("study", help="run the study notebooks and build the book")
    sub = p.add_subparsers(dest="study_command", required=True)
    r = sub.add_parser("run", help="execute notebooks/ with papermill, then jupyter-book build")
    r.add_argument("--params", default="full", help="parameter set name (quick, full) or a YAML file (default: full)")
    r.add_argument("--out-book", default=None, help="book folder to fill and build (default: the repo's book/)")
    r.add_argument("--work-dir", default=None, help="where notebooks exchange files (default: <cache>/study/<set>)")
    r.add_argument("--skip-build", action="store_true", help="run the notebooks only")
    r.add_argument("--only", nargs="*", choices=NOTEBOOKS, help="run only these notebooks (they read earlier outputs)")
    r.set_defaults(func=_cmd_run)
