"""Evaluation sharded over queries under torchrun: 2 CPU processes (gloo) give the single process's report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from dcmfg.metrics import retrieval_report

REPO = Path(__file__).resolve().parents[1]

RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_dist_eval import case
from dcmfg.metrics import retrieval_report

dist.init_process_group("gloo")
for distance in ("cosine", "hamming"):
    args, kw = case(distance)
    df = retrieval_report(*args, distributed=True, **kw)
    df.to_pickle(f"{sys.argv[1]}/{distance}-rank{dist.get_rank()}.pkl")
dist.destroy_process_group()
"""


def case(distance: str):
    """Inputs of one report: 37 queries in chunks of 4 (10 chunks, shared 5 + 5), ties in the Hamming codes."""
    g = torch.Generator().manual_seed(3)
    labels = lambda n: (torch.rand(n, 6, generator=g) < 0.3).float()  # noqa: E731
    x = lambda n: torch.randn(n, 16, generator=g)  # noqa: E731
    emb = [x(37), x(37), x(90), x(90)]
    if distance == "hamming":
        emb = [torch.sign(e[:, :8]) for e in emb]
    kw = dict(distance=distance, ks=(1, 5, 50), map_k=(None, 20), chunk_size=4, denominators=("relevant", "retrieved"))
    return (*emb, labels(37), labels(90)), kw


@pytest.mark.slow
def test_report_sharded_over_two_ranks_equals_one_process(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path), str(REPO / "tests")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for distance in ("cosine", "hamming"):
        args, kw = case(distance)
        single = retrieval_report(*args, **kw)
        for r in (0, 1):
            got = pd.read_pickle(tmp_path / f"{distance}-rank{r}.pkl")
            pd.testing.assert_frame_equal(got, single, check_exact=True)  # same chunks, so every bit the same
        assert single["value"].notna().sum() > 20


def test_distributed_flag_without_a_process_group_is_the_plain_report():
    args, kw = case("cosine")
    pd.testing.assert_frame_equal(retrieval_report(*args, distributed=True, **kw), retrieval_report(*args, **kw),
                                  check_exact=True)


# A small trained run to evaluate: synthetic set, tiny model, one epoch.
RUN_SETS = [
    "data.name=synthetic", "data.options.n=120", "data.options.seed=0", "model.dim=64", "model.hidden=128",
    "model.token_dim=32", "model.hash_bits=16", "model.heads=2", "graph.k=4", "train.batch_size=32",
    "train.epochs=1", "train.warmup_epochs=1", "train.progress=false",
]


def _evaluate(run: Path, out: Path, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "dcmfg.cli", "evaluate", "--checkpoint", str(run), "--out", str(out), "--device", "cpu",
           "--set", "eval.chunk_size=16"]  # 16-item chunks: 120 items in 8 chunks, 4 per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("mAP@all") == 1  # one report line, from rank 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_evaluation_on_two_ranks_equals_one_process(tmp_path):
    from dcmfg.config import load_config
    from dcmfg.engine.train import train

    run = train(load_config(REPO / "configs/dcmfg.yaml", RUN_SETS), tmp_path / "run").out_dir
    one = _evaluate(run, tmp_path / "one.json", 1)
    two = _evaluate(run, tmp_path / "two.json", 2)
    assert one["n_query"] == 24 and one["n_database"] == 96
    for key in ("map_i2t", "map_t2i", "summaries", "records"):
        assert two[key] == one[key], key  # every number, exactly
    assert len(one["records"]) > 100
