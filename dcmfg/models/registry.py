"""Models by name (timm-style): the one table of every model the harness can train and evaluate.

The table names each model's module and class, so it is complete as soon as it is imported, and importing it pulls
in no model code (no import cycle between the DCMFG model and the baselines). Every model it builds has the shared
surface `dcmfg.models.base.RetrievalModel`, checked when it is built.
"""

from __future__ import annotations

import importlib

from dcmfg.errors import ConfigError
from dcmfg.models.base import RetrievalModel

MODELS: dict[str, str] = {
    "dcmfg": "dcmfg.models.dcmfg:DCMFG",
    "linear": "dcmfg.models.baselines:LinearModel",
    "dcmh": "dcmfg.models.baselines:DCMH",
    "dcmht": "dcmfg.models.baselines:DCMHT",
}


def model_class(name: str):
    if name not in MODELS:
        raise ConfigError(f"unknown model.name {name!r}; available: {', '.join(sorted(MODELS))}")
    module, cls = MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_model(name: str, cfg, image_dim: int, text_dim: int, num_labels: int) -> RetrievalModel:
    """A model by registry name, built for the given feature widths and label count."""
    model = model_class(name)(cfg, image_dim, text_dim, num_labels)
    if not isinstance(model, RetrievalModel):
        raise TypeError(f"{MODELS[name]} lacks the model surface of dcmfg.models.base.RetrievalModel")
    return model
