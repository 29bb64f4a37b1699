"""One config tree for training and evaluation: dataclasses, YAML in, `--set a.b=c` overrides.

Every choice method.md leaves open is a field here, so that ablations are config changes, not code changes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from dcmfg.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "mirflickr25k"
    root: str | None = None  # may be omitted for "synthetic"
    split: str | None = None  # split file; None = make a seeded random split and save it into the run folder
    options: dict = field(default_factory=dict)  # passed to load_dataset (e.g. n, seed for synthetic)
    protocol: str = "random"
    query: float = 0.2
    val: float = 0.1


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
    cross_modal_only: bool = False
    # Extra cross-modal neighbours (0 = none): the union with the mutual-kNN edges among the other modality's nodes
    # only, with this k. Without it the modality gap (image-image and text-text cosines far above image-text)
    # leaves a plain kNN graph with hardly any cross-modal edge, and the alignment term never acts.
    cross_k: int = 0
    fallback: str = "nearest"  # nearest | none: what a node without a (mutual) neighbour gets
    rebuild_per_layer: bool = True  # DynamicEdgeConv-style: rebuild the graph before every layer
    # Drop the edge between an item's image and its own text in training and bank graphs: a query never has its
    # partner in the bank, so a model trained with that edge would learn to copy from a neighbour it lacks later.
    exclude_pair: bool = True
    inference: str = "bank"  # bank (inductive) | transductive (adds separate re-ranked numbers to the report)


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
    num_labels: int = 0  # filled from the dataset at train time


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
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: int = 2
    patience: int = 10  # epochs without validation improvement before stopping
    grad_clip: float = 5.0
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    amp: bool = False  # mixed precision (autocast) for training on CUDA; CPU runs stay float32 and deterministic
    threads: int = 0  # torch threads; 0 = leave torch's default
    progress: bool = True
    select_metric: str = "map_mean"  # validation mAP@all mean of both directions


@dataclass
class EvalConfig:
    distance: str = "cosine"  # cosine (real-valued z) | hamming (sign of the hash head)
    chunk_size: int | None = None


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


# Values a switch may take: checked once at load time so a typo fails before any work is done.
CHOICES = {
    "graph.relation": ("mutual", "knn", "static"),
    "graph.fallback": ("nearest", "none"),
    "graph.inference": ("bank", "transductive"),
    "model.attention": ("alignment", "gatv2", "none"),
    "loss.positives": ("label", "pair"),
    "loss.similarity_kind": ("likelihood", "margin"),
    "eval.distance": ("cosine", "hamming"),
}


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


def _check(cfg: Config) -> Config:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"config {dotted}={value!r} is not one of {', '.join(allowed)}")
    # Types of scalar fields: a YAML typo like `k: eight` should fail here, not deep inside a layer.
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        ref = type(obj)()
        for f in dataclasses.fields(obj):
            want, got = getattr(ref, f.name), getattr(obj, f.name)
            if isinstance(want, bool) and not isinstance(got, bool):
                raise ConfigError(f"config {section.name}.{f.name}={got!r} must be true or false")
            if isinstance(want, int) and not isinstance(want, bool) and not (isinstance(got, int) and not isinstance(got, bool)):
                raise ConfigError(f"config {section.name}.{f.name}={got!r} must be an integer")
            if isinstance(want, float) and isinstance(got, str):
                try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                    got = float(got)
                except ValueError:
                    pass
            if isinstance(want, float):
                if isinstance(got, bool) or not isinstance(got, (int, float)):
                    raise ConfigError(f"config {section.name}.{f.name}={got!r} must be a number")
                setattr(obj, f.name, float(got))
            if isinstance(want, str) and not isinstance(got, str):
                raise ConfigError(f"config {section.name}.{f.name}={got!r} must be a string")
    if cfg.graph.k < 1:
        raise ConfigError(f"config graph.k={cfg.graph.k} must be >= 1")
    if cfg.model.dim % max(cfg.model.heads, 1):
        raise ConfigError(f"config model.dim={cfg.model.dim} must be divisible by model.heads={cfg.model.heads}")
    return cfg


def config_from_dict(values: dict | None) -> Config:
    return _check(_build(Config, dict(values or {}), ""))


def apply_overrides(values: dict, overrides: Iterable[str]) -> dict:
    """`a.b=c` strings onto a nested dict; c is parsed as a YAML scalar (so 8 is int, true is bool, null is None)."""
    values = json.loads(json.dumps(values))  # deep copy
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set graph.k=8")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
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
