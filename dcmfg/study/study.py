"""The `Study` object: what a notebook asks for (the data, split files, configs, features, runs), made on demand
and cached by content, and the pool of worker processes that trains the runs still missing.

Split files are named by dataset fingerprint, protocol, sizes and seed; runs by config digest and split bytes. So a
notebook run alone, in any order, with any parameters, gives the same numbers as inside the full study, and a rerun
only computes what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from IPython.display import HTML, display

from dcmfg.config import TrainConfig, apply_overrides, config_digest, config_from_dict
from dcmfg.data.discover import find_datasets, pick_dataset
from dcmfg.data.splits import make_split, save_split
from dcmfg.device import resolve_device
from dcmfg.engine.checkpoint import run_lock
from dcmfg.engine.data import load_data, load_dataset_of, load_features
from dcmfg.engine.train import train as train_run  # `train` is also a Study field: the training split size
from dcmfg.errors import ConfigError
from dcmfg.fileio import file_sha256, write_text_atomic
from dcmfg.paths import cache_dir, data_dir
from dcmfg.study.display import banner_html
from dcmfg.study.params import check_parameters
from dcmfg.study.repo import repo_dir, shown_path


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
    name, found = pick_dataset(folder)
    if name == "synthetic":
        return DataChoice("synthetic", "", True, f"no dataset in a recognised layout was found under {shown_path(folder)}")
    # under $DCMFG_DATA the root is kept in that form, so the published parameter cells show no machine path
    shown = shown_path(found)
    return DataChoice(name, shown if shown.startswith("$DCMFG_DATA") else str(found), False,
                      f"found {name} under {shown_path(folder)}")


# --------------------------------------------------------------------------------------------- the study
@dataclass
class Study:
    """What the notebooks share: the data, the split protocol, the training budget and the run settings.

    The defaults are those of the full study (configs/study-full.yaml), which every notebook's parameters cell
    repeats; the training budget is dcmfg.config.TrainConfig's."""

    dataset: str = "auto"
    data_root: str = ""
    synthetic_n: int = 600
    synthetic_seed: int = 0
    split_protocol: str = "random"
    query: float | int = 0.2
    val: float | int = 0.1
    train: float | int | None = None
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    epochs: int = TrainConfig.epochs
    patience: int = TrainConfig.patience
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
            self._cache["dataset"] = load_dataset_of(self.base_config())
        return self._cache["dataset"]

    def split_file(self, seed: int) -> Path:
        """The split file of one seed under this study's protocol: made on first use, then read back; its name
        holds everything that defines it, so any notebook asking for it gets the same bytes."""
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
        cfg = self.base_config(model, settings)
        return config_from_dict(apply_overrides(cfg.to_dict(), {"data.split": str(self.split_file(seed)),
                                                                "seed": int(seed)}))

    def features(self, model: str = "dcmfg"):
        """The backbone features every chapter uses (the `features` settings of the runs)."""
        cfg = self.base_config(model)
        return load_features(cfg, self.load_dataset(), resolve_device(cfg.train.device))

    def bundle(self, cfg):
        """Loaded data shared by every run with the same dataset and feature settings (features read once)."""
        key = json.dumps([cfg.to_dict()["data"], cfg.to_dict()["features"]], sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = load_data(cfg)
        return self._cache[key]

    # -- runs ----------------------------------------------------------------------------------------------
    def run_dir(self, model: str, seed: int, settings: dict | None = None):
        """(config, run folder) of one run. The folder is named by the config (minus the split file's path) and the
        split file's bytes: the same config on the same split is deterministic on CPU, so a finished run is reused."""
        cfg = self.config(model, seed, settings)
        split_sha = file_sha256(cfg.data.split)
        identity = hashlib.sha256(f"{config_digest(_without_split_path(cfg))}:{split_sha}".encode()).hexdigest()[:12]
        return cfg, cache_dir() / "runs" / f"{model}-seed{int(seed)}-{identity}"

    def run(self, model: str, seed: int, settings: dict | None = None, label: str | None = None,
            journal: bool = True) -> dict:
        """Train configs/<model>.yaml on one seed's split with `settings` (dotted), or read the finished run back.
        Returns report.json plus run_dir, seconds, cpu_seconds, reused and history (metrics.jsonl rows).

        With `journal`, one line (trained, resumed from its checkpoint, or reused) goes to the file named by
        DCMFG_STUDY_JOURNAL when set: `dcmfg study run` reports from it what each chapter trained and reused."""
        cfg, out = self.run_dir(model, seed, settings)
        done = out / "study-run.json"
        reused = _finished(out)
        if not reused:
            # The run and the study's record of it under one lock (train's own is re-entrant). Another study on this
            # cache may be training the same run (two chapters built at once): wait for it, then read its run back.
            with run_lock(out, wait=True):
                reused = _finished(out)
                if not reused:
                    point = _resume_point(out)
                    resumed_from = int(point.get("epoch", 0))
                    # a resumed run's time includes what it spent before the cut, up to its resume point
                    t0 = time.perf_counter() - float(point.get("seconds", 0.0))
                    c0 = time.process_time() - float(point.get("cpu_seconds", 0.0))
                    if journal and resumed_from:
                        _journal(label or model, seed, out, "resumed", from_epoch=resumed_from)
                    elif journal:
                        _journal(label or model, seed, out, "trained")
                    train_run(cfg, out, data=self.bundle(cfg))
                    write_text_atomic(done, json.dumps({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                                                        "model": model, "seed": int(seed), "settings": settings or {}}, default=str))
        if reused and journal:
            _journal(label or model, seed, out, "reused")
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
        outs = [self.run_dir(*t[1:])[1] for t in tasks]
        finished = [_finished(out) for out in outs]
        for (label, _, seed, _), out, was in zip(tasks, outs, finished):
            if was:
                _journal(label, seed, out, "reused")
        self.train_all([(models, seeds, settings)])  # what it trains, the worker's `run` records
        return [{**self.run(model, seed, extra, journal=False), "label": label, "reused": was}  # reused: finished
                for (label, model, seed, extra), was in zip(tasks, finished)]                     # before this call

    def train_all(self, groups) -> None:
        """Train, in one pool, the missing runs of several `runs` calls to come, each given as (models, seeds,
        settings): the cores stay busy until the last run instead of idling at the end of each group."""
        train_studies([(self, groups)])

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
                f"{self.seeds}, {self.budget_words()}")

    def budget_words(self) -> str:
        """The training budget as a caption says it: in epochs, or in optimizer steps where the settings give
        train.max_steps / train.patience_steps (the same budget at every training size)."""
        tc = self.base_config().train
        cap = f"at most {tc.max_steps} steps" if tc.max_steps else f"at most {tc.epochs} epochs"
        wait = f"{tc.patience_steps} steps" if tc.patience_steps else f"{tc.patience} epochs"
        return f"{cap} of batch {tc.batch_size} with patience {wait}"


# --------------------------------------------------------------------------------------------- the pool
def train_studies(pairs) -> None:
    """Train in one pool the missing runs of several studies (e.g. one per training size of a learning curve),
    each given as (study, groups) with `groups` as `Study.train_all` takes them; longest runs first."""
    missing: dict = {}  # run folder -> (study, task): a run two groups share is trained once
    for study, groups in pairs:
        for t in (t for g in groups for t in study._tasks(*g)):
            out = study.run_dir(*t[1:])[1]
            if not _finished(out):
                missing.setdefault(out, (study, t))
    todo = list(missing.values())
    todo.sort(key=lambda st: -RUN_COST.get(st[1][1], max(RUN_COST.values())))  # longest first: no idle core at the end
    if not todo:
        return
    workers = min(len(todo), _workers(todo[0][0].base_config().train.device))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_run_in_worker, [(study.parameters(), model, seed, extra, label)
                                           for study, (label, model, seed, extra) in todo]))
    else:
        for study, (label, model, seed, extra) in todo:
            study.run(model, seed, extra, label=label)


def _workers(device: str) -> int:
    if os.environ.get("DCMFG_WORKERS"):
        return max(1, int(os.environ["DCMFG_WORKERS"]))
    return 1 if device.startswith("cuda") else max(1, os.cpu_count() or 1)


# The relative cost of one converged run of each model (CPU seconds on the real subset under the full study's
# budget; chapter 3 prints the measured ones). Only the order of the work queue uses them, longest first: every
# run's numbers are independent of it.
RUN_COST = {"dcmht": 100, "dcmfg": 95, "linear": 21, "dcmh": 12}


def _finished(out: Path) -> bool:
    """A run folder holds a finished study run (its report and the study's own record of it)."""
    return (out / "study-run.json").is_file() and (out / "report.json").is_file()


def _run_in_worker(args) -> None:
    """One run in a spawned worker process (a module-level function, so the worker can import it)."""
    params, model, seed, settings, label = args
    Study.from_parameters(params).run(model, seed, settings, label=label)


def _resume_point(out: Path) -> dict:
    """The loop state (epoch, seconds, cpu_seconds, ...) of the resume point a cut-off run left in `out/last`
    ({}: none)."""
    state = out / "last" / "state.json"
    try:
        loop = json.loads(state.read_text())["loop"] if state.is_file() else {}
        int(loop.get("epoch", 0)), float(loop.get("seconds", 0.0)), float(loop.get("cpu_seconds", 0.0))
        return loop
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # a damaged resume point: train() says what is wrong with it


def _journal(label: str, seed: int, out: Path, status: str, **extra) -> None:
    """One line for `dcmfg study run`'s account of the runs (appended whole: workers share the file)."""
    path = os.environ.get("DCMFG_STUDY_JOURNAL")
    if not path:
        return
    line = json.dumps({"label": str(label), "seed": int(seed), "run": out.name, "status": status, **extra}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _without_split_path(cfg):
    """The config with data.split blanked: the split's identity is its bytes, not where the cache put it."""
    values = cfg.to_dict()
    values["data"]["split"] = None
    return config_from_dict(values)


# --------------------------------------------------------------------------------------------- a notebook's start
def start(namespace: dict, before: set) -> Study:
    """A notebook's first step: check its parameters, resolve the data, show the synthetic banner when needed."""
    logging.getLogger("dcmfg").setLevel(logging.ERROR)  # the book shows results, not cache chatter
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch_geometric")
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # tags in scripts the font lacks
    params = check_parameters(namespace, before)
    s = Study.from_parameters(params)
    html = banner_html(s.choice)
    if html:
        display(HTML(html))
    return s
