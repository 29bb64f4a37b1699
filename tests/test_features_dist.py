"""torchrun extraction: 2 CPU processes (gloo) share the chunks of one cache and write exactly the bytes a single
process writes; each rank gets the whole FeatureSet back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcmfg.config import FeatureConfig
from dcmfg.data import load_dataset
from dcmfg.features import extract_features

REPO = Path(__file__).resolve().parents[1]
IDS = [1, 2, 3, 4, 5, 6]
FIELDS = ("image_global", "image_regions", "text_global", "text_words", "text_mask", "valid")

# What each torchrun rank runs: the library call a training script makes under an initialised process group.
RANK_SCRIPT = """
import sys
import torch.distributed as dist
from safetensors.torch import save_file
from dcmfg.config import FeatureConfig
from dcmfg.data import load_dataset
from dcmfg.features import extract_features

dist.init_process_group("gloo")
ds = load_dataset("manifest", sys.argv[1])
fs = extract_features(ds, FeatureConfig(batch_size=2, image_size=112), cache_root=sys.argv[2], chunk_size=2,
                      progress=False, device="cpu", on_chunk=lambda f: print("wrote", f, flush=True))
save_file({k: getattr(fs, k).contiguous() for k in %r}, f"{sys.argv[3]}/rank{dist.get_rank()}.safetensors")
dist.destroy_process_group()
""" % (FIELDS,)


def _manifest_dataset(root: Path, folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in IDS:
        shutil.copy(root / "mirflickr" / f"im{i}.jpg", folder / "img" / f"im{i}.jpg")
        tags = (root / "mirflickr" / "meta" / "tags" / f"tags{i}.txt").read_text().split()
        lines.append(json.dumps({"image": f"img/im{i}.jpg", "text": " ".join(tags) or "none", "labels": ["a"]}))
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "items.jsonl"


def _files(cache: Path) -> dict[str, bytes]:
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors",)
            or p.name.endswith(".files.json")}


@pytest.mark.slow
def test_two_gloo_ranks_write_what_one_process_writes(mirflickr_root, tmp_path):
    items = _manifest_dataset(mirflickr_root, tmp_path / "data")
    # Reference: one process, one thread (as each torchrun rank gets), in its own interpreter.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    single = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script), str(items),
         str(tmp_path / "one"), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    (tmp_path / "rank0.safetensors").rename(tmp_path / "single.safetensors")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(items),
         str(tmp_path / "two"), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # both ranks wrote chunks: 3 image + 3 text chunks shared out
    assert done.stdout.count("wrote") == 6 and single.stdout.count("wrote") == 6
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 9 and one.keys() == two.keys()
    for name in one:
        assert one[name] == two[name], name  # byte for byte
    m_one = json.loads((next((tmp_path / "one").iterdir()) / "manifest.json").read_text())
    m_two = json.loads((next((tmp_path / "two").iterdir()) / "manifest.json").read_text())
    assert m_two["complete"] and m_one["chunks"] == m_two["chunks"]
    assert not list(next((tmp_path / "two").iterdir()).glob("manifest.rank*"))  # merged by rank 0
    ref = load_file(str(tmp_path / "single.safetensors"))
    for r in (0, 1):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        for k in FIELDS:
            assert torch.equal(got[k], ref[k]), (r, k)
    # and the cache the two ranks wrote is a complete cache hit for an ordinary process
    hit = extract_features(load_dataset("manifest", items), FeatureConfig(batch_size=2, image_size=112),
                           cache_root=tmp_path / "two", chunk_size=2, progress=False)
    assert hit.meta["from_cache"]
    assert torch.equal(hit.image_regions, ref["image_regions"])
