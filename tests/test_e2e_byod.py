"""End to end on bring-your-own data: `dcmfg data split`, `dcmfg train`, `dcmfg evaluate` (through dcmfg.cli.main)
on a generated JSONL manifest and a generated COCO-layout folder, with the real offline backbones and a tiny config.

Images are coloured by their labels (one colour per label, blended) and texts name the labels, so a few epochs
must rank better than chance; the check is against the label-prior expectation, measured on the same split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcmfg.cli import main
from dcmfg.data import load_dataset
from dcmfg.data.splits import load_split

REPO = Path(__file__).resolve().parents[1]
NAMES = ["cat", "dog", "car", "tree"]
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 230], [230, 210, 40]], dtype=np.float64)
NOUNS = {"cat": "a small cat", "dog": "a happy dog", "car": "a parked car", "tree": "a tall tree"}


def _items(n: int, seed: int) -> list[list[int]]:
    """n label sets of 1-2 labels out of 4 (seeded)."""
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(4, size=1 + (rng.random() < 0.3), replace=False).tolist()) for _ in range(n)]


def _image(labels: list[int], rng: np.random.Generator, path: Path) -> None:
    """Left/right halves in the colours of the labels, plus noise: images of one label look alike."""
    arr = np.empty((64, 64, 3))
    arr[:, :32] = COLOURS[labels[0]]
    arr[:, 32:] = COLOURS[labels[-1]]
    arr += rng.normal(0, 20, arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)


def _captions(labels: list[int], k: int) -> list[str]:
    things = " and ".join(NOUNS[NAMES[c]] for c in labels)
    forms = [f"a photo of {things}", f"{things} in the picture", f"there is {things} here"]
    return forms[:k]


def _manifest(root: Path, n: int = 40) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for i, labels in enumerate(_items(n, 1)):
        _image(labels, rng, root / "images" / f"{i:03d}.jpg")
        lines.append({"image": f"images/{i:03d}.jpg", "text": _captions(labels, 1 + i % 2),
                      "labels": [NAMES[c] for c in labels]})
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def _coco(root: Path, n: int = 36) -> Path:
    """Official 2014 layout, all in train2014 plus a small val2014; one image without instances (dropped)."""
    rng = np.random.default_rng(2)
    cats = [{"supercategory": "x", "id": cid, "name": NAMES[k]} for k, cid in enumerate([17, 18, 3, 64])]
    (root / "annotations").mkdir(parents=True)
    sets = _items(n, 2)
    for split, ids in (("train", range(0, n - 8)), ("val", range(n - 8, n))):
        name = f"{split}2014"
        images, caps, insts = [], [], []
        for i in ids:
            fname = f"COCO_{name}_{i + 1:012d}.jpg"
            _image(sets[i], rng, root / name / fname)
            images.append({"id": i + 1, "file_name": fname, "height": 64, "width": 64})
            for k, c in enumerate(_captions(sets[i], 2 + i % 2)):
                caps.append({"id": 10 * (i + 1) + k, "image_id": i + 1, "caption": c})
            if i != 3:  # image 4 has no instance: dropped and counted
                for c in sets[i]:
                    insts.append({"id": len(insts) + 1, "image_id": i + 1, "category_id": cats[c]["id"],
                                  "bbox": [0, 0, 8, 8], "area": 64.0, "iscrowd": 0, "segmentation": [[0, 0, 8, 0, 8, 8]]})
        (root / "annotations" / f"captions_{name}.json").write_text(json.dumps({"images": images, "annotations": caps}))
        (root / "annotations" / f"instances_{name}.json").write_text(
            json.dumps({"images": images, "annotations": insts, "categories": cats}))
    return root


TINY = [
    "train.epochs=4", "train.batch_size=16", "train.warmup_epochs=1", "train.progress=false", "train.patience=4",
    "model.dim=64", "model.hidden=128", "model.token_dim=32", "model.hash_bits=16", "graph.k=3",
    "features.image_size=112", "features.batch_size=16",
]


def _chance_map(ql: np.ndarray, dl: np.ndarray) -> float:
    """Expected AP of a random ranking = fraction of relevant items in the database, averaged over queries."""
    rel = (ql.astype(np.int64) @ dl.T.astype(np.int64)) > 0
    return float(rel.mean(1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["manifest", "mscoco"])
def test_split_train_evaluate(kind, tmp_path, capsys):
    root = _manifest(tmp_path / "byod") if kind == "manifest" else _coco(tmp_path / "coco")
    split_path, run = tmp_path / "split.json", tmp_path / "run"
    opt = ["--option", "captions=all"]
    assert main(["data", "split", kind, "--root", str(root), "--query", "8", "--val", "4", "--seed", "3",
                 "--out", str(split_path), *opt]) == 0
    ds = load_dataset(kind, root, captions="all")
    split = load_split(split_path, ds)
    assert ds.groups is not None and len(ds) > len(np.unique(ds.groups))
    q_groups, db_groups = set(ds.groups[split["query"]]), set(ds.groups[split["database"]])
    assert len(q_groups) == 8 and not q_groups & db_groups  # siblings never straddle query / database

    sets = [f"data.name={kind}", f"data.root={root}", f"data.split={split_path}", "data.options={captions: all}"]
    overrides = [a for s in sets + TINY for a in ("--set", s)]
    assert main(["train", "--config", str(REPO / "configs" / "dcmfg.yaml"), *overrides, "--out", str(run)]) == 0
    assert (run / "best" / "model.safetensors").is_file() and (run / "report.json").is_file()

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    rep = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((run / "report.json").read_text())
    assert rep["split_fingerprint"] == split.fingerprint
    assert rep["n_query"] == len(split["query"]) and rep["n_database"] == len(split["database"])
    # The image side counts each image once; the text side keeps every caption.
    assert rep["n_query_images"] == 8 and rep["n_database_images"] == len(db_groups)
    assert {r["direction"] for r in rep["records"]} == {"I->T", "T->I"}
    # Evaluating the saved checkpoint reproduces the training run's own report.
    assert rep["map_i2t"] == pytest.approx(trained["map_i2t"], abs=1e-6)
    assert rep["map_t2i"] == pytest.approx(trained["map_t2i"], abs=1e-6)
    chance = _chance_map(ds.labels[split["query"]], ds.labels[split["database"]])
    print(kind, "chance", chance, "i2t", rep["map_i2t"], "t2i", rep["map_t2i"])
    assert rep["map_i2t"] > chance + 0.05 and rep["map_t2i"] > chance + 0.05
