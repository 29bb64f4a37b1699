"""Config tree, train/evaluate contract, determinism, exact resume after SIGKILL, bad input (on the synthetic set)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcmfg.config import load_config
from dcmfg.errors import ConfigError, DcmfgError
from dcmfg.engine.data import load_data
from dcmfg.engine.evaluate import evaluate
from dcmfg.engine.train import TrainingDiverged, train

REPO = Path(__file__).resolve().parents[1]

# A small synthetic run: ~85 training pairs, 3 batches an epoch, features extracted once per test session.
SYN = [
    "data.name=synthetic",
    "data.options.n=120",
    "data.options.seed=0",
    "model.dim=64",
    "model.hidden=128",
    "model.token_dim=32",
    "model.hash_bits=16",
    "model.heads=2",
    "graph.k=4",
    "train.batch_size=32",
    "train.epochs=4",
    "train.warmup_epochs=1",
    "train.lr=0.003",
    "train.progress=false",
    "train.val_every=1",  # these tests compare validation curves epoch by epoch
]


def _cfg(*extra, config="configs/dcmfg.yaml"):
    return load_config(REPO / config, SYN + list(extra))


@pytest.fixture(scope="module")
def syn_data():
    """Synthetic features through the real default backbones (cached in DCMFG_CACHE for the session)."""
    return load_data(_cfg())


def _val_curve(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["loss"], r.get("val_map_i2t"), r.get("val_map_t2i")) for r in rows]


def test_config_errors_name_the_key_and_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'graph.kk'.*valid keys under graph: .*k, "):
        load_config(None, ["graph.kk=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*valid keys: data, eval"):
        load_config(None, ["trian.lr=1"])
    cfg = load_config(None, ["graph.k=5", "graph.cross_modal_only=true", "train.lr=1e-4", "data.root=null"])
    assert (cfg.graph.k, cfg.graph.cross_modal_only, cfg.train.lr, cfg.data.root) == (5, True, 1e-4, None)
    with pytest.raises(ConfigError, match="graph.k='five' must be an integer"):
        load_config(None, ["graph.k=five"])
    with pytest.raises(ConfigError, match="model.attention='gat' is not one of"):
        load_config(None, ["model.attention=gat"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: dcmfg\n  layerz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.layerz'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    for name in ("dcmfg", "linear", "dcmh", "dcmht"):
        assert load_config(REPO / "configs" / f"{name}.yaml").model.name == name


def test_train_writes_the_contract_and_evaluate_reproduces_it(tmp_path, syn_data):
    run = tmp_path / "run"
    res = train(_cfg("train.epochs=8"), run, data=syn_data)
    rep = json.loads((run / "report.json").read_text())
    for key in ("map_i2t", "map_t2i", "records", "config", "split_fingerprint", "summaries"):
        assert key in rep
    assert rep["map_i2t"] == res.map_i2t and {"cosine", "hamming"} <= set(rep["summaries"])
    assert {"direction", "metric", "k", "value", "variant", "distance"} <= set(rep["records"][0])
    assert (run / "split.json").is_file() and (run / "best" / "model.safetensors").is_file()
    assert len(_val_curve(run)) == res.history[-1]["epoch"]
    # a random ranking's mAP is about the mean fraction of relevant items; a trained model must beat it clearly
    q, db = syn_data.part("query"), syn_data.part("database")
    rel = ((syn_data.labels[q] @ syn_data.labels[db].T) > 0).float().mean()
    assert rep["map_i2t"] > rel + 0.02 and rep["map_t2i"] > rel + 0.02
    written = (run / "report.json").read_bytes()
    again = evaluate(run, "query")
    assert (run / "report.json").read_bytes() == written and Path(again["path"]).name == "evaluate_query.json"
    assert again["map_i2t"] == pytest.approx(rep["map_i2t"], abs=1e-6)
    assert again["map_t2i"] == pytest.approx(rep["map_t2i"], abs=1e-6)
    val = evaluate(run, "val", out=tmp_path / "val.json")
    assert (tmp_path / "val.json").is_file()
    assert val["map_i2t"] == pytest.approx(json.loads((run / "best" / "meta.json").read_text())["val_map_i2t"], abs=1e-6)
    trans = evaluate(run, "query", out=tmp_path / "trans.json", overrides=["graph.inference=transductive"])
    assert trans["map_i2t"] == pytest.approx(rep["map_i2t"], abs=1e-6)  # inductive numbers unchanged
    assert 0 < trans["transductive"]["map_i2t"] <= 1 and "transductive" in trans["transductive"]["note"]
    with pytest.raises(DcmfgError, match="not a dcmfg checkpoint"):
        evaluate(tmp_path, "query")


@pytest.mark.parametrize("config", ["configs/linear.yaml", "configs/dcmh.yaml", "configs/dcmht.yaml"])
def test_baselines_run_in_the_same_harness(tmp_path, syn_data, config):
    res = train(_cfg("train.epochs=2", config=config), tmp_path / "run", data=syn_data)
    assert 0 < res.map_i2t <= 1 and 0 < res.map_t2i <= 1
    assert res.report["distance"] == load_config(REPO / config).eval.distance


def test_same_seed_gives_identical_metrics(tmp_path, syn_data):
    a = train(_cfg("train.epochs=3"), tmp_path / "a", data=syn_data)
    b = train(_cfg("train.epochs=3"), tmp_path / "b", data=syn_data)
    assert _val_curve(tmp_path / "a") == _val_curve(tmp_path / "b")
    assert (a.map_i2t, a.map_t2i) == (b.map_i2t, b.map_t2i)
    c = train(_cfg("train.epochs=3", "seed=1"), tmp_path / "c", data=syn_data)
    assert _val_curve(tmp_path / "c") != _val_curve(tmp_path / "a")


def test_validating_every_second_epoch_keeps_the_same_weights_and_checks_the_last_epoch(tmp_path, syn_data):
    every = train(_cfg("train.epochs=5"), tmp_path / "every", data=syn_data)
    second = train(_cfg("train.epochs=5", "train.val_every=2"), tmp_path / "second", data=syn_data)
    a, b = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("every", "second"))
    assert [r["epoch"] for r in b if "val_map_mean" in r] == [2, 4, 5]  # every 2nd, and the cap
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # validation changes nothing in training
    for ra, rb in zip(a, b):
        if "val_map_mean" in rb:
            assert (rb["val_map_i2t"], rb["val_map_t2i"]) == (ra["val_map_i2t"], ra["val_map_t2i"])
    assert second.best_epoch in (2, 4, 5)
    best_of_validated = max((r for r in a if r["epoch"] in (2, 4, 5)), key=lambda r: r["val_map_mean"])["epoch"]
    assert second.best_epoch == best_of_validated
    # patience counts epochs: with patience 3 a run may stop on an odd epoch, and that epoch is validated
    train(_cfg("train.epochs=40", "train.val_every=2", "train.patience=3"), tmp_path / "p", data=syn_data)
    short = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert "val_map_mean" in short[-1]


def test_a_step_budget_is_the_epoch_budget_it_converts_to(tmp_path, syn_data):
    # ~85 training pairs at batch 32: 3 steps an epoch; 13, 6, 4 and 60 steps round up to 5, 2, 2 and 20 epochs
    steps = train(_cfg("train.max_steps=13", "train.val_every_steps=6", "train.warmup_steps=4",
                       "train.patience_steps=60"), tmp_path / "steps", data=syn_data)
    epochs = train(_cfg("train.epochs=5", "train.val_every=2", "train.warmup_epochs=2", "train.patience=20"),
                   tmp_path / "epochs", data=syn_data)
    assert _val_curve(tmp_path / "steps") == _val_curve(tmp_path / "epochs")
    assert steps.report["budget"] == {"epochs": 5, "patience": 20, "val_every": 2, "warmup_epochs": 2,
                                      "steps_per_epoch": 3}
    assert epochs.report["budget"]["epochs"] == 5 and (steps.map_i2t, steps.map_t2i) == (epochs.map_i2t, epochs.map_t2i)


def test_epoch_budget_rounds_steps_up_to_whole_epochs():
    from dcmfg.engine.train import epoch_budget

    tc = load_config(REPO / "configs/dcmfg.yaml", ["train.max_steps=700", "train.patience_steps=100"]).train
    def triple(b):
        return b.epochs, b.patience, b.val_every

    assert triple(epoch_budget(tc, 35)) == (20, 3, tc.val_every)  # 700 / 35; ceil(100 / 35); val_every kept
    assert triple(epoch_budget(tc, 5)) == (140, 20, tc.val_every)
    assert triple(epoch_budget(load_config(REPO / "configs/dcmfg.yaml").train, 35)) == (80, 20, 4)  # epochs as given


def test_a_run_leaves_the_callers_thread_count_as_it_was(tmp_path, syn_data):
    # a notebook or test that trains twice in one process must not inherit the first run's train.threads
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(_cfg("train.epochs=1", "train.threads=1"), tmp_path / "a", data=syn_data)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("val_every", [1, 2])  # with 2 the resume point is older than the last logged epoch
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, syn_data, val_every):
    # threads pinned for both runs: float sums are bit-identical only at the same thread count
    over = ["train.epochs=6", "train.patience=100", "train.threads=1", f"train.val_every={val_every}"]
    ref = train(_cfg(*over), tmp_path / "ref", data=syn_data)
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dcmfg.engine.train", "--config", str(REPO / "configs/dcmfg.yaml"), "--out", str(run)]
    for s in SYN + over:
        cmd += ["--set", s]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    # kill as soon as three epochs are logged: the process is then inside epoch 4 (or saving it)
    while proc.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    assert proc.poll() is None, f"run finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "report.json").exists()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _val_curve(run) == _val_curve(tmp_path / "ref")
    rep = json.loads((run / "report.json").read_text())
    assert (rep["map_i2t"], rep["map_t2i"]) == (ref.map_i2t, ref.map_t2i)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, syn_data):
    run = tmp_path / "run"
    train(_cfg("train.epochs=2"), run, data=syn_data)
    before = {p.name: p.read_bytes() for p in (run / "last").iterdir()}
    lines = (run / "metrics.jsonl").read_text()
    # the same data with one training item's image features broken (NaN): extending the run must stop cleanly
    feats = dict(syn_data.feats)
    bad = feats["image_global"].clone()
    bad[int(syn_data.part("train")[0])] = float("nan")
    feats["image_global"] = bad
    broken = type(syn_data)(syn_data.dataset, syn_data.split, feats, syn_data.labels, syn_data.valid, syn_data.feature_key)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 3.*Last good checkpoint: .*last \(after epoch 2\)"):
        train(_cfg("train.epochs=4"), run, data=broken)
    assert {p.name: p.read_bytes() for p in (run / "last").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == lines


def test_resume_refuses_another_config_and_k_larger_than_the_graph(tmp_path, syn_data):
    run = tmp_path / "run"
    train(_cfg("train.epochs=1"), run, data=syn_data)
    with pytest.raises(ConfigError, match=r"different config \(graph.k: 4 -> 5"):
        train(_cfg("train.epochs=1", "graph.k=5"), run, data=syn_data)
    with pytest.raises(ConfigError, match="graph.k=500 is larger than the graph"):
        train(_cfg("train.epochs=1", "graph.k=500"), tmp_path / "k", data=syn_data)


def test_cli_train_and_evaluate_one_line_errors(tmp_path, syn_data, capsys):
    from dcmfg.engine.train import main

    rc = main(["--config", str(REPO / "configs/dcmfg.yaml"), "--out", str(tmp_path / "r"), "--set", "graph.nope=1"])
    assert rc == 2 and "unknown config key 'graph.nope'" in capsys.readouterr().err
    from dcmfg.cli import main as dcmfg

    assert dcmfg(["evaluate", "--checkpoint", str(tmp_path / "missing"), "--split", "query"]) == 2
    assert "missing: run or checkpoint folder not found" in capsys.readouterr().err
    assert dcmfg(["evaluate", "--checkpoint", str(tmp_path), "--split", "query"]) == 2
    assert "not a dcmfg checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("n,batch_size", [(200, 128), (526, 128), (10, 4), (64, 64)])
def test_batches_cover_every_item_once(n, batch_size):
    from dcmfg.engine.train import batches

    chunks = batches(n, batch_size, torch.Generator().manual_seed(0))
    allidx = torch.cat(chunks)
    assert sorted(allidx.tolist()) == list(range(n))  # each item trained exactly once per epoch
    assert all(len(c) >= batch_size // 2 for c in chunks)


def _cli_cmd(run: Path, *settings: str) -> list[str]:
    cmd = [sys.executable, "-m", "dcmfg.cli", "train", "--config", str(REPO / "configs/dcmfg.yaml"), "--out", str(run)]
    for s in SYN + list(settings):
        cmd += ["--set", s]
    return cmd


@pytest.mark.slow
@pytest.mark.parametrize("val_every", [1, 4])  # with 4 the interrupt comes before the first resume point
def test_ctrl_c_exits_130_with_one_line_and_leaves_a_resumable_run(tmp_path, syn_data, val_every):
    run = tmp_path / "run"
    cmd = _cli_cmd(run, "train.epochs=8", "train.patience=100", f"train.val_every={val_every}")
    # SIGINT handled as in a terminal's foreground, even when the tests run from a background shell (which starts
    # children with SIGINT ignored)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1].strip().splitlines()
    assert proc.returncode == 130, err
    if val_every == 1:
        assert len(err) == 1 and err[0].startswith("dcmfg: interrupted; the checkpoint of epoch ") and "resume" in err[0]
    else:  # an epoch ran, none was validated yet: the line says so, not "no epoch had finished"
        assert len(err) == 1 and re.match(r"dcmfg: interrupted; no checkpoint yet: [1-3] epoch\(s\) ran, .*"
                                          r"train.val_every=4\) \(run the same command again to start\)", err[0]), err
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], sorted(run.rglob("*"))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [e for e, *_ in _val_curve(run)] == list(range(1, 9))


def test_a_finished_run_is_replaced_only_with_overwrite(tmp_path, syn_data, capsys):
    from dcmfg.cli import main

    run = tmp_path / "run"
    train(_cfg("train.epochs=1"), run, data=syn_data)
    before = (run / "report.json").read_bytes()
    args = ["train", "--config", str(REPO / "configs/dcmfg.yaml"), "--out", str(run), "--no-resume"]
    args += [x for s in SYN + ["train.epochs=2"] for x in ("--set", s)]
    assert main(args) == 2
    assert f"{run} holds a finished run (report.json); pass --overwrite" in capsys.readouterr().err
    assert (run / "report.json").read_bytes() == before
    assert main(args + ["--overwrite"]) == 0
    assert [e for e, *_ in _val_curve(run)] == [1, 2]


def test_a_run_is_scored_on_its_own_split_copy(tmp_path, syn_data, capsys):
    from dcmfg.cli import main
    from dcmfg.data.splits import make_split, save_split
    from dcmfg.fileio import file_sha256

    split = save_split(make_split(syn_data.dataset, query=0.2, val=0.1, seed=0), tmp_path / "split.json")
    run = tmp_path / "run"
    res = train(_cfg("train.epochs=2", f"data.split={split}"), run)
    assert (run / "split.json").read_bytes() == split.read_bytes()
    assert json.loads((run / "best" / "meta.json").read_text())["split_sha256"] == file_sha256(split)
    # the user draws another split into the same file: the old run must still be scored on its own
    save_split(make_split(syn_data.dataset, query=0.2, val=0.1, seed=1), split)
    assert main(["evaluate", "--checkpoint", str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"note: {split} now holds another split than the one this run was trained on" in out
    again = json.loads((run / "evaluate_query.json").read_text())
    assert (again["map_i2t"], again["map_t2i"]) == pytest.approx((res.map_i2t, res.map_t2i), abs=1e-6)
    # a changed copy inside the run folder is refused: its scores would not be the run's
    save_split(make_split(syn_data.dataset, query=0.2, val=0.1, seed=2), run / "split.json")
    assert main(["evaluate", "--checkpoint", str(run), "--device", "cpu"]) == 2
    assert "split.json: the run's split copy has changed since training" in capsys.readouterr().err


def test_damaged_checkpoint_files_are_one_line_errors(tmp_path, syn_data, capsys):
    from dcmfg.cli import main

    run = tmp_path / "run"
    train(_cfg("train.epochs=1"), run, data=syn_data)
    for name in ("config.json", "meta.json"):
        path = run / "best" / name
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])
        assert main(["evaluate", "--checkpoint", str(run), "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"dcmfg: error: {path}: unreadable") and "\n" not in err, err
        path.write_bytes(good)
    state = run / "last" / "state.json"
    state.write_text(state.read_text()[:50])
    with pytest.raises(ConfigError, match=r"state.json: unreadable .*damaged"):
        train(_cfg("train.epochs=2"), run, data=syn_data)


@pytest.mark.parametrize("metric", ["map_i2t", "map_t2i"])
def test_select_metric_selects_by_the_named_direction(tmp_path, syn_data, metric):
    run = tmp_path / "run"
    res = train(_cfg("train.epochs=4", "train.patience=100", f"train.select_metric={metric}"), run, data=syn_data)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"val_{metric}"] for r in rows]
    assert res.best_epoch == 1 + values.index(max(values)) and res.best_val == max(values)
    assert res.report["select_metric"] == metric
