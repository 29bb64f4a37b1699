"""`dcmfg data info | split | fetch`: thin wrappers over the loaders, splits and downloads."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcmfg.choices import SplitProtocol, values
from dcmfg.config import parse_assignment

from . import load_dataset
from .base import DatasetError
from .discover import check_folder, detect, find_datasets
from .fetch import fetch_dataset
from .splits import make_split, save_split, size_problem


def _options(pairs: list[str] | None) -> dict:
    """--option KEY=VALUE pairs as loader keyword arguments (values read as YAML scalars, like --set)."""
    return dict(parse_assignment(pair, "--option") for pair in pairs or [])


def _size(text: str):
    """A split size: '0.2' is a fraction, '2000' a count, 'none' = the protocol's 'all that remains'."""
    if text.lower() in ("none", "all"):
        return None
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count or a fraction") from None


def _pick_dataset(root: Path, name: str | None) -> str:
    if name is not None:
        return name
    if not root.is_file():  # a manifest may be given as its file
        check_folder(root)
    found = sorted({n for n, _ in detect(root)}) or sorted({n for n, _ in find_datasets(root)})
    if not found:
        raise DatasetError(f"{root}: no dataset layout recognised (see `dcmfg data info --help`); pass --dataset NAME")
    if len(found) > 1:
        raise DatasetError(f"{root}: holds several datasets ({', '.join(found)}); pass --dataset NAME")
    return found[0]


def format_summary(s: dict) -> str:
    lines = [
        f"dataset      {s['name']}",
        f"layout       {s['layout']}",
        f"root         {s['root']}",
        f"items        {s['items']}" + (f" ({s['groups']} images)" if s.get("groups") else ""),
        f"labels       {s['labels']}",
        f"fingerprint  {s['fingerprint']}",
    ]
    for key, value in s["stats"].items():
        lines.append(f"  {key}: {value}")
    for what in ("labels_per_item", "words_per_item"):
        d = s[what]
        lines.append(f"{what.replace('_', ' '):<16}mean {d['mean']:.2f}  median {d['median']:g}  min {d['min']}  max {d['max']}")
    lines.append(f"empty texts  {s['empty_texts']}")
    lines.append("label frequencies:")
    n = max(s["items"], 1)
    width = max((len(k) for k in s["label_frequency"]), default=5)
    for label, count in s["label_frequency"].items():
        lines.append(f"  {label:<{width}}  {count:>7}  {100 * count / n:5.1f}%")
    return "\n".join(lines)


def cmd_info(args) -> int:
    root = Path(args.root)
    ds = load_dataset(_pick_dataset(root, args.dataset), root, **_options(args.option))
    print(format_summary(ds.summary()))
    return 0


def cmd_split(args) -> int:
    for part in ("query", "train", "val"):  # before loading anything: a size that leaves a part empty is a typo
        value = getattr(args, part)
        problem = size_problem(part, value)
        if problem:
            raise DatasetError(f"--{part} {'none' if value is None else value} {problem}")
    root = Path(args.root) if args.root else None
    ds = load_dataset(args.name, root, **_options(args.option))
    split = make_split(ds, protocol=args.protocol, query=args.query, train=args.train, val=args.val, seed=args.seed)
    save_split(split, args.out)
    sizes = ", ".join(f"{k} {v}" for k, v in split.sizes().items())
    print(f"{args.out}: {args.protocol} split of {ds.name} ({len(ds)} items, fingerprint {split.fingerprint}), seed {args.seed}: {sizes}")
    return 0


def cmd_fetch(args) -> int:
    dest = fetch_dataset(args.name, args.dest, url_base=args.url_base)
    print(f"{args.name}: ready under {dest}")
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="datasets: inspect, split, download")
    sub = data.add_subparsers(dest="data_command", required=True)
    opt_help = "loader option KEY=VALUE, repeatable (e.g. cleaned=false, tags=all, concepts=tc10, n=600)"

    p = sub.add_parser("info", help="layout, counts, drops, label frequencies and words per item of a dataset")
    p.add_argument("root", help="the dataset folder (or a folder holding it)")
    p.add_argument("--dataset", help="mirflickr25k | nuswide | mscoco | manifest | synthetic (default: detected)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help=opt_help)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("split", help="make a split file (query / database / train / val index lists)")
    p.add_argument("name", help="dataset name (mirflickr25k, nuswide, synthetic, ...)")
    p.add_argument("--root", help="the dataset folder (default: found under DCMFG_DATA)")
    p.add_argument("--protocol", default="random", choices=values(SplitProtocol))
    p.add_argument("--query", type=_size, default=0.2, help="count or fraction (per class for class_balanced)")
    p.add_argument("--train", type=_size, default=None, help="count or fraction; default: the whole database")
    p.add_argument("--val", type=_size, default=0.1, help="count or fraction of the training pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="split file to write (JSON)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help=opt_help)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("fetch", help="download, verify and extract a dataset's official archives")
    p.add_argument("name", choices=["mirflickr25k"])
    p.add_argument("--dest", required=True, help="folder to download and extract into")
    p.add_argument("--url-base", help="mirror to download from instead of the official site")
    p.set_defaults(func=cmd_fetch)
