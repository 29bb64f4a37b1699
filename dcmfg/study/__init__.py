"""The study: notebooks that each compute what they need, and the runner that executes them into the book.

A notebook starts with three cells:

    from dcmfg import study                     # 1. (hidden) remembers which names exist before the parameters
    _before = set(globals())
    dataset: str = "auto"  # ...                # 2. the `parameters` cell: annotated assignments (a quoted
                                                #    annotation such as "Optional[float]" needs no import)
    s = study.start(globals(), _before)         # 3. checks every parameter (name, type) before any work

and then asks `s` for what it needs: `s.load_dataset()`, `s.split_file(seed)`, `s.features()`, `s.run(model, seed)`,
`s.runs(models)`. Each is produced on demand and cached by content under the cache dir (split files by dataset
fingerprint, protocol, sizes and seed; features by their settings; runs by config digest and split bytes), so a
notebook run alone, in any order, with any parameters, gives the same numbers as inside the full study, and a
rerun only computes what changed. No notebook reads a file that another notebook writes.

Parameters shared by the notebooks (a notebook declares those it uses): the data (`dataset`, `data_root`,
`synthetic_n`, `synthetic_seed`), the split protocol (`split_protocol`, `query`, `val`, `train`, `seeds`), the
training budget (`epochs`, `patience`), `settings` (dotted config values for every run and for the features, e.g.
{"features.regions": 2}) and `device`.

The runner: `dcmfg study run [--params quick|full|FILE.yaml]` executes notebooks/ with papermill into
book/chapters/ and builds the Jupyter Book. A parameter set is a YAML file with a `common:` mapping (passed to every
notebook that declares the name) and a `notebooks:` mapping of per-notebook values; named sets resolve to
configs/study-<name>.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.fileio import write_text_atomic
from dcmfg.paths import cache_dir, data_dir


def repo_dir() -> Path:
    """The source checkout (configs/, notebooks/, book/ live here)."""
    return Path(__file__).resolve().parents[2]


def notebook_names() -> list[str]:
    """The study's notebooks in run order (file names without .ipynb)."""
    return sorted(p.stem for p in (repo_dir() / "notebooks").glob("[0-9][0-9]-*.ipynb"))


def shown_path(path) -> str:
    """A path as the published book may show it: under $DCMFG_DATA, $DCMFG_CACHE, the repository or ~, never the
    build machine's absolute path."""
    text = str(path)
    if not text:
        return text
    p = Path(os.path.expandvars(text)).expanduser()
    places = [("$DCMFG_DATA", data_dir()), ("$DCMFG_CACHE", Path(os.environ["DCMFG_CACHE"]) if os.environ.get("DCMFG_CACHE") else None),
              (".", repo_dir()), ("~", Path.home())]
    for name, root in places:
        if root is None:
            continue
        try:
            rel = p.resolve().relative_to(Path(root).resolve())
        except ValueError:
            continue
        return name if str(rel) == "." else f"{name}/{rel}"
    return text if not p.is_absolute() else p.name


# --------------------------------------------------------------------------------------------- parameters
class ParameterError(DcmfgError):
    """A notebook parameter that does not exist or has the wrong type; shown as one line in the notebook."""

    def _render_traceback_(self):  # IPython (and so papermill) show this instead of a traceback
        return [f"ParameterError: {self}"]


def _accepts(annotation, value) -> tuple[bool, object]:
    """Whether `value` fits `annotation` (list, dict, str, int, float, bool and unions of them with None); a string
    given for a non-string parameter (papermill's `-p seeds "[0, 1]"`) is read as YAML first."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    options = tuple(typing.get_origin(o) or o for o in options)
    if isinstance(value, str) and str not in options:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return False, value
    for want in options:
        if want is type(None) and value is None:
            return True, value
        if want is bool and isinstance(value, bool):
            return True, value
        if want is int and isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value  # an int stays an int: split sizes are counts when integers, fractions when floats
        if want in (str, list, dict) and isinstance(value, want):
            return True, value
    return False, value


def _type_name(annotation) -> str:
    return re.sub(r"\btyping\.|<class '(\w+)'>", r"\1", str(annotation)).replace("NoneType", "None")


def check_parameters(namespace: dict, before: set) -> dict:
    """The notebook's parameters as declared by its `parameters` cell (annotated assignments), with the values in
    `namespace` (papermill's injected cell included), types checked and written back. A name set by the injected
    cell that the notebook does not declare is refused: papermill itself passes unknown names silently."""
    declared = dict(namespace.get("__annotations__", {}))
    new = {n for n in set(namespace) - set(before)
           if not n.startswith("_") and not isinstance(namespace[n], types.ModuleType)}  # imports are not parameters
    unknown = sorted(new - set(declared))
    if unknown:
        raise ParameterError(f"unknown parameter {unknown[0]!r}; this notebook's parameters are: {', '.join(declared)}")
    values = {}
    for name, annotation in declared.items():
        if isinstance(annotation, str):  # a quoted annotation ("Optional[float]") or postponed annotations
            annotation = declared[name] = eval(annotation, {**vars(typing), **namespace})
        ok, value = _accepts(annotation, namespace.get(name))
        if not ok:
            raise ParameterError(
                f"parameter {name!r} must be {_type_name(annotation)}, got {namespace.get(name)!r}"
                + (f" (e.g. -p {name} '[0, 1]')" if list in (typing.get_args(annotation) or (annotation,)) else ""))
        namespace[name] = values[name] = value
    return values


# --------------------------------------------------------------------------------------------- data choice
@dataclass
class DataChoice:
    name: str  # loader name for load_dataset
    root: str  # "" for synthetic; as given (may hold $DCMFG_DATA)
    synthetic: bool
    reason: str  # one sentence for the book (paths shown relative, see shown_path)


def resolve_dataset(dataset: str = "auto", data_root: str = "") -> DataChoice:
    """Which dataset the study uses. `auto`: the first recognised dataset under DCMFG_DATA, else synthetic."""
    if dataset == "synthetic":
        return DataChoice("synthetic", "", True, "the synthetic set was requested explicitly")
    root = os.path.expandvars(str(data_root)) if data_root else ""
    if dataset != "auto":
        if not root:  # the first folder of that dataset under DCMFG_DATA
            from dcmfg.data.discover import find_datasets

            found = [r for n, r in find_datasets(data_dir()) if n == dataset] if data_dir() is not None else []
            if not found:
                raise ConfigError(f"dataset {dataset!r}: no data_root given and none found under DCMFG_DATA "
                                  f"({shown_path(data_dir()) if data_dir() else 'not set'})")
            data_root = root = shown_path(found[0]) if shown_path(found[0]).startswith("$DCMFG_DATA") else str(found[0])
            root = os.path.expandvars(root)
        return DataChoice(dataset, str(data_root), False, f"{dataset} from {shown_path(root)} was requested")
    folder = Path(root) if root else data_dir()
    if folder is None:
        return DataChoice("synthetic", "", True, "DCMFG_DATA is not set, so no real dataset was available")
    if not folder.is_dir():
        return DataChoice("synthetic", "", True, f"the data folder {shown_path(folder)} does not exist")
    from dcmfg.data.discover import pick_dataset

    name, found = pick_dataset(folder)
    if name == "synthetic":
        return DataChoice("synthetic", "", True, f"no dataset in a recognised layout was found under {shown_path(folder)}")
    # under $DCMFG_DATA the root is kept in that form, so the published parameter cells show no machine path
    shown = shown_path(found)
    return DataChoice(name, shown if shown.startswith("$DCMFG_DATA") else str(found), False,
                      f"found {name} under {shown_path(folder)}")


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


# --------------------------------------------------------------------------------------------- the study
@dataclass
class Study:
    """What the notebooks share: the data, the split protocol, the training budget and the run settings."""

    dataset: str = "auto"
    data_root: str = ""
    synthetic_n: int = 600
    synthetic_seed: int = 0
    split_protocol: str = "random"
    query: float | int = 0.2
    val: float | int = 0.1
    train: float | int | None = None
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    epochs: int = 40
    patience: int = 10
    settings: dict = field(default_factory=dict)
    device: str = "auto"
    choice: DataChoice | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_parameters(cls, params: dict) -> Study:
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_") and f != "choice"}
        s = cls(**{k: v for k, v in params.items() if k in known})
        s.seeds = [int(x) for x in s.seeds]
        s.choice = resolve_dataset(s.dataset, s.data_root)
        s.base_config()  # every setting checked now, before any work
        return s

    # -- data ------------------------------------------------------------------------------------------
    def data_settings(self) -> dict:
        """Config values that point a run at this study's dataset."""
        c = self.choice
        if c.synthetic:
            return {"data.name": "synthetic", "data.root": None,
                    "data.options": {"n": int(self.synthetic_n), "seed": int(self.synthetic_seed)}}
        return {"data.name": c.name, "data.root": os.path.expandvars(c.root)}

    def load_dataset(self):
        if "dataset" not in self._cache:
            from dcmfg.engine.data import load_dataset_of

            self._cache["dataset"] = load_dataset_of(self.base_config())
        return self._cache["dataset"]

    def split_file(self, seed: int) -> Path:
        """The split file of one seed under this study's protocol: made on first use, then read back; its name
        holds everything that defines it, so any notebook asking for it gets the same bytes."""
        from dcmfg.data.splits import make_split, save_split

        ds = self.load_dataset()
        sizes = f"q{self.query}-v{self.val}-t{self.train}"
        path = cache_dir() / "study" / "splits" / ds.fingerprint()[:16] / f"{self.split_protocol}-{sizes}-seed{int(seed)}.json"
        if not path.is_file():
            split = make_split(ds, protocol=self.split_protocol, query=self.query, train=self.train, val=self.val,
                               seed=int(seed))
            save_split(split, path)
        return path

    # -- configs and features -----------------------------------------------------------------------------
    def base_config(self, model: str = "dcmfg", settings: dict | None = None):
        """configs/<model>.yaml with this study's data, budget and settings (no split, seed 0)."""
        from dcmfg.config import apply_overrides, config_from_dict

        path = repo_dir() / "configs" / f"{model}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (repo_dir() / "configs").glob("*.yaml") if not p.stem.startswith("study-"))
            raise ConfigError(f"no config for model {model!r} (configs/{model}.yaml); known: {', '.join(known)}")
        values = yaml.safe_load(path.read_text()) or {}
        # one thread per run: the same numbers however many runs share the machine (see `runs`)
        dotted = {**self.data_settings(), "train.epochs": int(self.epochs), "train.patience": int(self.patience),
                  "train.progress": False, "train.device": self.device, "train.threads": 1, **self.settings,
                  **(settings or {})}
        return config_from_dict(apply_overrides(values, dotted))

    def config(self, model: str, seed: int, settings: dict | None = None):
        """The full config of one run: base_config plus the seed's split file and the seed."""
        from dcmfg.config import apply_overrides, config_from_dict

        cfg = self.base_config(model, settings)
        return config_from_dict(apply_overrides(cfg.to_dict(), {"data.split": str(self.split_file(seed)),
                                                                "seed": int(seed)}))

    def features(self, model: str = "dcmfg"):
        """The backbone features every chapter uses (the `features` settings of the runs)."""
        from dcmfg.engine.data import load_features
        from dcmfg.device import resolve_device

        cfg = self.base_config(model)
        return load_features(cfg, self.load_dataset(), resolve_device(cfg.train.device))

    def bundle(self, cfg):
        """Loaded data shared by every run with the same dataset and feature settings (features read once)."""
        from dcmfg.engine.data import load_data

        key = json.dumps([cfg.to_dict()["data"], cfg.to_dict()["features"]], sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = load_data(cfg)
        return self._cache[key]

    # -- runs ----------------------------------------------------------------------------------------------
    def run_dir(self, model: str, seed: int, settings: dict | None = None):
        """(config, run folder) of one run. The folder is named by the config (minus the split file's path) and the
        split file's bytes: the same config on the same split is deterministic on CPU, so a finished run is reused."""
        from dcmfg.config import config_digest
        from dcmfg.fileio import file_sha256

        cfg = self.config(model, seed, settings)
        split_sha = file_sha256(cfg.data.split)
        identity = hashlib.sha256(f"{config_digest(_without_split_path(cfg))}:{split_sha}".encode()).hexdigest()[:12]
        return cfg, cache_dir() / "runs" / f"{model}-seed{int(seed)}-{identity}"

    def run(self, model: str, seed: int, settings: dict | None = None) -> dict:
        """Train configs/<model>.yaml on one seed's split with `settings` (dotted), or read the finished run back.
        Returns report.json plus run_dir, seconds, cpu_seconds, reused and history (metrics.jsonl rows)."""
        cfg, out = self.run_dir(model, seed, settings)
        done = out / "study-run.json"
        reused = _finished(out)
        if not reused:
            from dcmfg.engine.train import train

            t0, c0 = time.perf_counter(), time.process_time()
            train(cfg, out, data=self.bundle(cfg))
            write_text_atomic(done, json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                                "model": model, "seed": int(seed), "settings": settings or {}}, default=str))
        info = json.loads(done.read_text())
        history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {**json.loads((out / "report.json").read_text()), "run_dir": str(out), "seconds": info["seconds"],
                "cpu_seconds": info.get("cpu_seconds"), "reused": reused, "history": history, "model": model,
                "seed": int(seed), "settings": settings or {}}

    def runs(self, models, seeds=None, settings: dict | None = None) -> list[dict]:
        """`run` for every model (a name, or a (label, model, settings) triple) and seed (default: the study's).

        Runs still to train go to worker processes, one per core (DCMFG_WORKERS to change; one on a GPU): every run
        uses one thread (train.threads = 1, set for the whole study), so its numbers do not depend on how many ran
        beside it."""
        tasks = self._tasks(models, seeds, settings)
        finished = [_finished(self.run_dir(*t[1:])[1]) for t in tasks]
        self.train_all([(models, seeds, settings)])
        return [{**self.run(model, seed, extra), "label": label, "reused": was}  # reused: finished before this call
                for (label, model, seed, extra), was in zip(tasks, finished)]

    def train_all(self, groups) -> None:
        """Train, in one pool, the missing runs of several `runs` calls to come, each given as (models, seeds,
        settings): the cores stay busy until the last run instead of idling at the end of each group."""
        missing: dict = {}  # run folder -> task: a run two groups share is trained once
        for t in (t for g in groups for t in self._tasks(*g)):
            out = self.run_dir(*t[1:])[1]
            if not _finished(out):
                missing.setdefault(out, t)
        todo = list(missing.values())
        todo.sort(key=lambda t: -RUN_COST.get(t[1], max(RUN_COST.values())))  # longest first: no idle core at the end
        workers = min(len(todo), _workers(self.base_config().train.device))
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            params = self.parameters()
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_run_in_worker, [(params, model, seed, extra) for _, model, seed, extra in todo]))
        else:
            for _, model, seed, extra in todo:
                self.run(model, seed, extra)

    def _tasks(self, models, seeds=None, settings: dict | None = None) -> list[tuple]:
        tasks = []
        for entry in models:
            label, model, extra = (entry, entry, {}) if isinstance(entry, str) else entry
            for seed in (self.seeds if seeds is None else seeds):
                tasks.append((label, model, int(seed), {**(settings or {}), **extra}))
        return tasks

    def parameters(self) -> dict:
        """The values this study was made from (what a worker process needs to make the same study)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_") and k != "choice"}

    # -- words for captions -----------------------------------------------------------------------------
    def protocol(self, report: dict | None = None) -> str:
        """One sentence naming the data, protocol, split sizes, seeds and budget, for every table caption."""
        ds = self.load_dataset()
        sizes = ""
        if report is not None:
            sizes = (f", {report['n_query']} queries, database {report['n_database']}, bank = training split "
                     f"({report['n_bank_pairs']} pairs)")
        return (f"{ds.name}{' (SYNTHETIC)' if self.choice.synthetic else ''}, N = {len(ds)}, {self.split_protocol} "
                f"split (query {self.query}, validation {self.val} of the training pool){sizes}, split seeds "
                f"{self.seeds}, at most {self.epochs} epochs with patience {self.patience}")


def _workers(device: str) -> int:
    if os.environ.get("DCMFG_WORKERS"):
        return max(1, int(os.environ["DCMFG_WORKERS"]))
    return 1 if device.startswith("cuda") else max(1, os.cpu_count() or 1)


# CPU seconds of one converged run of each model on the real subset (one thread, 80 epochs, patience 20, validation
# every 4th epoch; the full study of 2026-12-02, chapter 3 prints them). Only the order of the work queue uses them:
# every run's numbers are independent of it.
RUN_COST = {"dcmht": 100, "dcmfg": 95, "linear": 21, "dcmh": 12}


def _finished(out: Path) -> bool:
    """A run folder holds a finished study run (its report and the study's own record of it)."""
    return (out / "study-run.json").is_file() and (out / "report.json").is_file()


def _run_in_worker(args) -> None:
    params, model, seed, settings = args
    Study.from_parameters(params).run(model, seed, settings)


def _without_split_path(cfg):
    """The config with data.split blanked: the split's identity is its bytes, not where the cache put it."""
    from dcmfg.config import config_from_dict

    values = cfg.to_dict()
    values["data"]["split"] = None
    return config_from_dict(values)


def start(namespace: dict, before: set) -> Study:
    """A notebook's first step: check its parameters, resolve the data, show the synthetic banner when needed."""
    import logging
    import warnings

    logging.getLogger("dcmfg").setLevel(logging.ERROR)  # the book shows results, not cache chatter
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch_geometric")
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # tags in scripts the font lacks
    params = check_parameters(namespace, before)
    s = Study.from_parameters(params)
    html = banner_html(s.choice)
    if html:
        from IPython.display import HTML, display

        display(HTML(html))
    return s


# --------------------------------------------------------------------------------------------- display
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


# --------------------------------------------------------------------------------------------- parameter sets
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
    bad = sorted(set(notebooks) - set(notebook_names()))
    if bad:
        raise ConfigError(f"{path}: unknown notebooks {bad}; the study has {notebook_names()}")
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


def rerun_commands(param_set: str) -> list[str]:
    """The papermill command that re-runs each notebook on its own with a parameter set's values."""
    import shlex

    import papermill as pm

    p = load_params(resolve_params_path(param_set))
    lines = []
    for nb in notebook_names():
        declared = pm.inspect_notebook(str(repo_dir() / "notebooks" / f"{nb}.ipynb"))
        values = notebook_parameters(p, nb, declared)
        args = " ".join(f"-p {k} {shlex.quote(v if isinstance(v, str) else json.dumps(v))}" for k, v in values.items())
        lines.append(f"papermill notebooks/{nb}.ipynb out/{nb}.ipynb {args}".rstrip())
    return lines


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


def run_notebooks(params: dict, out_dir: Path, notebooks: list[str] | None = None, log=print) -> list[NotebookRun]:
    """Execute the notebooks in order with papermill; each output lands in out_dir with its parameters recorded.
    A notebook that declares `timings` receives the seconds of those run before it (the appendix)."""
    import papermill as pm

    src = repo_dir() / "notebooks"
    order = notebooks or notebook_names()
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
    timings: dict[str, float] = {}
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
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(path), str(tmp), parameters=values, kernel_name="python3", progress_bar=False,
                                cwd=str(repo_dir()))
        except pm.PapermillExecutionError as exc:
            raise DcmfgError(
                f"{path}: cell {exc.exec_count} failed with {exc.ename}: {exc.evalue} (partial output kept in {tmp})"
            ) from None
        os.replace(tmp, out)  # an earlier good output is replaced only by a complete one
        dt = time.perf_counter() - t0
        log(f"[study] {nb}: done in {dt:.1f} s")
        runs.append(NotebookRun(nb, str(out), values, dt))
        timings[nb] = round(dt, 1)
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
        cfg = _book_config(book, choice, cache_dir() / "study" / f"_book_config-{p['name']}.yml")
        result.html_dir = str(build_book(book, cfg, log=log))
        result.build_seconds = time.perf_counter() - t1
    result.seconds = time.perf_counter() - t0
    log(f"[study] finished in {result.seconds:.0f} s" + (f"; book: {result.html_dir}/index.html" if result.html_dir else ""))
    return result


def run_command(args) -> int:
    """`dcmfg study run` (the arguments are defined in dcmfg/cli.py)."""
    run_study(args.params, out_book=args.out_book, skip_build=args.skip_build, notebooks=args.only or None,
              device=args.device)
    return 0
