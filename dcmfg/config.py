"""One config tree for everything a run depends on: data, features, graph, model, losses, training, evaluation.

Dataclasses with the shipped defaults (equal to configs/dcmfg.yaml), YAML in, `--set a.b=c` overrides, and every
value checked (type, allowed choices, range) when the config is loaded, before any data is read. Every choice
docs/method.md leaves open is a field here, so that ablations are config changes, not code changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Iterable

import yaml

from dcmfg.choices import (Attention, BankDensity, Distance, Fallback, Hubness, Inference, OnCorrupt, Positives,
                           Relation, SelectMetric, SimilarityKind, SplitProtocol, values)
from dcmfg.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "mirflickr25k"
    root: str | None = None  # may be omitted for "synthetic"
    split: str | None = None  # split file; None = make a seeded random split and save it into the run folder
    options: dict = field(default_factory=dict)  # passed to load_dataset (e.g. n, seed for synthetic)
    # How a fresh split is drawn when `split` is None (see docs/data.md): sizes are counts (int) or fractions (float).
    protocol: str = "random"
    query: float | int = 0.2
    val: float | int = 0.1  # of the training pool
    train: float | int | None = None  # the training pool; None: the protocol's default (all of the database)


@dataclass
class FeatureConfig:
    image_backbone: str = "dinov2-small-imgfocus"
    text_backbone: str = "minilm-l6"
    regions: int = 4
    max_words: int = 32
    image_size: int = 224
    batch_size: int = 32
    on_corrupt: str = "skip"
    workers: int = 2  # DataLoader worker processes that read, decode and preprocess images (0: in the main process)
    amp: bool = False  # mixed precision (autocast) for the backbones; acts on CUDA only, CPU stays float32


@dataclass
class GraphConfig:
    relation: str = "mutual"  # mutual | knn | static
    k: int = 8
    cross_modal_only: bool = True  # see configs/dcmfg.yaml: the modality gap leaves plain kNN without cross edges
    # Extra cross-modal neighbours (0 = none): the union with the mutual-kNN edges among the other modality's nodes
    # only, with this k. Without it the modality gap (image-image and text-text cosines far above image-text)
    # leaves a plain kNN graph with hardly any cross-modal edge, and the alignment term never acts.
    cross_k: int = 0
    fallback: str = "nearest"  # nearest | none: what a node without a (mutual) neighbour gets
    rebuild_per_layer: bool = True  # DynamicEdgeConv-style: rebuild the graph before every layer
    # Drop the edge between an item's image and its own text in training and bank graphs: a query never has its
    # partner in the bank, so a model trained with that edge would learn to copy from a neighbour it lacks later.
    exclude_pair: bool = True
    # Relations that work across the modality gap (docs/method.md section 2; each measured in the graph chapter):
    hubness: str = "none"  # none | csls: rank candidates by 2cos(x, y) - r(x) - r(y), r = mean cosine to k nearest
    centre: bool = False  # subtract each modality's running mean (training data, saved with the weights) first
    reverse_ratio: float = 1.0  # relaxed mutuality: j -> i iff j in kNN_k(i) and i in kNN_k'(j), k' = ratio * k
    bank_density: str = "same"  # same | matched: k' scaled by bank size / batch size in the bank's mutual test
    # bank: the learned layers over the bank graph | none: no graph at inference (same weights) | smooth: no learned
    # layer, projection + mean of the bank neighbours' projections | transductive: bank, plus separate re-ranked numbers
    inference: str = "bank"


@dataclass
class ModelConfig:
    name: str = "dcmfg"  # registry name: dcmfg | linear | dcmh | dcmht
    dim: int = 512
    hidden: int = 1024
    layers: int = 2
    heads: int = 4
    attention: str = "alignment"  # alignment (GATv2 + region-word term) | gatv2 | none (GCN weights)
    token_dim: int = 128  # region/word tokens are projected to this width for the alignment score
    hash_bits: int = 64
    dropout: float = 0.1
    # Weight of the region-word alignment score in the attention logits (attention: alignment). A fixed value: a
    # learned per-head scale never moved from its start (5.0 +- 0.01 over 40 epochs, measured), so it is a setting.
    align_scale: float = 5.0


@dataclass
class LossConfig:
    temperature: float = 0.07
    positives: str = "label"  # label (multi-positive: shares >= 1 label) | pair (only the paired item)
    contrastive: float = 1.0  # on graph outputs
    contrastive_pre: float = 1.0  # on pre-graph projections
    similarity: float = 0.5  # multi-label similarity-preserving term
    similarity_kind: str = "likelihood"  # likelihood (DCMH inner product) | margin
    soft_labels: bool = False  # S = cosine of label vectors instead of 0/1
    label: float = 0.5  # label-prediction head (BCE)
    hash_contrastive: float = 0.5  # contrastive term on the tanh codes
    alignment: float = 0.5  # InfoNCE over the region-word alignment scores (trains the token projections)
    alignment_batch: int = 48  # pairs of each batch the alignment InfoNCE uses (its cost grows with the square)
    quantization: float = 0.1
    balance: float = 0.01
    margin: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 80  # a cap: runs stop by early stopping (patience); chapter 3 shows each run's best epoch
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: int = 2
    patience: int = 20  # epochs without validation improvement before stopping
    # validate every N epochs (and at any epoch where the run can stop): for dcmfg a validation builds the whole bank
    # graph, a large share of an epoch's work; the weights of every epoch are the same for any N
    val_every: int = 4
    grad_clip: float = 5.0
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    amp: bool = False  # mixed precision (autocast) for training on CUDA; CPU runs stay float32 and deterministic
    threads: int = 0  # torch threads; 0 = leave torch's default
    progress: bool = True
    select_metric: str = "map_mean"  # validation mAP@all that selects the checkpoint: map_mean | map_i2t | map_t2i
    # The same budget in optimizer steps, for comparing training sizes (a learning curve): each value > 0 replaces
    # its epoch twin by ceil(steps / steps per epoch) (dcmfg.engine.train.epoch_budget); 0 keeps the epoch value.
    max_steps: int = 0  # replaces train.epochs
    patience_steps: int = 0  # replaces train.patience
    val_every_steps: int = 0  # replaces train.val_every
    warmup_steps: int = 0  # replaces train.warmup_epochs


@dataclass
class EvalConfig:
    distance: str = "cosine"  # cosine (real-valued z) | hamming (sign of the hash head)
    chunk_size: int | None = None  # queries (and items embedded) per chunk; the sharding unit under torchrun


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Values a switch may take (dcmfg.choices): checked once at load time so a typo fails before any work is done.
CHOICES: dict[str, type[StrEnum]] = {
    "data.protocol": SplitProtocol,
    "features.on_corrupt": OnCorrupt,
    "graph.relation": Relation,
    "graph.fallback": Fallback,
    "graph.inference": Inference,
    "graph.hubness": Hubness,
    "graph.bank_density": BankDensity,
    "model.attention": Attention,
    "loss.positives": Positives,
    "loss.similarity_kind": SimilarityKind,
    "train.select_metric": SelectMetric,
    "eval.distance": Distance,
}

# Ranges: (lowest allowed, highest allowed or None, whether the lowest itself is allowed). Rates and weights must
# also be finite. Checked at load time, so `train.epochs=0` fails in a second, not after the data is loaded.
RANGES = {
    "features.regions": (1, None, True),
    "features.max_words": (1, None, True),
    "features.image_size": (14, None, True),
    "features.batch_size": (1, None, True),
    "features.workers": (0, None, True),
    "graph.k": (1, None, True),
    "graph.cross_k": (0, None, True),
    "graph.reverse_ratio": (1.0, None, True),
    "model.dim": (1, None, True),
    "model.hidden": (1, None, True),
    "model.layers": (0, None, True),
    "model.heads": (1, None, True),
    "model.token_dim": (1, None, True),
    "model.hash_bits": (1, None, True),
    "model.dropout": (0.0, 1.0, True),
    "model.align_scale": (0.0, None, True),
    "loss.temperature": (0.0, None, False),
    "loss.alignment_batch": (1, None, True),
    "train.epochs": (1, None, True),
    "train.batch_size": (2, None, True),
    "train.lr": (0.0, None, False),
    "train.weight_decay": (0.0, None, True),
    "train.warmup_epochs": (0, None, True),
    "train.patience": (1, None, True),
    "train.val_every": (1, None, True),
    "train.grad_clip": (0.0, None, True),
    "train.threads": (0, None, True),
    "train.max_steps": (0, None, True),
    "train.patience_steps": (0, None, True),
    "train.val_every_steps": (0, None, True),
    "train.warmup_steps": (0, None, True),
}
# Every loss weight is >= 0 (0 switches the term off).
LOSS_WEIGHTS = ("contrastive", "contrastive_pre", "similarity", "label", "hash_contrastive", "alignment",
                "quantization", "balance", "margin")

# Settings that change how a run is shown, not what it computes: left out of the run's identity (config_digest).
# (train.threads stays in: float sums in another order differ in the last bits.)
PRESENTATION = {("train", "progress")}
# Settings added after runs were cached, at the value that computes what those runs computed: left out of the
# identity while at that value, so adding a switch does not retrain every cached run.
SWITCHED_OFF = {("train", "max_steps"): 0, ("train", "patience_steps"): 0, ("train", "val_every_steps"): 0,
                ("train", "warmup_steps"): 0}


def _build(cls, values: dict, prefix: str):
    """Dataclass `cls` from a dict, recursively; unknown keys -> ConfigError naming the key and the valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}; valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
                f"{', '.join(sorted(fields))}"
            )
        sub = _dataclass_type(fields[key])
        kwargs[key] = _build(sub, value, f"{prefix}{key}.") if sub is not None else value
    return cls(**kwargs)


def _dataclass_type(f: dataclasses.Field):
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
    return type(default) if dataclasses.is_dataclass(default) else None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_types(cfg: Config) -> None:
    """Scalar types against the defaults: a YAML typo like `k: eight` fails here, not deep inside a layer."""
    if not _is_int(cfg.seed):
        raise ConfigError(f"config seed={cfg.seed!r} must be an integer")
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        ref = type(obj)()
        for f in dataclasses.fields(obj):
            want, got = getattr(ref, f.name), getattr(obj, f.name)
            name = f"{section.name}.{f.name}"
            if isinstance(want, bool) and not isinstance(got, bool):
                raise ConfigError(f"config {name}={got!r} must be true or false")
            if _is_int(want) and not _is_int(got):
                raise ConfigError(f"config {name}={got!r} must be an integer")
            if isinstance(want, float) and f.type in ("float", float):
                if isinstance(got, str):
                    try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                        got = float(got)
                    except ValueError:
                        pass
                if isinstance(got, bool) or not isinstance(got, (int, float)):
                    raise ConfigError(f"config {name}={got!r} must be a number")
                setattr(obj, f.name, float(got))
            if isinstance(want, str) and not isinstance(got, str):
                raise ConfigError(f"config {name}={got!r} must be a string")
            if isinstance(want, dict) and not isinstance(got, dict):
                raise ConfigError(f"config {name}={got!r} must be a mapping")


def _check_size(name: str, value) -> None:
    """A split size (data.query / val / train), by the rules of the split module (one home for them)."""
    from dcmfg.data.splits import size_problem

    problem = size_problem(name.split(".")[1], value)
    if problem:
        raise ConfigError(f"config {name}={value!r} {problem}")


def _check(cfg: Config) -> Config:
    _check_types(cfg)
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in values(allowed):
            raise ConfigError(f"config {dotted}={value!r} is not one of {', '.join(values(allowed))}")
    for dotted, (low, high, inclusive) in RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config {dotted}={value!r} must be a finite number")
        if value < low or (value == low and not inclusive) or (high is not None and value > high):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise ConfigError(f"config {dotted}={value!r} must be {bound}" + (f" and <= {high}" if high is not None else ""))
    for key in LOSS_WEIGHTS:
        value = getattr(cfg.loss, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"config loss.{key}={value!r} must be a finite number >= 0")
    if cfg.model.dim % cfg.model.heads:
        raise ConfigError(f"config model.dim={cfg.model.dim} must be divisible by model.heads={cfg.model.heads}")
    for part in ("query", "val", "train"):
        _check_size(f"data.{part}", getattr(cfg.data, part))
    if cfg.eval.chunk_size is not None and (not _is_int(cfg.eval.chunk_size) or cfg.eval.chunk_size < 1):
        raise ConfigError(f"config eval.chunk_size={cfg.eval.chunk_size!r} must be null or an integer >= 1")
    for name in ("root", "split"):
        value = getattr(cfg.data, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"config data.{name}={value!r} must be a path (a string) or null")
    from dcmfg.device import check_device_spec

    cfg.train.device = check_device_spec(cfg.train.device)
    return cfg


def config_from_dict(values: dict | None) -> Config:
    return _check(_build(Config, dict(values or {}), ""))


def parse_assignment(item: str, option: str = "--set") -> tuple[str, object]:
    """'a.b=c' -> ('a.b', c), c parsed as a YAML scalar (8 is an int, true a bool, null None, [0, 1] a list).
    The one KEY=VALUE parser of the project (config overrides, dataset options, study settings)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} graph.k=8")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{option} {item!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{option} {item!r}: value is not valid YAML ({exc})") from None
    return key, value


def set_dotted(values: dict, dotted: str, value) -> None:
    """values["a"]["b"] = value for dotted "a.b", creating sections as needed (in place)."""
    node = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"{dotted}={value!r}: {part!r} is a value, not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def get_dotted(values: dict, dotted: str):
    """values["a"]["b"] for dotted "a.b" (a config's `to_dict()` or a plain mapping)."""
    node = values
    for part in dotted.split("."):
        node = node[part]
    return node


def apply_overrides(values: dict, overrides: Iterable[str] | dict = ()) -> dict:
    """`a.b=c` strings (or a {dotted: value} mapping) onto a deep copy of a nested dict."""
    values = json.loads(json.dumps(values))  # deep copy
    pairs = overrides.items() if isinstance(overrides, dict) else (parse_assignment(o) for o in overrides or ())
    for key, value in pairs:
        set_dotted(values, key, value)
    return values


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """YAML file (or the defaults when None) plus `--set` overrides -> a checked Config."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping of sections, got {type(values).__name__}")
    try:
        return config_from_dict(apply_overrides(values, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def config_from_json(text: str) -> Config:
    return config_from_dict(json.loads(text))


def config_digest(cfg: Config) -> str:
    """A short hash of what a run computes (its config minus presentation settings such as progress bars): the
    same digest means the same numbers on the same split, so a finished run can be reused instead of retrained."""
    values = cfg.to_dict()
    for section, key in PRESENTATION:
        values[section].pop(key, None)
    for (section, key), off in SWITCHED_OFF.items():  # a switch added later, left off: the run is the same run
        if values[section].get(key) == off:
            values[section].pop(key)
    for key in ("root", "split"):  # one folder spelled two ways (a/../b, a symlink) is one run
        if values["data"].get(key):
            values["data"][key] = os.path.realpath(values["data"][key])
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
