"""The `dcmfg` command. Thin: it defines every command's arguments and imports the module that runs a command only
when that command runs, so `dcmfg --help` and argument errors answer without importing torch (what it imports at
the top, config and data loaders included, imports no torch).

Exit codes: 0 done, 2 a user error or a failed write (one line naming the file, option or value: a bad config, a run
folder another process is writing into, a full disk), 130 interrupted (Ctrl-C).
Several processes or GPUs: `torchrun --nproc_per_node=N -m dcmfg.cli features extract|train|evaluate ...` shares the
extraction (by cache chunk), training (DDP) and evaluation (by query chunk) out across the N processes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dcmfg.choices import Against, Distance, EvalSplit, OnCorrupt, values
from dcmfg.config import load_config
from dcmfg.data.cli import register as register_data
from dcmfg.device import check_device_spec
from dcmfg.errors import Interrupted, is_user_error

DEVICE_HELP = "auto (CUDA when present, else CPU; default), cpu, cuda or cuda:N"


def _set_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. {what} (repeatable; values parsed as YAML)")


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="extract and cache backbone features")
    fs = p.add_subparsers(dest="features_command", required=True)
    e = fs.add_parser("extract", help="extract (or load from cache) the features of a dataset")
    e.add_argument("--dataset", required=True, help="dataset name (mirflickr25k, nuswide, mscoco, manifest, ...)")
    e.add_argument("--root", default=None, help="dataset folder")
    e.add_argument("--config", default=None, help="a run config (YAML) whose features section to use")
    _set_option(e, "--set features.regions=2")
    e.add_argument("--cache-root", default=None, help="features cache folder (default: $DCMFG_CACHE/features)")
    e.add_argument("--on-corrupt", choices=values(OnCorrupt), default=None,
                   help="an unreadable image: skip it (its item is left out of every split part) or fail (default: "
                        "the config's features.on_corrupt, skip)")
    e.add_argument("--chunk-size", type=int, default=None, help="items per cache file (default 1024)")
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.set_defaults(handler="dcmfg.features:run_command", needs_config=True)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model; ends with report.json on the query split")
    p.add_argument("--config", default=None, help="YAML config (configs/dcmfg.yaml, linear, dcmh, dcmht)")
    _set_option(p, "--set graph.k=8")
    p.add_argument("--out", default=None, help="run folder (default: under DCMFG_CACHE/runs)")
    p.add_argument("--device", default=None, help=DEVICE_HELP + "; default: the config's train.device")
    p.add_argument("--no-resume", action="store_true", help="do not resume OUT/last (refused if OUT holds a run)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in OUT (checkpoints, metrics, report)")
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing into OUT, wait for it to finish (default: stop at once, exit 2)")
    p.set_defaults(handler="dcmfg.engine.train:run_command", needs_config=True)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained checkpoint; writes a JSON report")
    p.add_argument("--checkpoint", required=True, help="run folder (uses its best/) or a checkpoint folder")
    p.add_argument("--split", default="query", choices=values(EvalSplit))
    p.add_argument("--out", default=None, help="report path (default RUN/evaluate_<split>.json)")
    _set_option(p, "eval.distance=hamming or graph.inference=transductive")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing into the run folder, wait for it to finish (default: stop at "
                        "once, exit 2); only when the report goes into the run folder")
    p.set_defaults(handler="dcmfg.engine.evaluate:run_command")


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run the study notebooks and build the book")
    ss = p.add_subparsers(dest="study_command", required=True)
    r = ss.add_parser("run", help="execute notebooks/ with papermill, then jupyter-book build")
    r.add_argument("--params", default="full", help="parameter set name (quick, full) or a YAML file (default: full)")
    r.add_argument("--out-book", default=None, help="book folder to fill and build (default: the repo's book/)")
    r.add_argument("--skip-build", action="store_true", help="run the notebooks only")
    r.add_argument("--only", nargs="*", metavar="NOTEBOOK", help="run only these notebooks (e.g. 03-training)")
    r.add_argument("--device", default=None, help=DEVICE_HELP + "; default: the parameter set's, else auto")
    r.set_defaults(handler="dcmfg.study:run_command")


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="search a trained run with a text, an image file or a dataset item")
    p.add_argument("--run", required=True, help="run folder (uses its best/) or a checkpoint folder")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="a free-text query, e.g. 'dog on a beach'")
    q.add_argument("--image", help="an image file to query with")
    q.add_argument("--item", help="a dataset item id: its text against images, its image against texts")
    p.add_argument("--top", type=int, default=10, help="how many results (default 10)")
    p.add_argument("--against", choices=values(Against), default=None,
                   help="rank images or texts (default: the other modality than the query's)")
    p.add_argument("--distance", choices=values(Distance), default=None,
                   help="cosine on the embeddings or Hamming on the hash codes (default: the run's eval.distance)")
    p.add_argument("--json", action="store_true", help="one JSON object per result line")
    p.set_defaults(handler="dcmfg.search:run_command")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcmfg", description="Cross-modal image-text retrieval with mutual-kNN dynamic graph networks (DCMFG)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    register_data(sub)
    for add in (_add_features, _add_train, _add_evaluate, _add_search, _add_study):
        add(sub)
    return parser


def _precheck(args) -> None:
    """Checks that need no torch, before the command's module is imported: config files and values, devices."""
    if getattr(args, "device", None):
        check_device_spec(args.device)
    if getattr(args, "needs_config", False):
        load_config(args.config, args.overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _precheck(args)
        if hasattr(args, "handler"):
            module, name = args.handler.split(":")
            return int(getattr(importlib.import_module(module), name)(args) or 0)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dcmfg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one clear line, not a traceback
        if isinstance(exc, Interrupted):
            print(f"dcmfg: {exc}", file=sys.stderr)
            return 130
        if is_user_error(exc):
            print(f"dcmfg: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
