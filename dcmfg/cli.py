"""The `dcmfg` command. Thin: each command module adds its own sub-commands with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order `dcmfg --help` lists them.
COMMAND_MODULES = [
    "dcmfg.data.cli",  # dcmfg data info | split | fetch
    "dcmfg.features",  # dcmfg features extract
    "dcmfg.train",  # dcmfg train
    "dcmfg.evaluate",  # dcmfg evaluate
    "dcmfg.study",  # dcmfg study run
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcmfg", description="Cross-modal image-text retrieval with mutual-kNN dynamic graph networks (DCMFG)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # user-facing errors: one clear line, not a traceback
        from dcmfg.errors import is_user_error

        if is_user_error(exc):
            print(f"dcmfg: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
