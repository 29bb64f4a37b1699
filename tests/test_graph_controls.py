"""The graph's controls and statistics end to end on the synthetic set: report['graph'], per-epoch graph statistics
in metrics.jsonl, and the same trained weights scored without the graph (graph.inference=none) or with bank
smoothing, through `dcmfg evaluate --set graph.inference=...`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dcmfg.engine.data import load_data
from dcmfg.config import load_config
from dcmfg.engine.evaluate import evaluate
from dcmfg.engine.train import train

REPO = Path(__file__).resolve().parents[1]
SYN = ["data.name=synthetic", "data.options.n=120", "data.options.seed=0", "model.dim=64", "model.hidden=128",
       "model.token_dim=32", "model.hash_bits=16", "model.heads=2", "graph.k=4", "train.batch_size=32",
       "train.epochs=3", "train.warmup_epochs=1", "train.lr=0.003", "train.progress=false"]


pytestmark = pytest.mark.slow  # trains real runs: the complete suite's tier, not the edit-test loop

def _cfg(*extra):
    return load_config(REPO / "configs/dcmfg.yaml", SYN + list(extra))


@pytest.fixture(scope="module")
def syn_data():
    return load_data(_cfg())


def test_graph_statistics_are_recorded_in_training_and_in_the_report(tmp_path, syn_data):
    run = tmp_path / "run"
    train(_cfg(), run, data=syn_data)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert 0 <= r["graph_mutual_share"] <= 1 and 0 <= r["graph_fallback_share"] <= 1
        assert r["graph_mutual_share"] + r["graph_fallback_share"] <= 1 + 1e-9
        assert {"graph_in_degree", "graph_out_degree", "graph_cross_share", "graph_hubness",
                "graph_attention_entropy"} <= set(r)
    g = json.loads((run / "report.json").read_text())["graph"]
    assert 0 <= g["query_mutual_share"] <= 1 and g["inference"] == "bank" and g["query_in_degree"] >= 1
    assert g["query_mutual_share"] + g["query_fallback_share"] <= 1 + 1e-9
    assert 0 <= g["bank"]["mutual_share"] <= 1 and g["bank"]["cross_share"] == 1.0  # cross_modal_only
    # the same weights without the graph, and with bank smoothing
    none = evaluate(run, "query", out=tmp_path / "none.json", overrides=["graph.inference=none"])
    smooth = evaluate(run, "query", out=tmp_path / "smooth.json", overrides=["graph.inference=smooth"])
    bank = evaluate(run, "query", out=tmp_path / "bank.json")
    assert none["graph"] == {} and smooth["graph"]["inference"] == "smooth"
    assert bank["graph"]["query_mutual_share"] == pytest.approx(g["query_mutual_share"])
    assert len({round(r["map_i2t"], 6) for r in (none, smooth, bank)}) == 3  # three different embeddings


def test_layers_zero_is_the_graph_free_control(tmp_path, syn_data):
    run = tmp_path / "flat"
    res = train(_cfg("model.layers=0"), run, data=syn_data)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("graph_") for k in rows[0])
    assert {"contrastive", "contrastive_pre", "alignment", "label"} <= set(rows[0])  # the same losses
    assert res.report["graph"] == {}
    none = evaluate(run, "query", out=tmp_path / "none.json", overrides=["graph.inference=none"])
    assert none["map_i2t"] == pytest.approx(res.map_i2t, abs=1e-6)  # no layers: bank inference is no graph
