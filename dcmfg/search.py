"""Search a trained run with a query of your own: a free text, an image file, or an item of the dataset.

`open_run(RUN)` loads a run once (model, data, bank, database embeddings); `search(run, text=...)` (or image=,
item=) embeds the query exactly as evaluation embeds a query item (the run's own backbones and feature settings,
features rounded to float16 as the feature cache stores them, inductive against the run's bank, independent of
any other query) and ranks the run's database by cosine or Hamming, ties to the lower database position as in
the metrics. `dcmfg search --run RUN --text "dog on a beach"` is the command; the explorer
(`dcmfg.study.explorer`) and the book call the same functions.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from dcmfg.backbones import create_image_encoder, create_text_encoder
from dcmfg.choices import Against, Distance, check
from dcmfg.data.base import ImageReadError, read_image_file
from dcmfg.engine.data import take
from dcmfg.engine.evaluate import codes, embed_parts, load_run
from dcmfg.errors import DcmfgError
from dcmfg.explain import words_of as tokenizer_words
from dcmfg.graph.knn import topk_stable
from dcmfg.modality import IMAGE, TEXT, Modality

# what each `against` ranks: the database side of that modality
AGAINST = {Against.IMAGES: IMAGE, Against.TEXTS: TEXT}
# an item query's side, by its modality's key ("image", "text")
MODALITY_OF_KEY = {m.key: m for m in Modality}


class QueryError(DcmfgError, ValueError):
    """A query that cannot be searched: empty text, unreadable image, unknown item id."""


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """A trained run, loaded once and ready for any number of queries."""

    path: Path
    model: torch.nn.Module
    cfg: object
    meta: dict
    data: object  # DataBundle
    train_idx: np.ndarray  # the bank's items (training split), in bank order
    db_idx: np.ndarray  # the database items, in ranking-tie order
    bank: object  # model.build_bank(...) or None for graph-free models
    database: dict  # {"image": {"z", "h"}, "text": {...}}: the database embedded as evaluation embeds it
    _row_of_id: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """A short label: model name, its graph depth for DCMFG, and the run folder."""
        m = self.cfg.model
        depth = f" L={m.layers}" if m.name == "dcmfg" else ""
        return f"{m.name}{depth} ({self.path.name})"

    @property
    def dataset(self):
        return self.data.dataset

    def has_hash(self) -> bool:
        return "h" in self.database[IMAGE.key]

    def row_of(self, item_id: str) -> int:
        """Dataset row of an item id (as in the dataset's ids)."""
        if not self._row_of_id:
            self._row_of_id.update({str(x): i for i, x in enumerate(self.dataset.ids)})
        try:
            return self._row_of_id[str(item_id)]
        except KeyError:
            ids = self.dataset.ids
            raise QueryError(
                f"no item {item_id!r} in {self.dataset.name} ({len(ids)} items, ids like {', '.join(map(str, ids[:3]))})"
            ) from None


def open_run(path) -> Run:
    """Load a run folder (its best/ checkpoint) or a checkpoint folder, with its data (checked against what it was
    trained on, as evaluation checks it), its bank and its database embedded as evaluation embeds it."""
    model, cfg, meta, data = load_run(path)
    train_idx, db_idx = data.part("train"), data.part("database")
    with torch.no_grad():
        bank = model.build_bank(take(data.feats, train_idx))
        database = embed_parts(model, data, train_idx, db_idx)
    return Run(Path(path), model, cfg, meta, data, train_idx, db_idx, bank, database)


@functools.lru_cache(maxsize=8)
def _cached_run(path: str, stamp: float) -> Run:
    return open_run(path)


def cached_run(path) -> Run:
    """open_run, remembered per folder while its weights file is unchanged (the explorer reuses loaded runs)."""
    p = Path(path)
    weights = p / "best" / "model.safetensors"
    weights = weights if weights.is_file() else p / "model.safetensors"
    stamp = weights.stat().st_mtime if weights.is_file() else 0.0
    return _cached_run(str(p.resolve()), stamp)


# ---------------------------------------------------------------------------------------------- queries


@dataclass
class Query:
    """One query: its modality and its features (one row, float32 tensors as `model.embed` takes them)."""

    modality: Modality
    feats: dict
    kind: str  # "text" | "image" | "item"
    description: str  # what the user asked, for headers
    item: int | None = None  # dataset row of an item query
    text: str | None = None
    image: object = None  # PIL image of an image query (or the item's image)


@functools.lru_cache(maxsize=4)
def _text_encoder(backbone: str, max_words: int):
    return create_text_encoder(backbone, max_words=max_words)


@functools.lru_cache(maxsize=4)
def _image_encoder(backbone: str, regions: int, image_size: int):
    return create_image_encoder(backbone, regions=regions, image_size=image_size)


def _as_cached(t: torch.Tensor) -> torch.Tensor:
    """The precision the feature cache stores (float16), so a new query is embedded from the same numbers an
    extracted item of the same content would be."""
    return t.to(torch.float16).to(torch.float32)


def text_query(run: Run, text: str) -> Query:
    """A free-text query encoded with the run's text backbone and its features.max_words."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("the query text is empty: type at least one word")
    f = run.cfg.features
    out = _text_encoder(f.text_backbone, int(f.max_words)).encode([text])
    if not bool(out.mask.any()):
        raise QueryError(f"the query text {text!r} has no word the text backbone {f.text_backbone} can read")
    feats = {"text_global": _as_cached(out.globals), "text_words": _as_cached(out.tokens), "text_mask": out.mask.bool()}
    return Query(TEXT, feats, "text", repr(text), text=text)


def words_of(run: Run, text: str) -> list[str]:
    """The words of a text as the run's text backbone pools them (fast tokenizer word ids), in word-slot order."""
    f = run.cfg.features
    return tokenizer_words(_text_encoder(f.text_backbone, int(f.max_words)).tokenizer, text)[: int(f.max_words)]


def read_image(path):
    """An image file as RGB PIL; one-line error naming the file when it is missing or not an image."""
    try:
        return read_image_file(path)
    except ImageReadError as exc:
        raise QueryError(f"{path}: cannot read the query image ({exc.reason})") from None


def image_query(run: Run, image, label: str | None = None) -> Query:
    """An image query (a path, or a PIL image) encoded with the run's image backbone, regions and image size."""
    if not isinstance(image, Image.Image):
        label = label or str(image)
        image = read_image(image)
    label = label or "uploaded image"
    f = run.cfg.features
    out = _image_encoder(f.image_backbone, int(f.regions), int(f.image_size)).encode([image.convert("RGB")])
    feats = {"image_global": _as_cached(out.globals), "image_regions": _as_cached(out.tokens)}
    return Query(IMAGE, feats, "image", label, image=image)


def item_query(run: Run, item_id: str, modality: Modality) -> Query:
    """A dataset item's image or text, from the run's cached features (exactly what evaluation embeds)."""
    row = run.row_of(item_id)
    if not bool(run.data.valid[row]):
        raise QueryError(f"item {item_id!r} has no features (its image could not be read at extraction)")
    feats = take(run.data.feats, [row])
    feats = {k: v for k, v in feats.items() if k.startswith(modality.key)}
    ds = run.dataset
    return Query(modality, feats, "item", f"item {ds.ids[row]} ({modality.key})", item=row, text=ds.text(row),
                 image=None)


# ---------------------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    run: Run
    query: Query
    against: str  # an Against value: "images" | "texts"
    distance: str  # a Distance value: "cosine" | "hamming"
    table: pd.DataFrame  # rank, id, row, <distance>, labels, text, shares_label, is_query_item
    embedding: dict  # the query's z (and h)
    attention: list | None  # per layer: query_index, bank_index, alpha (E, heads)[, mutual]; None without a graph

    @property
    def rows(self) -> list[int]:
        return self.table["row"].tolist()

    def neighbours(self) -> pd.DataFrame:
        """The query's in-edges in the inference graph, per layer, strongest first (see `neighbour_table`)."""
        return neighbour_table(self.run, self.attention)

    def json_lines(self) -> list[str]:
        return [json.dumps(rec, sort_keys=False) for rec in self.table.to_dict("records")]


def _own_bank_node(run: Run, row: int | None, modality: Modality) -> torch.Tensor | None:
    """For an item of the training split: its own node in the bank, which it must not link to (as in evaluation)."""
    if row is None:
        return None
    pos = np.flatnonzero(run.train_idx == row)
    if len(pos) == 0:
        return torch.tensor([-1])
    return torch.tensor([int(pos[0]) + (0 if modality == IMAGE else len(run.train_idx))])


def embed_query(run: Run, query: Query) -> dict:
    """The query's embedding (z, h) and its attention in the inference graph, as evaluation embeds an item."""
    exclude = _own_bank_node(run, query.item, query.modality)
    with torch.no_grad():
        e = run.model.embed(query.feats, query.modality, run.bank, return_attention=True, exclude=exclude)
    return e


def _scores(q: torch.Tensor, db: torch.Tensor, distance: str) -> torch.Tensor:
    """(1, N) higher = better: cosine similarity, or minus the Hamming distance of the sign codes."""
    if distance == Distance.HAMMING:
        return -(q.shape[1] - q @ db.T) / 2
    return F.normalize(q.float(), dim=1) @ F.normalize(db.float(), dim=1).T


def search(run: Run | str | Path, *, text: str | None = None, image=None, item: str | None = None,
           item_modality: str | None = None, top: int = 10, against: str | None = None,
           distance: str | None = None) -> SearchResult:
    """Rank the run's database for one query (exactly one of text, image, item).

    against (`dcmfg.choices.Against`): "images" or "texts"; default the other modality than the query's
    (cross-modal retrieval). An item query uses the item's text against images and its image against texts unless
    `item_modality` ("image" or "text", a `Modality.key`) says which.
    distance (`dcmfg.choices.Distance`): "cosine" (z) or "hamming" (sign of the hash head); default the run's
    eval.distance.
    """
    if sum(x is not None for x in (text, image, item)) != 1:
        raise QueryError("give exactly one query: a text, an image or a dataset item")
    # what can be checked without the run first: loading it takes seconds
    if text is not None and not text.strip():
        raise QueryError("the query text is empty: type at least one word")
    image_label = str(image) if isinstance(image, (str, Path)) else "uploaded image"
    if isinstance(image, (str, Path)):
        image = read_image(image)
    if against is not None:
        check(Against, against, "against", QueryError)
    if distance is not None:
        check(Distance, distance, "distance", QueryError)
    if top < 1:
        raise QueryError(f"top must be >= 1, got {top}")
    run = run if isinstance(run, Run) else cached_run(run)
    distance = distance or run.cfg.eval.distance
    if distance == Distance.HAMMING and not run.has_hash():
        raise QueryError(f"{run.name} has no hash head: rank by cosine")

    if text is not None:
        query = text_query(run, text)
    elif image is not None:
        query = image_query(run, image, image_label)
    else:
        if item_modality is None:
            modality = TEXT if (against or Against.IMAGES) == Against.IMAGES else IMAGE
        elif item_modality in MODALITY_OF_KEY:
            modality = MODALITY_OF_KEY[item_modality]
        else:
            raise QueryError(f"item_modality must be one of {', '.join(MODALITY_OF_KEY)}, got {item_modality!r}")
        query = item_query(run, item, modality)
    against = against or (Against.IMAGES if query.modality == TEXT else Against.TEXTS)

    e = embed_query(run, query)
    db = run.database[AGAINST[against].key]
    scores = _scores(codes(e, distance).float(), codes(db, distance).float(), distance)
    vals, pos = topk_stable(scores, min(int(top), scores.shape[1]))
    vals, pos = vals[0], pos[0].numpy()
    rows = run.db_idx[pos]
    table = _result_table(run, query, rows, vals, distance)
    embedding = {k: e[k] for k in ("z", "h") if k in e}
    return SearchResult(run, query, against, distance, table, embedding, e.get("attention"))


def _result_table(run: Run, query: Query, rows: np.ndarray, vals: torch.Tensor, distance: str) -> pd.DataFrame:
    ds = run.dataset
    labels = np.asarray(ds.labels)
    names = np.asarray(ds.label_names)
    score = vals.double().numpy()
    table = pd.DataFrame({
        "rank": np.arange(1, len(rows) + 1),
        "id": [str(ds.ids[r]) for r in rows],
        "row": rows.astype(int),
        distance: (-score).round().astype(int) if distance == Distance.HAMMING else score,
        "labels": [", ".join(names[labels[r] > 0]) for r in rows],
        "text": [ds.text(int(r)) for r in rows],
    })
    if query.item is not None:
        table["shares_label"] = (labels[rows] @ labels[query.item] > 0).tolist()
        table["is_query_item"] = (rows == query.item).tolist()
    else:
        table["shares_label"] = None
        table["is_query_item"] = False
    return table


# ---------------------------------------------------------------------------------------------- the graph


def neighbour_table(run: Run, attention: list | None) -> pd.DataFrame:
    """One query's in-edges in the inference graph: per layer, each neighbour (a bank node, or the query's own
    self-loop), its modality and dataset item, the attention weight (mean over heads, and per head), and whether
    the edge is a genuine mutual one ('mutual'), a fallback ('fallback'), the self-loop ('self') or unknown
    (the model does not report it)."""
    cols = ["layer", "neighbour", "modality", "id", "row", "alpha", "edge"]
    if not attention:
        return pd.DataFrame(columns=cols)
    ds, bank = run.dataset, run.bank
    frames = []
    for li, a in enumerate(attention):
        bi = a["bank_index"].long()
        is_bank = (bi >= 0).numpy()
        safe = bi.clamp(min=0)
        bank_mod = bank.modality[safe].numpy()
        rows = np.where(is_bank, run.train_idx[bank.token_row[safe].numpy()], -1)
        mutual = a.get("mutual")
        if mutual is None:
            edge = np.where(is_bank, "unknown", "self")
        else:
            edge = np.where(~is_bank, "self", np.where(np.asarray(mutual, dtype=bool), "mutual", "fallback"))
        alpha = a["alpha"].float()
        df = pd.DataFrame({
            "layer": li,
            "neighbour": np.where(is_bank, "bank", "self"),
            "modality": np.where(is_bank, np.where(bank_mod == IMAGE, IMAGE.key, TEXT.key), "query"),
            "id": [str(ds.ids[r]) if r >= 0 else "" for r in rows],
            "row": rows,
            "alpha": alpha.mean(1).numpy(),
            "edge": edge,
        })
        for h in range(alpha.shape[1]):
            df[f"alpha_h{h}"] = alpha[:, h].numpy()
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["layer", "alpha"], ascending=[True, False], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- CLI


def run_command(args) -> int:
    """`dcmfg search` (the arguments are defined in dcmfg/cli.py)."""
    res = search(args.run, text=args.text, image=args.image, item=args.item, top=args.top, against=args.against,
                 distance=args.distance)
    if args.json:
        print("\n".join(res.json_lines()))
        return 0
    print(format_result(res))
    return 0


def format_result(res: SearchResult, width: int = 48) -> str:
    """A plain-text table of a result, with a header naming the query, run, direction and distance."""
    t = res.table
    item = res.query.item is not None
    head = (f"{res.run.name}: {res.query.description} against {len(res.run.db_idx)} database {res.against}, "
            f"{res.distance}{' (higher is closer)' if res.distance == Distance.COSINE else ' distance in bits'}")
    lines = [head]
    score = res.distance
    wid = max([10] + [len(x) for x in t["id"]])
    for r in t.itertuples(index=False):
        val = f"{getattr(r, score):.4f}" if score == Distance.COSINE else f"{getattr(r, score):d}"
        mark = ("+" if r.shares_label else "-") if item else " "
        mark = "=" if item and r.is_query_item else mark
        text = r.text if len(r.text) <= width else r.text[: width - 3] + "..."
        lines.append(f"{r.rank:>3} {mark} {r.id:<{wid}} {val:>8}  [{r.labels}]  {text}")
    if item:
        lines.append("+ shares a label with the query item, - shares none, = the query item itself")
    return "\n".join(lines)
