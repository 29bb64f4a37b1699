"""The standard protocols' parameter sets: every section is one its notebook declares, and their split settings
give the protocol's part sizes on a dataset of the real size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dcmfg import study
from dcmfg.data.base import CrossModalDataset
from dcmfg.data.splits import make_split

REPO = Path(__file__).resolve().parents[1]
# name: (items, queries, database, training pool)
PROTOCOLS = {"mirflickr25k": (20_015, 2_000, 18_015, 10_000), "nuswide": (190_421, 2_100, 188_321, 10_500)}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_protocol_sets_load_and_every_section_is_declared(name):
    import papermill as pm

    p = study.load_params(study.resolve_params_path(name))
    assert p["name"] == name and p["common"]["dataset"] == name and len(p["common"]["seeds"]) >= 5
    for nb in study.notebook_names():
        study.notebook_parameters(p, nb, pm.inspect_notebook(str(REPO / "notebooks" / f"{nb}.ipynb")))


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_protocol_sets_give_the_protocol_sizes(name):
    n, n_query, n_db, n_pool = PROTOCOLS[name]
    c = study.load_params(study.resolve_params_path(name))["common"]
    rng = np.random.default_rng(0)
    ds = CrossModalDataset(name, Path("/nonexistent"), "test", [str(i) for i in range(n)], ["tag"] * n,
                           (rng.random((n, 3)) < 0.5).astype(np.uint8), ["a", "b", "c"],
                           image_paths=[Path(f"im{i}.jpg") for i in range(n)])
    split = make_split(ds, protocol=c["split_protocol"], query=c["query"], train=c["train"], val=c["val"], seed=0)
    sizes = {part: len(split[part]) for part in ("query", "database", "train", "val")}
    assert sizes == {"query": n_query, "database": n_db, "train": n_pool - n_pool // 10, "val": n_pool // 10}
    assert not set(split["val"]) & set(split["train"]) and set(split["train"]) <= set(split["database"])
